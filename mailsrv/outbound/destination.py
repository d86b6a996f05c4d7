"""
Delivering to one destination: its hosts, the TLS each gets, and trying them in turn.

A destination is a domain (its MX hosts, or its implicit MX) or, with ``relay.smarthost``,
the smarthost for every domain.  One session carries every due message for it, tried host by
host, address by address, until a server answers: a transaction that never reached
``MAIL FROM`` moves on to the next address, one the server had started on is deferred (the
remote side may have it), and a greeting that names ourselves is a mail loop.

TLS follows ``relay.tls`` / ``relay.tls_policy`` per destination: ``none``, opportunistic
(any certificate, plain text if STARTTLS is not offered), or ``verify`` (the host's name
checked against the trusted CAs, TLS required); a smarthost with a login is always
``verify``, so the password never goes out in the clear or to an impostor.  With
``relay.dane``, an MX host with DNSSEC-secure TLSA records gets DANE instead (RFC 7672:
mailsrv.outbound.danelookup decides, mailsrv.outbound.danetls checks the handshake), unless
the domain's policy is ``none``; a DANE failure defers (4.7.5), never sends in clear.
Without DANE for a host, mailsrv.outbound.tlsplan adds a domain's MTA-STS policy
(``enforce``: only the MX hosts it names, only with a valid certificate, else deferred);
REQUIRETLS messages go only over verified TLS (else bounced when no host will do), and
``TLS-Required: No`` ones in a session of their own, opportunistic whatever the policy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer, ssl
from twisted.logger import Logger

from mailsrv import replies
from mailsrv.config import read_smarthost_password
from mailsrv.outbound import outcome as relay_outcome
from mailsrv.outbound import outgoing
from mailsrv.outbound.danelookup import DaneLookup, DaneLookupFailed, make_secure_resolver
from mailsrv.outbound.danetls import DaneTLS, TLSAttempt
from mailsrv.outbound.lmtpclient import LMTPClientFactory
from mailsrv.outbound.mtasts.tlscheck import handshake_options
from mailsrv.outbound.mx import DestinationError, MXHost, resolve_destination, resolve_host
from mailsrv.outbound.scheduler import Batch
from mailsrv.outbound.smtpclient import RelayClientFactory
from mailsrv.outbound.tlsplan import NO_POLICY, TLSPlan
from mailsrv.outbound.tlsrpt.results import record_session as record_tls_session
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.replies import Reply
from mailsrv.storage.envelope import QueuedRecipient

__all__ = ["LMTP", "SMARTHOST", "DNS_TIMEOUT", "Record", "DestinationDelivery"]

log = Logger(namespace="mailsrv")

#: DNS timeouts per try, for MX and address lookups.
DNS_TIMEOUT = (2, 5)
#: The destination key of every recipient when a smarthost is configured.
SMARTHOST = "[smarthost]"
#: The destination key of local recipients with ``[mailboxes] delivery = "lmtp:..."``.
LMTP = "[lmtp]"

class Record(Protocol):
    """Told one message's results, and where they came from (None: no server answered)."""

    def __call__(
        self, queue_id: str, results: dict[str, Reply], where: str | None, tls: str | None = None,
        dsn: bool = False, tls_policy: str | None = None,
    ) -> None: ...


def load_trust_root(path: Path | None) -> Any:
    """The CA certificates "verify" trusts: the configured bundle, or the platform's."""
    if path is None:
        return ssl.platformTrust()
    text = Path(path).read_text("ascii")
    marker = "-----BEGIN CERTIFICATE-----"
    pems = [marker + part for part in text.split(marker)[1:]]
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in pems])


