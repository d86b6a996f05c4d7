"""
DNS for the server, always through ``twisted.names`` and the configured servers.

When ``relay.dns_servers`` is set, only those servers are asked (no hosts file, no
/etc/resolv.conf), so that tests and split-horizon set-ups get exactly the answers they serve.

One resolver serves the whole server (sessions and relayer).  Each UDP query still goes out
from a socket of its own on a random port, as ``twisted.names`` does and RFC 5452 §9.2 asks
(an attacker who could learn a fixed port would need to guess only the 16-bit query id to
forge an answer), but without the four log lines Twisted's UDP port writes for each socket.
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
from typing import Any, Sequence

from twisted.internet import defer, error
from twisted.internet.interfaces import IReadDescriptor
from twisted.names import cache, client, dns, hosts, resolve
from twisted.python.failure import Failure
from zope.interface import implementer

#: Seconds per try for the client's reverse lookup: short, it only decorates Received:.
REVERSE_LOOKUP_TIMEOUT = (2, 3)


def make_resolver(dns_servers: Sequence[tuple[str, int]], reactor: Any = None) -> Any:
    """A resolver asking ``dns_servers`` only, or the system's configuration when empty."""
    if dns_servers:
        return QuietResolver(servers=list(dns_servers), reactor=reactor)
    # What client.createResolver() builds, with the quiet resolver at its end.
    return resolve.ResolverChain([
        hosts.Resolver(b"/etc/hosts"),
        cache.CacheResolver(reactor=reactor),
        QuietResolver(resolv=b"/etc/resolv.conf", reactor=reactor),
    ])


def source_port(below: Any = secrets.randbelow) -> int:
    """A random unprivileged port for one query (RFC 5452 §9.2).  Not twisted.names'
    ``randomSource``, which draws from 0-65535: a server that dropped root (and ``mailsrv
    doctor`` run as the mailsrv user) is refused the ports below 1024, one query in 64."""
    return 1024 + below(65536 - 1024)


@implementer(IReadDescriptor)
class _QuietDatagramPort:
    """The UDP socket of one query: what ``DNSDatagramProtocol`` needs of a transport, and
    nothing logged (``twisted.internet.udp.Port`` logs its start and its close)."""

    def __init__(self, reactor: Any, protocol: dns.DNSDatagramProtocol, interface: str) -> None:
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        for attempt in range(100):
            try:
                self.socket.bind((interface, source_port()))
                break
            except OSError as e:
                if e.errno not in (errno.EADDRINUSE, errno.EACCES) or attempt == 99:
                    self.socket.close()
                    raise error.CannotListenError(interface, 0, e)
        self._reactor = reactor
        self.protocol = protocol
        protocol.makeConnection(self)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.socket.fileno() if self.socket is not None else -1

    def logPrefix(self) -> str:
        return "DNS"

    def doRead(self) -> None:
        for _ in range(16):
            try:
                data, address = self.socket.recvfrom(65535)
            except OSError:
                return  # nothing more (EAGAIN), or an ICMP error: the query's timer handles it
            self.protocol.datagramReceived(data, tuple(address[:2]))
            if self.socket is None:
                return  # the answer ended the query

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        self.socket.sendto(data, address)  # an error fails this query: the next server is tried

    def stopListening(self) -> None:
        self.connectionLost(Failure(error.ConnectionDone()))

    def connectionLost(self, reason: Failure) -> None:
        if self.socket is None:
            return
        self._reactor.removeReader(self)
        self.socket.close()
        self.socket = None
        self.protocol.doStop()


class QuietResolver(client.Resolver):
    """``twisted.names``' resolver, each query from a quiet socket on a random port."""

    #: The protocol of each UDP query (mailsrv.outbound.danelookup's asks for DNSSEC).
    datagram_protocol: type[dns.DNSDatagramProtocol] = dns.DNSDatagramProtocol

    def _connectedProtocol(self, interface: str = "") -> dns.DNSDatagramProtocol:
        protocol = self.datagram_protocol(self, reactor=self._reactor)
        protocol.noisy = False  # no "Starting protocol" / "Stopping protocol" lines
        _QuietDatagramPort(self._reactor, protocol, interface)
        return protocol


def skips_reverse_lookup(ip: str, trusted_networks: Sequence[Any]) -> bool:
    """Whether a client's reverse name is not looked up: loopback (this host) and our own
    networks, where it tells nothing and a DNS outage would delay every local ``sendmail``."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return True
    return address.is_loopback or any(address in network for network in trusted_networks)


class ReverseNames:
    """The clients' verified reverse names, with one lookup in flight per address.

    Connections from one address share the lookup; one that goes away stops waiting, but the
    lookup goes on as long as another connection still waits for it.
    """

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self._in_flight: dict[str, tuple[defer.Deferred, list[defer.Deferred]]] = {}

    def lookup(self, ip: str) -> defer.Deferred:
        """Fires with the name or None; cancelling it abandons this wait only (CancelledError)."""
        d: defer.Deferred = defer.Deferred(lambda d: self._abandon(ip, d))
        entry = self._in_flight.get(ip)
        if entry is not None:
            entry[1].append(d)
            return d
        waiters = [d]
        shared: defer.Deferred = verified_reverse_name(self.resolver, ip)
        self._in_flight[ip] = (shared, waiters)
        shared.addBoth(self._done, ip, waiters)  # may fire at once (a cached answer)
        return d

    def _abandon(self, ip: str, d: defer.Deferred) -> None:
        entry = self._in_flight.get(ip)
        if entry is None or d not in entry[1]:
            return
        entry[1].remove(d)
        if not entry[1]:
            entry[0].cancel()  # nobody waits any more

    def _done(self, result: Any, ip: str, waiters: list[defer.Deferred]) -> None:
        if self._in_flight.get(ip, (None, None))[1] is waiters:
            del self._in_flight[ip]
        name = None if isinstance(result, Failure) else result
        for d in list(waiters):
            d.callback(name)
        waiters.clear()


def _names(answers: list[Any], record_type: int) -> list[Any]:
    return [a.payload for a in answers if a.type == record_type]


@defer.inlineCallbacks
def verified_reverse_name(resolver: Any, ip: str) -> Any:
    """
    The client's forward-confirmed reverse DNS name, or None.

    A PTR record alone proves nothing (anyone controlling the reverse zone can claim any name),
    so the name is used only when it resolves back to the same address.
    """
    address = ipaddress.ip_address(ip)
    try:
        answers, _, _ = yield resolver.lookupPointer(
            address.reverse_pointer, timeout=REVERSE_LOOKUP_TIMEOUT
        )
    except defer.CancelledError:
        raise
    except Exception:
        return None
    for ptr in _names(answers, dns.PTR)[:5]:
        name = ptr.name.name.decode("ascii", "replace").rstrip(".")
        if not name:
            continue
        try:
            if address.version == 4:
                forward, _, _ = yield resolver.lookupAddress(name, timeout=REVERSE_LOOKUP_TIMEOUT)
                found = [r.dottedQuad() for r in _names(forward, dns.A)]
            else:
                forward, _, _ = yield resolver.lookupIPV6Address(
                    name, timeout=REVERSE_LOOKUP_TIMEOUT
                )
                found = [socket.inet_ntop(socket.AF_INET6, r.address) for r in _names(forward, dns.AAAA)]
        except defer.CancelledError:
            raise
        except Exception:
            continue
        if any(ipaddress.ip_address(f) == address for f in found):
            return name.lower()
    return None
