"""
The relayer: a Twisted service that delivers the outbound queue and keeps its state on disk.

The queue's truth is on disk (``mailsrv.queue``); the relayer holds the same envelopes in
memory to decide what is due, and every change it makes (a recipient sent, deferred, bounced;
a message finished) is written back with an atomic replace before the next change of that
message, in order, in the thread pool.  Due recipients are grouped by destination domain (or
all go to the smarthost); each group is one session carrying every due message for that
domain, tried host by host, address by address, until a server answers.

Results per recipient: ``2xx`` sent, ``4xx`` deferred with backoff (bounced once the message
is older than ``queue.max_age``), ``5xx`` bounced.  A bounce (RFC 3464 DSN) is stored before
the recipient is marked bounced; for a message from ``<>`` it goes to the postmaster instead
(once: that notice's own failure is only logged).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, ssl
from twisted.logger import Logger

from mailsrv import bounce, outgoing, queue, relay_outcome
from mailsrv.config import read_smarthost_password
from mailsrv.envelope import QueuedMessage, QueuedRecipient
from mailsrv.maildir import DeliveryError
from mailsrv.mx import DestinationError, MXHost, resolve_destination, resolve_host
from mailsrv.relay_control import ControlChannel
from mailsrv.relay_schedule import Batch, Scheduler
from mailsrv.schedule import RetryPolicy
from mailsrv.smtpclient import RelayClientFactory, Reply, Transaction

__all__ = ["Relayer"]

log = Logger(namespace="mailsrv")

#: DNS timeouts per try, for MX and address lookups.
DNS_TIMEOUT = (2, 5)
SMARTHOST = "[smarthost]"


def _load_trust_root(path: Path | None) -> Any:
    """The CA certificates "verify" trusts: the configured bundle, or the platform's."""
    if path is None:
        return ssl.platformTrust()
    text = Path(path).read_text("ascii")
    marker = "-----BEGIN CERTIFICATE-----"
    pems = [marker + part for part in text.split(marker)[1:]]
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in pems])


