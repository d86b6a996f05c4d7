"""
The DNS blocklist and allowlist lookups of a client address: every zone asked at once through
the server's ``twisted.names`` resolver (relay.dns_servers), each answer within ``timeout``,
the result cached for a few minutes and shared by the connections that wait for it (a client
opening ten connections is looked up once).  A zone that does not answer in time, or fails,
lists nobody: a blocklist outage must not stop the mail.  The verdict is
mailsrv.checks.dnsbl's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error

from mailsrv.checks.dnsbl import Listing, is_listing_answer, query_name, score

__all__ = ["Blocklists"]

log = Logger(namespace="mailsrv")

#: Seconds a client's listing is reused (lists update every few minutes).
CACHE_SECONDS = 300.0
#: Addresses remembered at most (the oldest go first).
CACHE_SIZE = 10_000


class Blocklists:
    """Looks client addresses up in the configured zones."""

    def __init__(
        self, resolver: Any, clock: Any, zones: Mapping[str, int],
        allow_zones: Sequence[str] = (), timeout: float = 5.0,
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.zones = dict(zones)
        self.allow_zones = tuple(allow_zones)
        self.timeout = timeout
        self._cache: OrderedDict[str, tuple[float, Listing]] = OrderedDict()
        self._pending: dict[str, list[defer.Deferred]] = {}

    def lookup(self, ip: str) -> defer.Deferred:
        """A Deferred firing with the address's Listing (never failing)."""
        cached = self._cache.get(ip)
        if cached is not None and cached[0] > self.clock.seconds():
            return defer.succeed(cached[1])
        d: defer.Deferred = defer.Deferred()
        if ip in self._pending:
            self._pending[ip].append(d)
            return d
        self._pending[ip] = [d]
        self._ask(ip).addBoth(self._done, ip)
        return d

    @defer.inlineCallbacks
    def _ask(self, ip: str) -> Any:
        allow, block = yield defer.gatherResults([
            defer.gatherResults([self._listed(ip, zone) for zone in self.allow_zones]),
            defer.gatherResults([self._listed(ip, zone) for zone in self.zones]),
        ])
        allowed_by = next((z for z, hit in zip(self.allow_zones, allow) if hit), None)
        return score(self.zones, [z for z, hit in zip(self.zones, block) if hit], allowed_by)

    @defer.inlineCallbacks
    def _listed(self, ip: str, zone: str) -> Any:
        name = query_name(ip, zone)
        try:
            answers, _, _ = yield self.resolver.lookupAddress(name, timeout=(self.timeout,))
        except error.DNSNameError:
            return False  # NXDOMAIN: not listed
        except Exception as exc:  # a timeout, SERVFAIL, a refused query: lists nobody
            log.info("dnsbl lookup failed zone={zone} client={ip}: {error}", zone=zone, ip=ip,
                     error=type(exc).__name__)
            return False
        addresses = [a.payload.dottedQuad() for a in answers if a.type == dns.A]
        if addresses and not is_listing_answer(addresses):
            log.warn("dnsbl zone={zone} answered {answers} for client={ip}: an error code, not "
                     "a listing (does the zone refuse this resolver?)", zone=zone, ip=ip,
                     answers=",".join(addresses))
        return is_listing_answer(addresses)

    def _done(self, result: Any, ip: str) -> None:
        if not isinstance(result, Listing):  # not expected: every zone's failure is caught
            log.failure("dnsbl lookup of {ip}", result, ip=ip)
            result = Listing()
        self._cache[ip] = (self.clock.seconds() + CACHE_SECONDS, result)
        self._cache.move_to_end(ip)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        for d in self._pending.pop(ip, []):
            if not d.called:  # a connection that went away cancelled its wait
                d.callback(result)
