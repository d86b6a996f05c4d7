"""
The TLS a relay session owes a destination beyond ``relay.tls``: MTA-STS (RFC 8461) and the
per-message demands of REQUIRETLS and ``TLS-Required: No`` (RFC 8689).

mailsrv.outbound.destination asks this module three things, so that it stays a loop over
hosts: the policy in force for a domain (:meth:`TLSPlan.policy`), which MX hosts it allows
(:meth:`TLSPlan.allowed`: under ``enforce`` only those the policy names; none at all defers
the mail with 4.7.0), and, per connection, the :class:`HostCheck` the session consults once
TLS is up (or is not).  Each connection made under a policy is logged with
``tls_policy=sts`` and handed to ``on_attempt`` (TLS-RPT's input, RFC 8460).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailsrv import replies
from mailsrv.outbound.danetls import TLSAttempt
from mailsrv.outbound.mtasts.cache import PolicyCache
from mailsrv.outbound.mtasts.policy import ENFORCE
from mailsrv.outbound.mtasts.source import Lookup, PolicySource
from mailsrv.outbound.mtasts.tlscheck import VALIDATION_FAILURE, HostCheck, load_store
from mailsrv.outbound.mx import MXHost
from mailsrv.replies import Reply

__all__ = ["TLSPlan"]

log = Logger(namespace="mailsrv")

NO_POLICY = Lookup(None)


class TLSPlan:
    """One per relayer: its MTA-STS policies (when ``relay.mta_sts``) and trusted CAs."""

    def __init__(self, runtime: Any, trust_root: Any, *,
                 on_attempt: Callable[[TLSAttempt], None] | None = None) -> None:
        relay = runtime.config.relay
        self.store = load_store(relay.tls_ca_file)
        self.on_attempt = on_attempt or (lambda attempt: None)
        # (No resolver: a runtime built without DNS, as some tests build it.)
        self.source = None if not relay.mta_sts or runtime.resolver is None else PolicySource(
            reactor=runtime.reactor, resolver=runtime.resolver,
            cache=PolicyCache(runtime.config.queue.path / "mta-sts"),
            in_thread=runtime.in_thread, trust_root=trust_root, port=relay.mta_sts_port)

    def policy(self, domain: str) -> defer.Deferred:
        """The :class:`Lookup` for a destination domain (no policy when MTA-STS is off); a
        policy that could not be had is passed on as an attempt with no MX host."""
        if self.source is None or domain.startswith("["):
            return defer.succeed(NO_POLICY)

        def report(lookup: Lookup) -> Lookup:
            if lookup.failure is not None:
                policy = lookup.policy
                self.on_attempt(TLSAttempt(
                    "sts", domain, tuple(policy.lines) if policy else (), "", None,
                    lookup.failure.result_type, str(lookup.failure),
                    mx_patterns=policy.mx if policy else ()))
            return lookup
        return self.source.lookup(domain).addCallback(report)

    def allowed(self, domain: str, lookup: Lookup, hosts: Sequence[MXHost],
                exempt: Collection[str] = ()) -> tuple[list[MXHost], Reply | None]:
        """The hosts to try, or the reply for every message when the policy allows none;
        ``exempt``: the names of hosts DANE decides for (RFC 8461 §2: not MTA-STS)."""
        policy = lookup.policy
        if policy is None:
            return list(hosts), None
        matching = [h for h in hosts if h.name in exempt or policy.matches(h.name)]
        for host in hosts:
            if host not in matching:
                attempt = TLSAttempt("sts", domain, tuple(policy.lines), host.name, None,
                                     VALIDATION_FAILURE, "not an mx of the policy",
                                     mx_patterns=policy.mx)
                self.finished(attempt, policy.mode)
                log.warn("mta-sts: {domain}: MX {host} is not in the policy ({mode}){what}",
                         domain=domain, host=host.name, mode=policy.mode,
                         what="; skipped" if policy.mode == ENFORCE else "; used anyway")
        if policy.mode != ENFORCE:
            return list(hosts), None
        if not matching:
            return [], replies.STS_NO_MATCHING_MX.format(
                domain=domain, hosts=", ".join(h.name for h in hosts))
        return matching, None

    def check(self, domain: str, lookup: Lookup, host: MXHost, address: str,
              dane: bool = False) -> HostCheck:
        """``dane``: the handshake is DANE's (mailsrv.outbound.danetls), which fails it
        unless the certificate matches: TLS that gets as far as MAIL is verified."""
        return HostCheck(domain, host.name, address, store=self.store, policy=lookup.policy,
                         dane=dane)

    def connected(self, check: HostCheck, outcome: Any) -> None:
        """After a session: its attempt logged and passed on (only under a policy)."""
        attempt = check.attempt(outcome.greeted, outcome.tls is not None)
        if attempt is not None and check.policy is not None:
            self.finished(attempt, check.policy.mode)

    def finished(self, attempt: TLSAttempt, mode: str) -> None:
        log.info("tls-policy domain={domain} mx={mx}[{ip}] tls_policy={type} mode={mode} "
                 "result={result}", domain=attempt.policy_domain,
                 mx=attempt.mx_host, ip=attempt.ip or "-",
                 type=attempt.policy_type, mode=mode, result=attempt.result_type or "success")
        self.on_attempt(attempt)
