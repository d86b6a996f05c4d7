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

import heapq
import itertools
import random
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, ssl, task
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv import bounce, outgoing, queue, queue_control
from mailsrv.config import read_smarthost_password
from mailsrv.dsn import RecipientReport
from mailsrv.durable import DeliveryError
from mailsrv.envelope import BOUNCED, QUEUED, SENT, QueuedMessage, QueuedRecipient
from mailsrv.interfaces import IRelayer
from mailsrv.mx import DestinationError, MXHost, resolve_destination, resolve_host
from mailsrv.replies import Reply
from mailsrv.schedule import RetryPolicy
from mailsrv.smtpclient import RelayClientFactory, Transaction

__all__ = ["Relayer"]

log = Logger(namespace="mailsrv")

#: Messages carried by one session before it ends (the next session takes the rest).
MESSAGES_PER_SESSION = 100
#: Seconds between looks into queue/control/ for requests of ``mailsrv queue``.
CONTROL_POLL = 1.0
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


@implementer(IRelayer)
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
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._in_flight: set[tuple[str, str]] = set()
        self._waiting: dict[str, deque[tuple[str, list[str]]]] = defaultdict(deque)
        self._sessions: dict[str, int] = defaultdict(int)
        self._total_sessions = 0
        self._writes: dict[str, defer.Deferred] = {}
        self._timer: Any = None
        self._control: task.LoopingCall | None = None
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
        self._control = task.LoopingCall(self._poll_control)
        self._control.clock = self.reactor
        self._control.start(CONTROL_POLL, now=False).addErrback(
            lambda f: log.failure("queue control polling stopped", f)
        )

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._control is not None and self._control.running:
            self._control.stop()
        writes = [d for d in self._writes.values() if not d.called]
        return defer.DeferredList(writes) if writes else None

    def _loaded(self, report: queue.LoadReport, started: float) -> None:
        for name, reason in report.corrupt:
            log.error("queue: moved {name} to corrupt/: {reason}", name=name, reason=reason)
        for name in report.unfinished:
            log.info("queue: removed {name}, left unfinished by a crash (never sent)", name=name)
        for message in report.messages:
            self.messages[message.id] = message
            self._push(message)
        self.loaded = True
        log.info(
            "queue loaded: {n} message(s), {r} recipient(s) waiting, in {secs:.2f}s",
            n=len(report.messages), r=sum(len(m.pending) for m in report.messages),
            secs=time.monotonic() - started,
        )
        self._wake()

    # --- what is due ---------------------------------------------------------------

    def add(self, message: QueuedMessage) -> None:
        """A message just entered the queue (it is already durable): deliver it soon."""
        self.messages[message.id] = message
        self._push(message)
        self._wake()

    def _push(self, message: QueuedMessage) -> None:
        times = [
            r.next_attempt for r in message.pending if (message.id, r.address) not in self._in_flight
        ]
        if times:
            heapq.heappush(self._heap, (min(times), next(self._seq), message.id))

    def _wake(self, delay: float = 0.0) -> None:
        if not self.running or not self.loaded:
            return
        when = self.reactor.seconds() + delay
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        now = time.time()
        seen: set[str] = set()
        while self._heap and self._heap[0][0] <= now:
            _, _, queue_id = heapq.heappop(self._heap)
            message = self.messages.get(queue_id)
            if message is None or queue_id in seen:
                continue
            seen.add(queue_id)
            by_key: dict[str, list[str]] = defaultdict(list)
            for r in message.pending:
                if (queue_id, r.address) in self._in_flight:
                    continue
                if r.next_attempt <= now:
                    by_key[self._key(r)].append(r.address)
            for key, addresses in by_key.items():
                self._in_flight.update((queue_id, a) for a in addresses)
                self._waiting[key].append((queue_id, addresses))
            self._push(message)  # its later recipients, if any
        self._dispatch()
        if self._heap:
            self._wake(max(0.0, self._heap[0][0] - time.time()))

    def _key(self, recipient: QueuedRecipient) -> str:
        return SMARTHOST if self.config.relay.smarthost else recipient.domain

    def _dispatch(self) -> None:
        relay = self.config.relay
        for key, waiting in list(self._waiting.items()):
            while (
                waiting
                and self._total_sessions < relay.max_connections
                and self._sessions[key] < relay.max_connections_per_domain
            ):
                batch = [waiting.popleft() for _ in range(min(MESSAGES_PER_SESSION, len(waiting)))]
                self._sessions[key] += 1
                self._total_sessions += 1
                d = self._deliver(key, batch)
                d.addErrback(lambda f: log.failure("relay session failed", f))
                d.addBoth(self._session_ended, key, batch)
            if not waiting:
                del self._waiting[key]

    def _session_ended(self, _: Any, key: str, batch: list[tuple[str, list[str]]]) -> None:
        self._sessions[key] -= 1
        if not self._sessions[key]:
            del self._sessions[key]
        self._total_sessions -= 1
        for queue_id, addresses in batch:
            self._in_flight.difference_update((queue_id, a) for a in addresses)
            message = self.messages.get(queue_id)
            if message is not None:
                self._push(message)
        self._dispatch()
        self._wake()

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
    def _deliver(self, key: str, batch: list[tuple[str, list[str]]]) -> Any:
        relay = self.config.relay
        try:
            hosts = yield self._route(key)
        except DestinationError as e:
            # A smarthost that does not resolve is our configuration's fault: mail waits.
            permanent = e.permanent and key != SMARTHOST
            status = e.status if permanent or e.status[0] == "4" else "4" + e.status[1:]
            reply = Reply(550 if permanent else 451, status, e.text)
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
                        deferred = Reply(451, "4.4.2", f"{where}: {problem}")
                        results = dict(t.results)
                        for a in t.recipients:
                            results.setdefault(a, deferred)
                        self._record(t.queue_id, results, where, tls=outcome.tls)
                    else:
                        retry_elsewhere.append((t.queue_id, t.recipients))
                pending = retry_elsewhere
                if not pending:
                    return
                last_problem = f"{where}: {problem}"
                log.info("relay: {where} failed: {problem}; trying the next address",
                         where=where, problem=problem)
        reply = Reply(451, "4.4.1", last_problem)
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
        current = {r.address: r for r in message.recipients}
        changed: dict[str, QueuedRecipient] = {}
        reports: list[RecipientReport] = []
        remote_host = where.split("[", 1)[0] if where else None
        for address, reply in results.items():
            r = current.get(address)
            if r is None or r.status != QUEUED:
                continue
            attempts = r.attempts + 1
            base = replace(r, attempts=attempts, last_attempt=now, remote_mta=remote_host,
                           last_error=None if reply.success else str(reply))
            if reply.success:
                changed[address] = replace(base, status=SENT)
                status = "sent"
            elif reply.permanent:
                changed[address] = replace(base, status=BOUNCED)
                reports.append(self._report(base, reply, reply.status, str(reply)))
                status = "bounced"
            else:
                retry = self.policy.next_attempt(message.created, now, attempts, self.rng)
                if retry is None:
                    changed[address] = replace(base, status=BOUNCED)
                    days = self.config.queue.max_age / 86400
                    reports.append(self._report(
                        base, reply, "4.4.7",
                        f"message expired after {days:g} day(s) in the queue;"
                        f" last error: {reply}",
                    ))
                    status = "expired"
                else:
                    changed[address] = replace(base, next_attempt=retry)
                    status = "deferred"
            log.info(
                "relay id={id} from=<{sender}> to=<{rcpt}> relay={relay} tls={tls} "
                "delay={delay:.1f} tries={tries} status={status} reply=\"{reply}\"",
                id=queue_id, sender=message.sender, rcpt=address, relay=where or "none",
                tls=tls or "none", delay=now - message.created, tries=attempts,
                status="bounced" if status == "expired" else status, reply=str(reply),
            )
        if not changed:
            return
        updated = message.update(changed)
        warn = []
        if self.policy.warn_due(updated.created, now, updated.warned) and updated.pending:
            if updated.sender:
                until = self.policy.expires(updated.created)
                warn = [RecipientReport(
                    address=r.address, action="delayed", status=_status_of(r.last_error),
                    diagnostic=r.last_error, remote_mta=r.remote_mta, last_attempt=r.last_attempt,
                    will_retry_until=until,
                ) for r in updated.pending]
            updated = replace(updated, warned=True)
        self._commit(message, updated, reports, warn)

    def _report(self, r: QueuedRecipient, reply: Reply, status: str, text: str) -> RecipientReport:
        return RecipientReport(
            address=r.address, action="failed", status=status, diagnostic=text,
            remote_mta=r.remote_mta, last_attempt=r.last_attempt,
        )

    def _commit(
        self,
        before: QueuedMessage,
        after: QueuedMessage,
        reports: list[RecipientReport],
        warn: list[RecipientReport],
    ) -> None:
        """Make a state change durable (bounce first, then state), in order per message."""
        if after.done:
            del self.messages[after.id]
        else:
            self.messages[after.id] = after
        if reports and after.double_bounce:
            log.info("bounce id={id}: not sent, the message is the postmaster's notice of a "
                     "failed bounce; dropped for {rcpts}", id=after.id,
                     rcpts=",".join(f"<{r.address}>" for r in reports))
            reports = []

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
                retry = time.time() + self.policy.schedule[0]
                restored = before.update({
                    r.address: replace(r, next_attempt=retry) for r in before.pending
                })
                self.messages[after.id] = restored
                self._push(restored)
                self._wake(self.policy.schedule[0])
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

    # --- mailsrv queue requests -----------------------------------------------------------

    def _poll_control(self) -> None:
        if not self.loaded:
            return
        for request in queue_control.control_requests(self.qdir):
            try:
                text = self._handle(request)
            except Exception as e:  # never let one bad request stop the polling
                text = f"error: {e}"
            if isinstance(text, defer.Deferred):
                text.addCallback(lambda t, r=request: self._answer(r, t))
            else:
                self._answer(request, text)

    def _answer(self, request: queue_control.ControlRequest, text: str) -> None:
        log.info("queue {action} {target}: {answer}", action=request.action,
                 target=request.queue_id or "all", answer=text)
        self.runtime.in_thread(queue_control.control_answer, self.qdir, request, text + "\n")

    def _handle(self, request: queue_control.ControlRequest) -> Any:
        if request.action == "flush":
            ids = [request.queue_id] if request.queue_id else list(self.messages)
            if request.queue_id and request.queue_id not in self.messages:
                return f"error: no message {request.queue_id} in the queue"
            now = time.time()
            for queue_id in ids:
                message = self.messages[queue_id]
                self.messages[queue_id] = message.update({
                    r.address: replace(r, next_attempt=now) for r in message.pending
                })
                self._push(self.messages[queue_id])
            self._wake()
            return f"ok: {len(ids)} message(s) scheduled for delivery now"
        message = self.messages.get(request.queue_id or "")
        if message is None:
            return f"error: no message {request.queue_id} in the queue"
        if request.action == "delete":
            del self.messages[message.id]
            d = self._writes.get(message.id, defer.succeed(None))
            d = d.addBoth(lambda _: self.runtime.in_thread(queue.remove, self.qdir, message.id))
            return d.addCallback(lambda _: f"ok: deleted {message.id}")
        # bounce
        reason = "returned to the sender by the administrator"
        # An administrator's bounce of a bounce tells nobody (the postmaster did it).
        reports = bounce.given_up_reports(message, reason) if message.sender else []
        after = message.update({r.address: replace(r, status=BOUNCED, last_error=reason)
                                for r in message.pending})
        self._commit(message, after, reports, [])
        d = self._writes.get(message.id, defer.succeed(None))
        return d.addCallback(lambda _: f"ok: bounced {message.id}"
                             + ("" if message.sender else " (from <>: no DSN sent)"))


def _status_of(error: str | None) -> str:
    """The enhanced status of a stored error text ("451 4.3.0 ..."), for delay notices."""
    if error:
        reply = Reply.from_wire(int(error[:3]) if error[:3].isdigit() else 451, error[4:])
        if not reply.success:
            return reply.status if reply.status[0] == "4" else "4.0.0"
    return "4.0.0"