class Relayer(service.Service):
    """Delivers queued mail; one instance per server, holding the spool lock's queue."""

    def __init__(self, runtime: Any, rng: random.Random | None = None) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.reactor = runtime.reactor
        self.qdir = Path(self.config.queue.path)
        relay = self.config.relay
        self.policy = RetryPolicy(
            schedule=self.config.queue.retry_schedule,
            max_age=self.config.queue.max_age,
            delay_warning=self.config.queue.delay_warning,
        )
        self.rng = rng or random.Random()
        self.messages: dict[str, QueuedMessage] = {}
        self.loaded = False
        self.scheduler = Scheduler(
            self.reactor, self.messages, key_of=self._key, deliver=self._deliver,
            max_sessions=relay.max_connections,
            max_sessions_per_key=relay.max_connections_per_domain,
            ready=lambda: self.running and self.loaded,
        )
        self.control = ControlChannel(
            self.qdir, self.reactor, self, in_thread=runtime.in_thread, ready=lambda: self.loaded,
        )
        self._writes: dict[str, defer.Deferred] = {}
        self._password = read_smarthost_password(self.config)
        self._opportunistic = ssl.CertificateOptions(verify=False)
        self._trust_root = (
            _load_trust_root(relay.tls_ca_file)
            if relay.tls != "none" or relay.tls_policy or relay.smarthost_user
            else None
        )

    # --- service --------------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        started = time.monotonic()
        d = self.runtime.in_thread(queue.load, self.qdir)
        d.addCallback(self._loaded, started)
        d.addErrback(lambda f: log.failure("cannot load the queue", f))
        self.control.start()

    def stopService(self) -> Any:
        service.Service.stopService(self)
        self.scheduler.stop()
        self.control.stop()
        writes = [d for d in self._writes.values() if not d.called]
        return defer.DeferredList(writes) if writes else None

    def _loaded(self, report: queue.LoadReport, started: float) -> None:
        for name, reason in report.corrupt:
            log.error("queue: moved {name} to corrupt/: {reason}", name=name, reason=reason)
        for name in report.unfinished:
            log.info("queue: removed {name}, left unfinished by a crash (never sent)", name=name)
        for message in report.messages:
            self.messages[message.id] = message
            self.scheduler.push(message)
        self.loaded = True
        log.info(
            "queue loaded: {n} message(s), {r} recipient(s) waiting, in {secs:.2f}s",
            n=len(report.messages), r=sum(len(m.pending) for m in report.messages),
            secs=time.monotonic() - started,
        )
        self.scheduler.wake()

    def add(self, message: QueuedMessage) -> None:
        """A message just entered the queue (it is already durable): deliver it soon."""
        self.messages[message.id] = message
        self.scheduler.push(message)
        self.scheduler.wake()

    def _key(self, recipient: QueuedRecipient) -> str:
        return SMARTHOST if self.config.relay.smarthost else recipient.domain

    # --- one session per destination ----------------------------------------------------

    def _route(self, key: str) -> defer.Deferred:
        resolver = self.runtime.resolver
        if key == SMARTHOST:
            host, _ = self.config.relay.smarthost
            return resolve_host(resolver, host, timeout=DNS_TIMEOUT).addCallback(lambda h: [h])
        return resolve_destination(
            resolver, key, own_names=(self.config.hostname,), timeout=DNS_TIMEOUT, rng=self.rng
        )

    def _tls_for(self, key: str, host: MXHost) -> tuple[Any, bool]:
        """(context, required) for one host of a destination."""
        relay = self.config.relay
        if key == SMARTHOST:
            mode = "verify" if relay.smarthost_user else relay.tls_mode(relay.smarthost[0])
        else:
            mode = relay.tls_mode(key)
        if mode == "none":
            return None, False
        if mode == "verify" and not host.name.startswith("["):
            return ssl.optionsForClientTLS(host.name, trustRoot=self._trust_root), True
        if mode == "verify":
            # An address literal has no name to verify: require TLS at least.
            return self._opportunistic, True
        return self._opportunistic, False

    @defer.inlineCallbacks
    def _deliver(self, key: str, batch: Batch) -> Any:
        """One session's work for one destination: its hosts in order, address by address,
        until a server has answered for every message (results recorded as they come)."""
        relay = self.config.relay
        try:
            hosts = yield self._route(key)
        except DestinationError as e:
            reply = relay_outcome.destination_failed(e, smarthost=key == SMARTHOST)
            for queue_id, addresses in batch:
                self._record(queue_id, {a: reply for a in addresses}, None)
            return
        pending = [(queue_id, addresses) for queue_id, addresses in batch]
        last_problem = "no MX host could be reached"
        port = relay.smarthost[1] if key == SMARTHOST else relay.port
        auth = (relay.smarthost_user, self._password) if key == SMARTHOST and relay.smarthost_user else None
        incoming = self.qdir / "incoming"  # where 7-bit copies are made (emptied at start-up)
        for host in hosts:
            for address in host.addresses:
                transactions = self._transactions(pending)
                if not transactions:
                    return
                tls_context, require_tls = self._tls_for(key, host)
                factory = RelayClientFactory(
                    transactions, identity=self.config.hostname,
                    own_names=(self.config.hostname,), tls_context=tls_context,
                    require_tls=require_tls, auth=auth, timeout=relay.timeout,
                    prepare=lambda t, ok: self.runtime.in_thread(outgoing.prepare, t, ok, incoming),
                )
                self.reactor.connectTCP(address, port, factory, timeout=relay.connect_timeout)
                outcome = yield factory.done
                where = f"{host.name}[{address}]:{port}"
                if outcome.loop:
                    reply = outcome.error
                    for t in transactions:
                        self._record(t.queue_id, {a: reply for a in t.recipients}, where)
                    return
                problem = outcome.error and str(outcome.error) or outcome.reason or "session ended"
                retry_elsewhere = []
                for t in transactions:
                    if t.complete:
                        self._record(t.queue_id, t.results, where, tls=outcome.tls)
                    elif t.attempted:
                        results = relay_outcome.interrupted(t.recipients, t.results, where, problem)
                        self._record(t.queue_id, results, where, tls=outcome.tls)
                    else:
                        retry_elsewhere.append((t.queue_id, t.recipients))
                pending = retry_elsewhere
                if not pending:
                    return
                last_problem = f"{where}: {problem}"
                log.info("relay: {where} failed: {problem}; trying the next address",
                         where=where, problem=problem)
        reply = relay_outcome.unreachable(last_problem)
        for queue_id, addresses in pending:
            self._record(queue_id, {a: reply for a in addresses}, None)

    def _transactions(self, items: Iterable[tuple[str, list[str]]]) -> list[Transaction]:
        transactions = []
        for queue_id, addresses in items:
            message = self.messages.get(queue_id)
            if message is None:
                continue  # deleted meanwhile
            still = [r.address for r in message.pending if r.address in addresses]
            if still:
                transactions.append(Transaction(
                    queue_id=queue_id, sender=message.sender, recipients=still,
                    prefix=message.prefix.encode("ascii"),
                    body_path=queue.body_path(self.qdir, queue_id),
                ))
        return transactions

    # --- results ---------------------------------------------------------------------

    def _record(
        self, queue_id: str, results: dict[str, Reply], where: str | None, tls: str | None = None
    ) -> None:
        """Apply one attempt's results to a message, log them, and write the new state."""
        message = self.messages.get(queue_id)
        if message is None:
            return  # deleted or bounced by the administrator meanwhile
        now = time.time()
        outcome = relay_outcome.apply_results(
            message, results, where=where, now=now, policy=self.policy, rng=self.rng)
        for line in outcome.results:
            log.info(
                "relay id={id} from=<{sender}> to=<{rcpt}> relay={relay} tls={tls} "
                "delay={delay:.1f} tries={tries} status={status} reply=\"{reply}\"",
                id=queue_id, sender=message.sender, rcpt=line.address, relay=where or "none",
                tls=tls or "none", delay=now - message.created, tries=line.attempts,
                status="bounced" if line.status == relay_outcome.EXPIRED else line.status,
                reply=str(line.reply),
            )
        if outcome.changed:
            self._commit(outcome)

    def _commit(self, outcome: relay_outcome.Outcome) -> None:
        """Make a state change durable (bounce first, then state), in order per message."""
        before, after = outcome.before, outcome.message
        reports, warn = list(outcome.reports), list(outcome.warnings)
        if after.done:
            del self.messages[after.id]
        else:
            self.messages[after.id] = after
        if outcome.dropped:
            log.info("bounce id={id}: not sent, the message is the postmaster's notice of a "
                     "failed bounce; dropped for {rcpts}", id=after.id,
                     rcpts=",".join(f"<{r.address}>" for r in outcome.dropped))

        def blocking() -> list[Any]:
            stored = []
            for group in (reports, warn):
                if group:
                    try:
                        stored.append(bounce.notify(self.config, self.runtime.directory, after, group))
                    except bounce.UnroutableBounce as e:
                        log.info("bounce id={id}: not sent: {why}", id=after.id, why=e)
            if after.done:
                queue.remove(self.qdir, after.id)
            else:
                queue.save(self.qdir, after)
            return stored

        def written(stored: list[Any]) -> None:
            kind = "DSN" if after.sender else "double bounce"
            for to, place in stored:
                went = f"{place.queued.id} queued for" if place.queued else "delivered to"
                log.info("bounce id={id}: {kind} {went} <{to}>", id=after.id, kind=kind,
                         went=went, to=to)
                if place.queued is not None:
                    self.add(place.queued)

        def failed(failure: Any) -> None:
            # The bounce or the state could not be stored: keep the recipients queued, so
            # that nothing is lost; they are tried (and bounced) again later.
            log.error("queue id={id}: cannot store the new state: {error}", id=after.id,
                      error=failure.getErrorMessage())
            if failure.check(DeliveryError, OSError):
                restored = relay_outcome.rescheduled(before, time.time() + self.policy.schedule[0])
                self.messages[after.id] = restored
                self.scheduler.push(restored)
                self.scheduler.wake(self.policy.schedule[0])
            else:
                return failure

        previous = self._writes.get(after.id, defer.succeed(None))
        d = previous.addBoth(lambda _: self.runtime.in_thread(blocking))
        d.addCallbacks(written, failed)
        self._writes[after.id] = d

        def forget(result: Any) -> Any:
            if self._writes.get(after.id) is d:
                del self._writes[after.id]
            return result

        d.addBoth(forget)

    # --- what mailsrv queue asks (relay_control.QueueActions) ---------------------------------

    def flush(self, queue_ids: list[str]) -> None:
        """Every recipient still queued of these messages due now."""
        now = time.time()
        for queue_id in queue_ids:
            self.messages[queue_id] = relay_outcome.rescheduled(self.messages[queue_id], now)
            self.scheduler.push(self.messages[queue_id])
        self.scheduler.wake()

    def delete(self, queue_id: str) -> defer.Deferred:
        """Forget the message, and remove its files once its pending writes are done."""
        del self.messages[queue_id]
        d = self._writes.get(queue_id, defer.succeed(None))
        return d.addBoth(lambda _: self.runtime.in_thread(queue.remove, self.qdir, queue_id))

    def bounce(self, queue_id: str) -> defer.Deferred:
        """Bounce every recipient still queued; fires once the DSN and the state are stored."""
        self._commit(relay_outcome.bounced_by_administrator(self.messages[queue_id]))
        return self._writes.get(queue_id, defer.succeed(None))
