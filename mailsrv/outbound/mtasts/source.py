"""
Which MTA-STS policy applies to a domain now (RFC 8461 §5): the cache, the TXT record and the
fetch together.

- a cached policy that has not expired and whose id the TXT record still names is used as is;
- no TXT record (or a lookup that failed) leaves an unexpired cached policy in force: taking
  the record away, or blocking DNS, must not downgrade a domain that published ``enforce``;
- a new id (or nothing usable cached) fetches the policy; a failed fetch keeps the cached
  one while it lasts, else the domain has no policy;
- the same domain is fetched once at a time (sessions that ask meanwhile share the answer).

The answer says what failed, if anything, for TLS-RPT (``failure``: RFC 8460 result type):
a malformed record or a policy that could not be fetched or used, not a TXT lookup that
failed (that says nothing of whether the domain publishes a policy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailsrv.outbound.mtasts.cache import PolicyCache
from mailsrv.outbound.mtasts.fetch import POLICY_INVALID, FetchError, fetch_policy, lookup_id
from mailsrv.outbound.mtasts.policy import NONE, Policy

__all__ = ["Lookup", "PolicySource"]

log = Logger(namespace="mailsrv")

#: Domains whose policy (or lack of one) is kept in memory; past that, read from disk again.
MAX_REMEMBERED = 10_000


@dataclass(frozen=True)
class Lookup:
    """The policy in force (None: none, or mode ``none``) and what failed on the way."""

    policy: Policy | None
    failure: FetchError | None = None


class PolicySource:
    """The relayer's MTA-STS policies: one instance, its cache in memory and on disk."""

    def __init__(
        self,
        *,
        reactor: Any,
        resolver: Any,
        cache: PolicyCache,
        in_thread: Callable[..., defer.Deferred],
        trust_root: Any,
        port: int = 443,
        dns_timeout: tuple[int, ...] = (2, 5),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reactor, self.resolver, self.cache = reactor, resolver, cache
        self.in_thread, self.trust_root, self.port = in_thread, trust_root, port
        self.dns_timeout, self.clock = dns_timeout, clock
        self._known: dict[str, Policy | None] = {}  # read from disk once per domain
        self._running: dict[str, list[defer.Deferred]] = {}

    def lookup(self, domain: str) -> defer.Deferred:
        """A Deferred firing with the :class:`Lookup` for ``domain`` (never failing)."""
        domain = domain.lower().rstrip(".")
        d: defer.Deferred = defer.Deferred()
        if domain in self._running:
            self._running[domain].append(d)
            return d
        self._running[domain] = [d]

        def done(result: Any) -> None:
            for waiting in self._running.pop(domain, []):
                waiting.callback(result)

        def failed(failure: Any) -> Lookup:
            log.failure("mta-sts: {domain}: lookup failed", failure, domain=domain)
            return Lookup(None, FetchError("sts-policy-fetch-error", failure.getErrorMessage()))

        self._lookup(domain).addErrback(failed).addCallback(done)
        return d

    @defer.inlineCallbacks
    def _lookup(self, domain: str) -> Any:
        if domain not in self._known:
            if len(self._known) >= MAX_REMEMBERED:
                self._known.clear()  # read again from disk when needed: cheap, and bounded
            self._known[domain] = yield self.in_thread(self.cache.load, domain)
        cached = self._known[domain]
        live = cached if cached is not None and not cached.expired(self.clock()) else None
        try:
            policy_id = yield lookup_id(self.resolver, domain, self.dns_timeout)
        except FetchError as e:
            log.info("mta-sts: {domain}: {error}; {what}", domain=domain, error=str(e),
                     what="the cached policy stays" if live else "no policy")
            return _in_force(live, e if e.result_type == POLICY_INVALID else None)
        if policy_id is None or (live is not None and live.id == policy_id):
            return _in_force(live, None)
        try:
            policy = yield fetch_policy(
                self.reactor, self.resolver, domain, policy_id=policy_id,
                trust_root=self.trust_root, port=self.port, dns_timeout=self.dns_timeout,
                clock=self.clock)
        except FetchError as e:
            log.warn("mta-sts: {domain}: policy {id} not fetched ({type}: {error}); {what}",
                     domain=domain, id=policy_id, type=e.result_type, error=str(e),
                     what="the cached policy stays" if live else "no policy")
            return _in_force(live, e)
        try:
            yield self.in_thread(self.cache.store, domain, policy)
        except Exception as e:
            log.warn("mta-sts: {domain}: cannot cache the policy: {error}", domain=domain,
                     error=str(e))
        self._known[domain] = policy
        log.info("mta-sts: {domain}: policy {id} fetched: mode={mode} max_age={max_age} "
                 "mx={mx}", domain=domain, id=policy_id, mode=policy.mode,
                 max_age=policy.max_age, mx=",".join(policy.mx))
        return _in_force(policy, None)


def _in_force(policy: Policy | None, failure: FetchError | None) -> Lookup:
    """Mode ``none`` is no policy (it only replaces an older one in the cache)."""
    return Lookup(None if policy is None or policy.mode == NONE else policy, failure)