class DestinationDelivery:
    """Routes and delivers the relayer's sessions (one instance per relayer)."""

    def __init__(self, runtime: Any, rng: Any) -> None:
        """``runtime`` gives the configuration, the reactor, the resolver and the threads."""
        self.runtime = runtime
        self.config = runtime.config
        self.reactor = runtime.reactor
        self.rng = rng
        self.qdir = Path(self.config.queue.path)
        relay = self.config.relay
        self._password = read_smarthost_password(self.config)
        self._opportunistic = ssl.CertificateOptions(verify=False)
        self._trust_root = (
            load_trust_root(relay.tls_ca_file)
            if relay.tls != "none" or relay.tls_policy or relay.smarthost_user or relay.mta_sts
            else None
        )
        self.tls_plan = TLSPlan(runtime, self._trust_root,  # MTA-STS, REQUIRETLS
                                on_attempt=lambda a: [f(a) for f in self.tls_attempts])
        self._dane = (
            DaneLookup(make_secure_resolver(relay.dns_servers, self.reactor), relay.port,
                       DNS_TIMEOUT)
            if relay.dane else None
        )
        #: Told each TLSAttempt under a DANE or MTA-STS policy (TLS-RPT's source), once logged.
        self.tls_attempts: list[Callable[[TLSAttempt], None]] = []

    def key(self, recipient: QueuedRecipient) -> str:
        """The recipient's destination: Dovecot's LMTP for a local one (with LMTP delivery,
        the only way local recipients enter the queue), else its domain, or the smarthost
        for all."""
        if self.config.mailboxes.delivery is not None and \
                recipient.domain.lower() in self.config.domains.local:
            return LMTP
        return SMARTHOST if self.config.relay.smarthost else recipient.domain

    def route(self, key: str) -> defer.Deferred:
        """The destination's hosts, in the order to try them (mailsrv.outbound.mx), or a
        DestinationError."""
        resolver = self.runtime.resolver
        if key == SMARTHOST:
            host, _ = self.config.relay.smarthost
            return resolve_host(resolver, host, timeout=DNS_TIMEOUT).addCallback(lambda h: [h])
        return resolve_destination(
            resolver, key, own_names=(self.config.hostname,), timeout=DNS_TIMEOUT, rng=self.rng
        )

    def tls_for(self, key: str, host: MXHost, *, enforce: bool = False, requiretls: bool = False,
                opt_out: bool = False) -> tuple[Any, bool]:
        """(context, required) for one host of a destination; ``enforce``: an MTA-STS policy
        (the certificate is checked after the handshake), ``requiretls``: STARTTLS even with
        ``none``, ``opt_out``: TLS-Required: No (opportunistic, but never for a login)."""
        relay = self.config.relay
        if key == SMARTHOST:
            mode = "verify" if relay.smarthost_user else relay.tls_mode(relay.smarthost[0])
        else:
            mode = relay.tls_mode(key)
        if opt_out and not (key == SMARTHOST and relay.smarthost_user):
            mode = "opportunistic"
        if enforce and mode != "verify":
            return handshake_options(), True
        if mode == "none":
            return (self._opportunistic, False) if requiretls else (None, False)
        if mode == "verify" and not host.name.startswith("["):
            return ssl.optionsForClientTLS(host.name, trustRoot=self._trust_root), True
        if mode == "verify":
            # An address literal has no name to verify: require TLS at least.
            return self._opportunistic, True
        return self._opportunistic, False

    def _dane_plan(self, key: str, hosts: list[MXHost]) -> defer.Deferred:
        """{host name: DanePolicy | DaneLookupFailed | None} (mailsrv.outbound.danelookup)."""
        if self._dane is None or key in (SMARTHOST, LMTP) or self.config.relay.tls_mode(key) == "none":
            return defer.succeed({})
        return self._dane.plan(key, hosts)

    def _tls_attempt(self, attempt: TLSAttempt | None) -> None:
        if attempt is None:
            return
        log.info("dane: {domain} {host}[{ip}] tlsa=\"{tlsa}\" result={result} ({detail})",
                 domain=attempt.policy_domain, host=attempt.mx_host, ip=attempt.ip or "-",
                 tlsa="; ".join(attempt.policy_string), result=attempt.result_type or "success",
                 detail=attempt.detail)
        for listener in self.tls_attempts:
            listener(attempt)

    @defer.inlineCallbacks
    def deliver(
        self,
        key: str,
        batch: Batch,
        make_transactions: Callable[[Batch], list[OutboundTransaction]],
        record: Record,
    ) -> Any:
        """One session's work for one destination: its hosts in order, address by address,
        until a server has answered for every message.

        ``make_transactions`` makes the transactions of what is still to be sent (a message
        deleted or bounced meanwhile drops out); ``record`` is told each message's results
        as soon as a server (or the lack of one) has decided them.
        """
        if key == LMTP:
            yield self._deliver_lmtp(batch, make_transactions, record)
            return
        try:
            hosts = yield self.route(key)
        except DestinationError as e:
            reply = relay_outcome.destination_failed(e, smarthost=key == SMARTHOST)
            for queue_id, addresses in batch:
                record(queue_id, {a: reply for a in addresses}, None)
            return
        lookup = NO_POLICY if key == SMARTHOST else (yield self.tls_plan.policy(key))
        relaxed_ids = {t.queue_id for t in make_transactions(list(batch))
                       if t.tls_optional and not t.requiretls}
        if relaxed_ids:  # TLS-Required: No (RFC 8689 §5): neither DANE nor MTA-STS applies
            yield self._deliver_hosts(key, hosts, [b for b in batch if b[0] in relaxed_ids],
                                      NO_POLICY, {}, make_transactions, record, opt_out=True)
        strict = [b for b in batch if b[0] not in relaxed_ids]
        if not strict:
            return
        dane_plan = yield self._dane_plan(key, hosts)
        # RFC 8461 §2: a host with TLSA records gets DANE, not MTA-STS.
        hosts, refusal = self.tls_plan.allowed(
            key, lookup, hosts, exempt={n for n, p in dane_plan.items() if p is not None})
        if refusal is not None:
            for queue_id, addresses in strict:
                record(queue_id, {a: refusal for a in addresses}, None, tls_policy="sts")
            return
        yield self._deliver_hosts(key, hosts, strict, lookup, dane_plan, make_transactions, record)

    @defer.inlineCallbacks
    def _deliver_hosts(
        self,
        key: str,
        hosts: list[MXHost],
        batch: Batch,
        lookup: Any,
        dane_plan: dict[str, Any],
        make_transactions: Callable[[Batch], list[OutboundTransaction]],
        record: Record,
        opt_out: bool = False,
    ) -> Any:
        """The destination's hosts in order, address by address, until a server answered."""
        relay = self.config.relay
        pending = [(queue_id, addresses) for queue_id, addresses in batch]
        last_problem = "no MX host could be reached"
        dane_failed = False  # the last problem was DANE's: 4.7.5
        skipped: dict[str, Reply] = {}  # REQUIRETLS messages no host took so far, and why
        all_greeted = True  # else a host not reached might yet take them: not a bounce
        refusal: Reply | None = None  # the last MTA-STS verdict that ended a session
        port = relay.smarthost[1] if key == SMARTHOST else relay.port
        auth = None
        if key == SMARTHOST and relay.smarthost_user:
            auth = (relay.smarthost_user, self._password)
        incoming = self.qdir / "incoming"  # where 7-bit copies are made (emptied at start-up)
        for host in hosts:
            dane = dane_plan.get(host.name)
            if isinstance(dane, DaneLookupFailed):
                self._tls_attempt(TLSAttempt("tlsa", key, (), host.name, None, dane.result_type,
                                             dane.detail))
                last_problem, dane_failed = f"DANE: {dane.detail}", True
                continue
            for address in host.addresses:
                transactions = make_transactions(pending)
                if not transactions:
                    return
                dane_tls = DaneTLS(dane, key, address) if dane is not None else None
                check = self.tls_plan.check(key, NO_POLICY if dane_tls else lookup, host, address,
                                            dane=dane_tls is not None)
                if dane_tls is not None:
                    tls_context, require_tls = dane_tls, True
                else:
                    tls_context, require_tls = self.tls_for(
                        key, host, enforce=check.enforce, opt_out=opt_out,
                        requiretls=any(t.requiretls for t in transactions))
                factory = RelayClientFactory(
                    transactions, identity=self.config.hostname,
                    own_names=(self.config.hostname,), tls_context=tls_context,
                    require_tls=require_tls, auth=auth, timeout=relay.timeout,
                    prepare=lambda t, ok: self.runtime.in_thread(outgoing.prepare, t, ok, incoming),
                    tls_check=check,
                )
                self.reactor.connectTCP(address, port, factory, timeout=relay.connect_timeout)
                outcome = yield factory.done
                self.tls_plan.connected(check, outcome)
                refusal = check.refusal or refusal
                all_greeted = all_greeted and outcome.greeted
                if outcome.tls:
                    self.runtime.metrics.tls("outbound", outcome.tls)
                if (dane_tls is None and check.policy is None and tls_context is not None
                        and key != SMARTHOST):  # TLS-RPT; DANE's and MTA-STS's: tls_attempts
                    record_tls_session(getattr(self.runtime, "tls_counts", None), key,
                                       host.name, address, outcome)
                where = f"{host.name}[{address}]:{port}"
                attempt = dane_tls.result(outcome.greeted) if dane_tls is not None else None
                self._tls_attempt(attempt)
                policy = ({"tls_policy": "dane"} if dane_tls is not None
                          else {"tls_policy": "sts"} if check.policy is not None else {})
                if outcome.loop:
                    reply = outcome.error
                    for t in transactions:
                        record(t.queue_id, {a: reply for a in t.recipients}, where)
                    return
                problem = outcome.error and str(outcome.error) or outcome.reason or "session ended"
                retry_elsewhere = []
                for t in transactions:
                    if t.complete:
                        record(t.queue_id, t.results, where, tls=outcome.tls, dsn=outcome.dsn,
                               **policy)
                    elif t.attempted:
                        results = relay_outcome.interrupted(t.recipients, t.results, where, problem)
                        record(t.queue_id, results, where, tls=outcome.tls, **policy)
                    else:
                        if t.refused is not None:
                            skipped[t.queue_id] = t.refused
                        retry_elsewhere.append((t.queue_id, t.recipients))
                pending = retry_elsewhere
                if not pending:
                    return
                dane_failed = attempt is not None and attempt.result_type is not None
                if dane_failed:
                    problem = f"DANE: {attempt.result_type}: {attempt.detail}"
                last_problem = f"{where}: {problem}"
                log.info("relay: {where} failed: {problem}; trying the next address",
                         where=where, problem=problem)
        if dane_failed:
            reply, policy = replies.DANE_FAILED.format(problem=last_problem), {"tls_policy": "dane"}
        elif refusal is not None:
            reply, policy = refusal, {"tls_policy": "sts"}
        else:
            reply, policy = relay_outcome.unreachable(last_problem), {}
        for queue_id, addresses in pending:
            final = skipped.get(queue_id, reply) if all_greeted else reply
            record(queue_id, {a: final for a in addresses}, None, **policy)


    @defer.inlineCallbacks
    def _deliver_lmtp(
        self,
        batch: Batch,
        make_transactions: Callable[[Batch], list[OutboundTransaction]],
        record: Record,
    ) -> Any:
        """One LMTP session with Dovecot for the batch: per-recipient replies recorded as a
        relay's are (4xx and a Dovecot that cannot be reached: retried; 5xx: bounced)."""
        target = self.config.mailboxes.delivery
        assert target is not None
        transactions = make_transactions(list(batch))
        if not transactions:
            return
        factory = LMTPClientFactory(transactions, identity=self.config.hostname,
                                    timeout=self.config.relay.timeout)
        timeout = self.config.relay.connect_timeout
        if target.path is not None:
            self.reactor.connectUNIX(str(target.path), factory, timeout=timeout)
        else:
            self.reactor.connectTCP(target.host, target.port, factory, timeout=timeout)
        outcome = yield factory.done
        where = str(target)
        problem = outcome.error and str(outcome.error) or outcome.reason or "session ended"
        for t in transactions:
            if t.complete:
                record(t.queue_id, t.results, where)
            elif t.attempted:
                record(t.queue_id, relay_outcome.interrupted(t.recipients, t.results, where,
                                                             problem), where)
            else:
                reply = relay_outcome.unreachable(f"{where}: {problem}")
                record(t.queue_id, {a: reply for a in t.recipients}, None)
