"""
DNS for the server, always through ``twisted.names`` and the configured servers.

When ``relay.dns_servers`` is set, only those servers are asked (no hosts file, no
/etc/resolv.conf), so that tests and split-horizon set-ups get exactly the answers they serve.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Sequence

from twisted.internet import defer
from twisted.names import client, dns

#: Seconds per try for the client's reverse lookup: short, it only decorates Received:.
REVERSE_LOOKUP_TIMEOUT = (2, 3)


def make_resolver(dns_servers: Sequence[tuple[str, int]], reactor: Any = None) -> Any:
    """A resolver asking ``dns_servers`` only, or the system's configuration when empty."""
    if dns_servers:
        return client.Resolver(servers=list(dns_servers), reactor=reactor)
    return client.createResolver()


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
        except Exception:
            continue
        if any(ipaddress.ip_address(f) == address for f in found):
            return name.lower()
    return None
