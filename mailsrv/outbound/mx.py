"""
Where mail for a domain goes: MX resolution with ``twisted.names`` (RFC 5321 §5.1, RFC 7505).

The pure rules (ordering, our own host among the MX hosts) are separate from the lookups so
they are tested directly.  Every failure says whether it is final: a domain that does not
exist, or says it takes no mail (null MX), is bounced at once; a DNS server that fails or
does not answer only delays the mail.  An address literal naming this host (``[127.0.0.1]``,
``[IPv6:::1]``, one of its interfaces) loops back like an MX pointing at us: bounced, 5.4.6.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.names import dns, error

from mailsrv import replies
from mailsrv.replies import Refusal

__all__ = [
    "MXHost",
    "DestinationError",
    "order_mx",
    "drop_own_hosts",
    "is_own_address",
    "resolve_destination",
    "resolve_host",
]


@dataclass(frozen=True)
class MXHost:
    name: str  # lower-case, no trailing dot; "[192.0.2.1]" for an address literal
    preference: int
    addresses: tuple[str, ...]  # IPv6 first, then IPv4, in DNS order


class DestinationError(Refusal):
    """No host to deliver to: the reply for the domain's recipients (``permanent`` decides
    bounce or retry)."""

    @property
    def permanent(self) -> bool:
        return self.reply.permanent

    def __str__(self) -> str:
        return self.reply.text


def _name(value: Any) -> str:
    text = value.name.decode("ascii", "replace") if hasattr(value, "name") else str(value)
    return text.lower().rstrip(".")


def order_mx(records: Sequence[tuple[int, str]], rng: Any) -> list[tuple[int, str]]:
    """By preference, lowest first; hosts of equal preference in random order (spreads load)."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda record: record[0])  # sorted() is stable


def drop_own_hosts(
    records: Sequence[tuple[int, str]], own_names: Collection[str]
) -> list[tuple[int, str]]:
    """Only MX hosts better than ourselves: sending to an equal or worse one would loop."""
    own = {n.lower().rstrip(".") for n in own_names}
    ours = [pref for pref, name in records if name.lower().rstrip(".") in own]
    if not ours:
        return list(records)
    best_own = min(ours)
    return [(pref, name) for pref, name in records if pref < best_own]


def _temporary(failure: Any) -> bool:
    return not failure.check(error.DNSNameError)


@defer.inlineCallbacks
def _addresses(resolver: Any, name: str, timeout: tuple[int, ...]) -> Any:
    """(addresses, temporary_failure) for one host name: AAAA then A."""
    v6 = resolver.lookupIPV6Address(name, timeout=timeout)
    v4 = resolver.lookupAddress(name, timeout=timeout)
    results = yield defer.DeferredList([v6, v4], consumeErrors=True)
    found: list[str] = []
    temporary = False
    for ok, value in results:  # AAAA, then A
        if not ok:
            temporary = temporary or _temporary(value)
            continue
        for record in value[0]:
            if record.type == dns.AAAA:
                address = socket.inet_ntop(socket.AF_INET6, record.payload.address)
            elif record.type == dns.A:
                address = record.payload.dottedQuad()
            else:
                continue
            if address not in found:
                found.append(address)
    return found, temporary


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def is_own_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address names this host: loopback, unspecified, or one of its interfaces'.

    An address literal naming ourselves is a mail loop just like an MX pointing back: without
    this check such mail is queued and retried against ourselves for days.  The interfaces'
    addresses are asked of the kernel directly: binding a socket to an address succeeds only
    for an address of this host (no list to parse, no resolver, every interface covered).
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_unspecified:
        return True
    if address.is_multicast or address == _BROADCAST:
        return False  # never one host (yet binding to it succeeds, for receiving)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def _literal(domain: str) -> MXHost | None:
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        raise DestinationError(replies.BAD_ADDRESS_LITERAL.format(domain=domain)) from None
    return MXHost(domain, 0, (str(address),))


@defer.inlineCallbacks
def resolve_destination(
    resolver: Any,
    domain: str,
    *,
    own_names: Collection[str] = (),
    timeout: tuple[int, ...] = (2, 5),
    rng: Any = None,
) -> Any:
    """The hosts to try for ``domain``, in order, each with addresses; or DestinationError."""
    literal = _literal(domain)
    if literal is not None:
        if is_own_address(ipaddress.ip_address(literal.addresses[0])):
            raise DestinationError(replies.LOOPS_BACK.format(domain=domain))
        return [literal]
    rng = rng or random.Random()
    try:
        answers, _, _ = yield resolver.lookupMailExchange(domain, timeout=timeout)
    except error.DNSNameError:
        raise DestinationError(replies.DOMAIN_NOT_FOUND.format(domain=domain))
    except Exception as e:
        raise DestinationError(
            replies.MX_LOOKUP_FAILED.format(domain=domain, error=type(e).__name__)
        )
    records = [(a.payload.preference, _name(a.payload.name)) for a in answers if a.type == dns.MX]
    if records and all(name == "" for _, name in records):
        raise DestinationError(replies.NULL_MX.format(domain=domain))
    records = [(pref, name) for pref, name in records if name]
    if not records:
        records = [(0, domain)]  # implicit MX
        implicit = True
    else:
        implicit = False
    usable = drop_own_hosts(order_mx(records, rng), own_names)
    if not usable:
        raise DestinationError(replies.LOOPS_BACK.format(domain=domain))
    hosts: list[MXHost] = []
    any_temporary = False
    for pref, name in usable:
        found, temporary = yield _addresses(resolver, name, timeout)
        any_temporary = any_temporary or temporary
        if found:
            hosts.append(MXHost(name, pref, tuple(_v6_first(found))))
    if hosts:
        return hosts
    if any_temporary:
        raise DestinationError(replies.NO_MX_ADDRESS_YET.format(domain=domain))
    if implicit:
        raise DestinationError(replies.NO_MX_NO_ADDRESS.format(domain=domain))
    raise DestinationError(replies.NO_MX_ADDRESS.format(domain=domain))


def _v6_first(addresses: list[str]) -> list[str]:
    return [a for a in addresses if ":" in a] + [a for a in addresses if ":" not in a]


@defer.inlineCallbacks
def resolve_host(resolver: Any, name: str, *, timeout: tuple[int, ...] = (2, 5)) -> Any:
    """A configured host (a smarthost): its own addresses, no MX."""
    try:
        return MXHost(name, 0, (str(ipaddress.ip_address(name)),))
    except ValueError:
        pass  # a name, or a [literal]
    literal = _literal(name)
    if literal is not None:
        return literal
    found, temporary = yield _addresses(resolver, name, timeout)
    if found:
        return MXHost(name.lower().rstrip("."), 0, tuple(_v6_first(found)))
    if temporary:
        raise DestinationError(replies.HOST_LOOKUP_FAILED.format(name=name))
    raise DestinationError(replies.HOST_NO_ADDRESS.format(name=name))

