"""
The DNS side of DANE (RFC 7672 §2.2): which MX hosts have secure TLSA records.

We do not validate DNSSEC ourselves: like Postfix with ``smtp_dns_support_level = dnssec``
we trust the AD bit of the validating resolver in ``relay.dns_servers`` (which should be
on this host or reached over a trusted path).  ``twisted.names``' resolver drops the
header of an answer, so these queries are made at the message level: each asks for the AD
bit (RFC 6840 §5.7) and sets EDNS0's DO bit (RFC 3225, what Postfix sets), with the same
random-source-port sockets as every other query (mailsrv.dnsutil); a truncated answer is
asked again over TCP.

DANE applies to a host only when the destination's MX RRset (or, for an implicit MX, its
denial) is secure and so are the host's address records; then its TLSA RRset at
``_<port>._tcp.<host>`` decides: secure records mean TLS is required (authenticated by the
usable ones, if any); no records, or insecure ones, leave the host to the normal TLS policy;
a lookup that fails (SERVFAIL: bogus data, or no answer) makes the host unusable for now,
as a failure of the address lookup would (§2.2.2): never a fallback to clear text.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from twisted.internet import defer
from twisted.names import client, dns

from mailsrv.dnsutil import QuietResolver
from mailsrv.outbound.dane import TLSA, parse_tlsa, usable
from mailsrv.outbound.mx import MXHost

__all__ = ["TLSA_TYPE", "Answer", "DanePolicy", "DaneLookupFailed", "SecureResolver", "DaneLookup"]

#: The TLSA RR type (RFC 6698 §7.1); twisted.names has no class for it.
TLSA_TYPE = 52
#: The EDNS0 payload size we offer (the DNS flag day 2020 value).
EDNS_PAYLOAD = 1232


class _DOOption:
    """The EDNS0 OPT pseudo-record (RFC 6891) with the DO bit: encodes like a record."""

    def encode(self, strio: Any, compDict: Any = None) -> None:
        # root name, TYPE=OPT, CLASS=payload size, TTL=(ext-rcode, version, DO flag), RDLEN=0
        strio.write(b"\x00" + struct.pack("!HHIH", dns.OPT, EDNS_PAYLOAD, 0x8000, 0))


def _ask_for_dnssec(message: dns.Message) -> None:
    if not message.answer:
        message.authenticData = 1
        message.additional = [_DOOption()]


class _DatagramProtocol(dns.DNSDatagramProtocol):
    def writeMessage(self, message: dns.Message, address: Any) -> None:
        _ask_for_dnssec(message)
        dns.DNSDatagramProtocol.writeMessage(self, message, address)


class _StreamProtocol(dns.DNSProtocol):
    def writeMessage(self, message: dns.Message) -> None:
        _ask_for_dnssec(message)
        dns.DNSProtocol.writeMessage(self, message)


class _StreamFactory(client.DNSClientFactory):
    noisy = False  # as twisted.names' own: no "Starting factory" line per TCP query

    def buildProtocol(self, addr: Any) -> Any:
        p = _StreamProtocol(self.controller)
        p.factory = self
        return p


class SecureResolver(QuietResolver):
    """A resolver whose queries ask for DNSSEC, and whose ``answer`` keeps the header."""

    datagram_protocol = _DatagramProtocol

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        QuietResolver.__init__(self, *args, **kwargs)
        self.factory = _StreamFactory(self, self.timeout[-1] if self.timeout else 10)

    @defer.inlineCallbacks
    def answer(self, name: str, qtype: int, timeout: Sequence[int]) -> Any:
        """The :class:`Answer` for one question (UDP, then TCP if truncated)."""
        query = dns.Query(name.rstrip(".").encode("idna"), qtype, dns.IN)
        message = yield self.queryUDP([query], timeout)
        if message.trunc:
            message = yield self.queryTCP([query], timeout[-1])
        records = [a for a in message.answers if a.type == qtype]
        return Answer(message.rCode, bool(message.authenticData), records)


@dataclass(frozen=True)
class Answer:
    rcode: int
    secure: bool  # the resolver set AD
    records: list[Any]


@dataclass(frozen=True)
class DanePolicy:
    """A host's secure TLSA RRset: TLS is required, authenticated by the usable records."""

    host: str
    base: str  # the TLSA base domain (the MX host name): the reference identifier
    records: tuple[TLSA, ...]

    @property
    def usable(self) -> tuple[TLSA, ...]:
        return usable(self.records)

    @property
    def authenticated(self) -> bool:
        """False: no usable record, TLS is required without authentication (§2.2)."""
        return bool(self.usable)

    @property
    def policy_string(self) -> tuple[str, ...]:
        return tuple(str(r) for r in self.records)


