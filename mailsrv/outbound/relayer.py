"""
The relayer: a Twisted service that delivers the outbound queue and keeps its state on disk.

The queue's truth is on disk (``mailsrv.storage.queue``); the relayer holds the same envelopes in
memory and writes every change back (a recipient sent, deferred, bounced; a message finished)
with an atomic replace before the next change of that message, in order, in the thread pool.
A bounce (RFC 3464 DSN) is stored before the recipient is marked bounced, so a crash in
between can repeat a bounce but never lose one; for a message from ``<>`` it goes to the
postmaster instead (once: that notice's own failure is only logged).  When the disk refuses,
the recipients stay queued and are tried again after the first retry delay.

The service ties four parts together, each in its own module:

- ``relay_schedule.Scheduler``: what is due, grouped by destination, within the session limits;
- ``relay_destination.DestinationDelivery``: one session's hosts, TLS, and host-by-host tries;
- ``relay_outcome``: what the replies do to the message (sent, retry, bounce, expiry, delay
  warning), pure;
- ``relay_control.ControlChannel``: the requests of ``mailsrv queue`` in ``<queue>/control/``,
  which it carries out through :meth:`Relayer.flush`, :meth:`Relayer.delete` and
  :meth:`Relayer.bounce`.

The rest of the server only calls :meth:`Relayer.add` (a message just queued) and runs it as a
service.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.interfaces import IRelayer
from mailsrv.metrics import destination_class
from mailsrv.outbound import bounce
from mailsrv.outbound import outcome as relay_outcome
from mailsrv.outbound.control import ControlChannel
from mailsrv.outbound.destination import DestinationDelivery
from mailsrv.outbound.retry import RetryPolicy
from mailsrv.outbound.scheduler import Batch, Scheduler
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.replies import Reply
from mailsrv.routing.dsn_params import mail_arguments, rcpt_arguments
from mailsrv.storage import queue, queue_scan
from mailsrv.storage.durable import DeliveryError
from mailsrv.storage.envelope import QueuedMessage

__all__ = ["Relayer"]

log = Logger(namespace="mailsrv")

#: How many of the last finished messages' ids the relayer remembers (``Relayer.add``).
FINISHED_REMEMBERED = 4096


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
        self.destinations = DestinationDelivery(runtime, self.rng)
        self.scheduler = Scheduler(
            self.reactor, self.messages, key_of=self.destinations.key, deliver=self._deliver,
            max_sessions=relay.max_connections,
            max_sessions_per_key=relay.max_connections_per_domain,
            ready=lambda: self.running and self.loaded,
        )
        self.control = ControlChannel(
            self.qdir, self.reactor, self, in_thread=runtime.in_thread, ready=lambda: self.loaded,
        )
        self._writes: dict[str, defer.Deferred] = {}
        self._finished: set[str] = set()
        self._finished_order: collections.deque[str] = collections.deque()
        #: Finished messages waiting for the removal under way to end, with their state
        #: before the attempt (restored if the removal fails); the removal under way.
        self._removals: list[tuple[str, QueuedMessage]] = []
        self._removing: defer.Deferred | None = None

    # --- service --------------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        started = time.monotonic()
        d = self.runtime.in_thread(queue_scan.load, self.qdir)
        d.addCallback(self._loaded, started)
        d.addErrback(lambda f: log.failure("cannot load the queue", f))
        self.control.start()

    def stopService(self) -> Any:
        service.Service.stopService(self)
        self.scheduler.stop()
        self.control.stop()
        writes = list(self._writes.values())  # a finished write is forgotten
        return defer.DeferredList(writes) if writes else None

    def _loaded(self, report: queue_scan.LoadReport, started: float) -> None:
        for name, reason in report.corrupt:
            log.error("queue: moved {name} to corrupt/: {reason}", name=name, reason=reason)
        for name in report.unfinished:
            log.info("queue: removed {name}, left unfinished by a crash (never sent)", name=name)
        for message in report.messages:
            if message.id in self.messages:
                continue  # accepted while the queue loaded: add() has it already
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
        """A message just entered the queue (it is already durable): deliver it soon.

        One it holds or finished lately is not taken again: a receiving process's notice of a
        message it queued while the start-up scan ran may be read after the scan found that
        message, and even after the relayer sent and removed it.
        """
        if message.id in self.messages or message.id in self._finished:
            return
        self.messages[message.id] = message
        self.scheduler.push(message)
        self.scheduler.wake()

    def _deliver(self, key: str, batch: Batch) -> defer.Deferred:
        return self.destinations.deliver(key, batch, self._transactions, self._record)

    def _transactions(self, items: Iterable[tuple[str, list[str]]]) -> list[OutboundTransaction]:
        transactions = []
        for queue_id, addresses in items:
            message = self.messages.get(queue_id)
            if message is None:
                continue  # deleted meanwhile
            still = [r for r in message.pending if r.address in addresses]
            if still:
                transactions.append(OutboundTransaction(
                    queue_id=queue_id, sender=message.sender,
                    recipients=[r.address for r in still], prefix=message.prefix.encode("ascii"),
                    body_path=queue.body_path(self.qdir, queue_id),
                    dsn_mail=mail_arguments(message.ret, message.envid),
                    dsn_rcpt={r.address: rcpt_arguments(r.notify, r.orcpt) for r in still},
                    smtputf8=message.smtputf8,
                    requiretls=message.tls_required == "yes",
                    tls_optional=message.tls_required == "no",
                ))
        return transactions

    # --- results ---------------------------------------------------------------------

    def _record(
        self, queue_id: str, results: dict[str, Reply], where: str | None, tls: str | None = None,
        dsn: bool = False, tls_policy: str | None = None,
    ) -> None:
        """Apply one attempt's results to a message, log them, and write the new state
        (``dsn``: the server that answered offered DSN; ``tls_policy``: "dane" when the
        session's TLS was DANE's, "sts" when under an MTA-STS policy)."""
        message = self.messages.get(queue_id)
        if message is None:
            return  # deleted or bounced by the administrator meanwhile
        now = time.time()
        outcome = relay_outcome.apply_results(
            message, results, where=where, now=now, policy=self.policy, rng=self.rng,
            peer_dsn=dsn)
        metrics, smarthost = self.runtime.metrics, self.config.relay.smarthost is not None
        for line in outcome.results:
            log.info(
                "relay id={id} from=<{sender}> to=<{rcpt}> relay={relay} tls={tls}{policy} "
                "delay={delay:.1f} tries={tries} status={status} reply=\"{reply}\"",
                id=queue_id, sender=message.sender, rcpt=line.address, relay=where or "none",
                tls=tls or "none", policy=f" tls_policy={tls_policy}" if tls_policy else "",
                delay=now - message.created, tries=line.attempts,
                status="bounced" if line.status == relay_outcome.EXPIRED else line.status,
                reply=str(line.reply),
            )
            metrics.relay_result(line.status, destination_class(line.address, smarthost))
        if outcome.changed:
            self._commit(outcome)

    def _commit(self, outcome: relay_outcome.Outcome) -> None:
        """Make a state change durable (bounce first, then state), in order per message."""
        before, after = outcome.before, outcome.message
        reports, warn, success = (list(outcome.reports), list(outcome.warnings),
                                  list(outcome.successes))
        if after.done:
            self._forget(after.id)
        else:
            self.messages[after.id] = after
        if outcome.dropped:
            why = (f"the sender is likely forged ({after.no_bounce})" if after.no_bounce
                   else "the message is the postmaster's notice of a failed bounce")
            log.info("bounce id={id}: not sent, {why}; dropped for {rcpts}", id=after.id,
                     why=why, rcpts=",".join(f"<{r.address}>" for r in outcome.dropped))
        if outcome.unwanted:
            log.info("bounce id={id}: not sent, the sender's NOTIFY leaves FAILURE out; "
                     "dropped for {rcpts}", id=after.id,
                     rcpts=",".join(f"<{r.address}>" for r in outcome.unwanted))

        if after.done and not (reports or warn or success) and after.id not in self._writes:
            self._remove(after.id, before)
            return

        def blocking() -> list[Any]:
            stored = []
            for group in (reports, warn, success):
                if group:
                    try:
                        stored.append(
                            bounce.notify(self.config, self.runtime.directory, after, group,
                                          dkim=self.runtime.dkim))
                        self.runtime.metrics.dsn(
                            "delay" if group is warn else "success" if group is success else
                            "failure" if after.sender else "double_bounce")
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
                went = " ".join(f"{q.id} queued for" for q in place.entries) or "delivered to"
                log.info("bounce id={id}: {kind} {went} <{to}>", id=after.id, kind=kind,
                         went=went, to=to)
                for entry in place.entries:
                    self.add(entry)

        def failed(failure: Any) -> None:
            if not failure.check(DeliveryError, OSError):
                return failure
            self._not_stored(after.id, before, failure.getErrorMessage())

        self._in_order(after.id, blocking).addCallbacks(written, failed)

    def _not_stored(self, queue_id: str, before: QueuedMessage, error: str) -> None:
        """The bounce or the state could not be stored: keep the recipients queued, so that
        nothing is lost; they are tried (and bounced) again later."""
        log.error("queue id={id}: cannot store the new state: {error}", id=queue_id,
                  error=error)
        restored = relay_outcome.rescheduled(before, time.time() + self.policy.schedule[0])
        self.messages[queue_id] = restored
        self.scheduler.push(restored)
        self.scheduler.wake(self.policy.schedule[0])

    def _remove(self, queue_id: str, before: QueuedMessage) -> None:
        """A finished message with nothing else to store: removed with the others that finish
        while a removal is under way, one thread hand-off and one fsync of ``messages/`` for
        all of them (``queue.remove_many``)."""
        self._removals.append((queue_id, before))
        if self._removing is None:
            self._remove_waiting()

    def _remove_waiting(self) -> None:
        batch, self._removals = self._removals, []
        d = self._removing = self.runtime.in_thread(
            queue.remove_many, self.qdir, [queue_id for queue_id, _ in batch])
        for queue_id, _ in batch:
            self._writes[queue_id] = d  # stopService waits for it; a later write follows it

        def removed(results: list[Any]) -> None:
            for (queue_id, before), result in zip(batch, results):
                if isinstance(result, DeliveryError):
                    self._not_stored(queue_id, before, str(result))

        def failed(failure: Any) -> None:
            log.failure("queue: cannot remove {ids}", failure,
                        ids=" ".join(queue_id for queue_id, _ in batch))
            for queue_id, before in batch:
                self._not_stored(queue_id, before, failure.getErrorMessage())

        def next_batch(_: Any) -> None:
            for queue_id, _before in batch:
                if self._writes.get(queue_id) is d:
                    del self._writes[queue_id]
            self._removing = None
            if self._removals:
                self._remove_waiting()

        d.addCallbacks(removed, failed)
        d.addBoth(next_batch)

    def _forget(self, queue_id: str) -> None:
        del self.messages[queue_id]
        self._finished.add(queue_id)
        self._finished_order.append(queue_id)
        if len(self._finished_order) > FINISHED_REMEMBERED:
            self._finished.discard(self._finished_order.popleft())

    def _in_order(self, queue_id: str, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``f`` in a thread once the message's earlier writes are done: one at a time and
        in order, so that an older state never lands after a newer one.  stopService waits
        for the writes under way."""
        previous = self._writes.get(queue_id)
        start: defer.Deferred
        if previous is None:
            start = defer.succeed(None)
        else:
            start = defer.Deferred()

            def go(result: Any) -> Any:
                start.callback(None)
                return result

            previous.addBoth(go)
        d = start.addCallback(lambda _: self.runtime.in_thread(f, *args))
        self._writes[queue_id] = d

        def forget(result: Any) -> Any:
            if self._writes.get(queue_id) is d:
                del self._writes[queue_id]
            return result

        return d.addBoth(forget)

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
        self._forget(queue_id)
        return self._in_order(queue_id, queue.remove, self.qdir, queue_id)

    def bounce(self, queue_id: str) -> defer.Deferred:
        """Bounce every recipient still queued; fires once the DSN and the state are stored."""
        self._commit(relay_outcome.bounced_by_administrator(self.messages[queue_id]))
        return self._writes.get(queue_id, defer.succeed(None))
