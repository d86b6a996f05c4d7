"""
The SMTP listeners' factory and the connection limits (in total, per client address, and
connections a minute per client address) that all listeners share.

The factory asks ``ConnectionCounter.admit`` for every new connection; a refused one gets a
protocol that answers the refusal (``421 4.7.0``), logs why, and closes.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import protocol

from mailsrv import replies
from mailsrv.checks.ratelimits import ConnectionRate
from mailsrv.inbound.session import log
from mailsrv.inbound.smtp import CLOSE_GRACE, SMTPServerProtocol
from mailsrv.replies import Reply, format_reply

if TYPE_CHECKING:
    from mailsrv.runtime import Runtime


def plain_ip(host: str) -> str:
    """The client address as people write it (an IPv4-mapped IPv6 address as IPv4)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class ConnectionCounter:
    """The connection limits (in total and per client address), shared by all listeners.

    Addresses for which ``exempt`` is true (our own networks: a burst of local ``sendmail``
    runs) are held to the total only, as Postfix exempts $mynetworks from its per-client
    limits.  ``rate`` ([limits] connections_per_minute) counts only the connections admitted.
    """

    def __init__(
        self, max_connections: int, max_per_ip: int,
        exempt: Callable[[str], bool] = lambda ip: False, rate: ConnectionRate | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.exempt = exempt
        self.rate = rate
        self.connections = 0
        self.connections_by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> tuple[Reply, str, str] | None:
        """Count one more connection from ``ip``; if over a limit, the refusal to give
        instead, and the layer and reason to log (the limit's key and value)."""
        if self.connections >= self.max_connections:
            return (replies.TOO_MANY_CONNECTIONS, "connection_limit",
                    f"smtp.max_connections {self.max_connections}")
        if not self.exempt(ip):
            if self.connections_by_ip.get(ip, 0) >= self.max_per_ip:
                return (replies.TOO_MANY_CONNECTIONS_FROM_IP, "connection_limit",
                        f"smtp.max_connections_per_ip {self.max_per_ip}")
            if self.rate is not None and not self.rate.admit(ip):
                return (replies.TOO_MANY_CONNECTIONS_RATE, "connection_rate",
                        f"connection rate connections_per_minute {self.rate.per_minute}")
        self.connections += 1
        self.connections_by_ip[ip] = self.connections_by_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.connections -= 1
        remaining = self.connections_by_ip.get(ip, 1) - 1
        if remaining:
            self.connections_by_ip[ip] = remaining
        else:
            self.connections_by_ip.pop(ip, None)


class SMTPServerFactory(protocol.ServerFactory):
    """Builds the sessions of one kind of listener (port 25 or submission, plain or TLS)."""

    def __init__(
        self, runtime: "Runtime", counter: ConnectionCounter,
        submission: bool = False, implicit_tls: bool = False,
    ) -> None:
        self.runtime = runtime
        self.counter = counter
        self.submission = submission
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        ip = plain_ip(getattr(addr, "host", ""))
        refusal = self.counter.admit(ip)
        p: protocol.Protocol
        metrics = self.runtime.metrics
        if refusal is not None:
            reply = refusal[0]
            metrics.connection_refused(
                "max_connections" if reply is replies.TOO_MANY_CONNECTIONS
                else "max_connections_per_ip" if reply is replies.TOO_MANY_CONNECTIONS_FROM_IP
                else "connections_per_minute")
            p = Refused(self.runtime.reactor, ip, *refusal)
        else:
            metrics.connection_opened("submission" if self.submission else "smtp")
            p = SMTPServerProtocol(self.runtime, ip, self.submission, self.implicit_tls)
        p.factory = self
        return p

    def connection_closed(self, ip: str) -> None:
        """An admitted connection (a SMTPServerProtocol) has closed."""
        self.counter.release(ip)
        self.runtime.metrics.connection_closed()


class Refused(protocol.Protocol):
    """A connection over a limit: the refusal, then the close (nothing it says is read)."""

    def __init__(
        self, reactor: Any, client_ip: str, refusal: Reply, check: str = "connection_limit",
        reason: str = "",
    ) -> None:
        self.reactor = reactor
        self.client_ip = client_ip
        self.refusal = refusal
        self.check = check
        self.reason = reason or f"{refusal.code} {refusal.status}"
        self._force_close: Any = None

    def connectionMade(self) -> None:
        log.info('refused connection client={client} check={check} reason="{reason}"',
                 client=self.client_ip, check=self.check, reason=self.reason)
        self.transport.write(format_reply(self.refusal) + b"\r\n")
        self.transport.loseConnection()
        # As SMTPServerProtocol: a TLS client that never finishes its handshake would keep
        # its socket for ever; after a grace period it is cut.
        self._force_close = self.reactor.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        if self._force_close is not None and self._force_close.active():
            self._force_close.cancel()
        self._force_close = None