@dataclass(frozen=True)
class DaneLookupFailed:
    """The DANE lookups for a host failed: the host is not used now (RFC 8460's result)."""

    host: str
    result_type: str
    detail: str


def _rdata(header: dns.RRHeader) -> bytes:
    """A record's RDATA: twisted.names reads TLSA as an UnknownRecord, but a later version's
    own TLSA class encodes to the same bytes."""
    out = BytesIO()
    header.payload.encode(out)
    return out.getvalue()


def decide_host(host: MXHost, addresses: Sequence[Answer], tlsa: Answer | None) -> Any:
    """Pure: the decision for a host of a secure MX RRset from its answers.

    ``addresses``: the AAAA and A answers; ``tlsa``: the TLSA answer, None when it could not
    be had (no answer, or a failure).  A DanePolicy, a DaneLookupFailed, or None for "DANE
    does not apply" (the normal TLS policy)."""
    if any(a.rcode == dns.ESERVER for a in addresses):
        return DaneLookupFailed(host.name, "dnssec-invalid",
                                f"the address lookup of {host.name} failed (SERVFAIL)")
    if not all(a.secure for a in addresses):
        return None  # insecure addresses: DANE does not apply (§2.2.2)
    if tlsa is None or tlsa.rcode not in (dns.OK, dns.ENAME):
        return DaneLookupFailed(host.name, "dnssec-invalid",
                                f"the TLSA lookup for {host.name} failed")
    if not tlsa.records or not tlsa.secure:
        return None  # no TLSA records, or insecure ones
    parsed = tuple(r for r in (parse_tlsa(_rdata(h)) for h in tlsa.records) if r is not None)
    if not parsed:
        return DaneLookupFailed(host.name, "tlsa-invalid", f"malformed TLSA records for {host.name}")
    return DanePolicy(host.name, host.name, parsed)


class DaneLookup:
    """The DANE decision for each MX host of a destination (one per relayer)."""

    def __init__(self, resolver: SecureResolver, port: int, timeout: Sequence[int]) -> None:
        self.resolver = resolver
        self.port = port
        self.timeout = tuple(timeout)

    @defer.inlineCallbacks
    def mx_secure(self, domain: str) -> Any:
        """Whether the domain's MX RRset (or its absence) is DNSSEC-secure."""
        try:
            answer = yield self.resolver.answer(domain, dns.MX, self.timeout)
        except Exception:
            return False
        return answer.secure and answer.rcode == dns.OK

    @defer.inlineCallbacks
    def plan(self, domain: str, hosts: Sequence[MXHost]) -> Any:
        """{host name: decision} for a destination's hosts (see :func:`decide_host`); empty
        when its MX RRset is not secure (no DANE for any of them)."""
        if not (yield self.mx_secure(domain)):
            return {}
        decisions = {}
        for host in hosts:
            decisions[host.name] = yield self.for_host(host)
        return decisions

    @defer.inlineCallbacks
    def for_host(self, host: MXHost) -> Any:
        """The decision for one host of a destination whose MX RRset is secure."""
        if host.name.startswith("["):
            return None
        addresses = []
        for qtype in (dns.AAAA, dns.A):
            try:
                addresses.append((yield self.resolver.answer(host.name, qtype, self.timeout)))
            except Exception:
                addresses.append(Answer(dns.ESERVER, False, []))
        tlsa = None
        if not any(a.rcode == dns.ESERVER for a in addresses) and all(a.secure for a in addresses):
            try:
                tlsa = yield self.resolver.answer(f"_{self.port}._tcp.{host.name}", TLSA_TYPE,
                                                  self.timeout)
            except Exception:
                tlsa = None
        return decide_host(host, addresses, tlsa)


def make_secure_resolver(dns_servers: Sequence[tuple[str, int]], reactor: Any = None) -> SecureResolver:
    """The resolver DANE asks: the configured, validating servers only."""
    return SecureResolver(servers=list(dns_servers), reactor=reactor)
