"""
The server's own counters, for Prometheus (``[metrics] listen``) and the daily report.

One :class:`Metrics` per :class:`~mailsrv.runtime.Runtime`, with its own
``CollectorRegistry`` (never prometheus_client's global one), so that two runtimes in one
process (the tests) count apart.  The code that logs an event calls the method of the same
name here next to its log line, so the counters agree with the log: one line, one count.
Why calls and not a log observer that counts the log's events: the log publisher is the
process's (two runtimes would count each other's events), the labels a counter needs (the
check that refused, the destination class, the time the message arrived) are not all in the
log lines, and a reworded log line would silently stop a counter.

What is a state rather than an event (the queue, the certificate's expiry) is read when
Prometheus scrapes, by :class:`StateCollector`, from the runtime: nothing to keep in step.
The scrape runs in a thread of the reactor's pool (prometheus_client's Twisted resource is a
WSGI one); it reads the relayer's table with one ``list()`` (atomic under the GIL) of
frozen envelopes.

Cost: an event is one increment of a child counter found in a dict (about half a
microsecond), so that metrics stay far below 3 % of durable delivery's time per message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

__all__ = [
    "DESTINATION_CLASSES", "Metrics", "StateCollector", "Volume", "destination_class", "snapshot",
]

#: Where a relayed recipient goes (``mailsrv_relay_attempts_total{destination}``).
DESTINATION_CLASSES = ("mx", "smarthost", "literal")

#: accept -> fsync'd, in seconds: from about a millisecond (a small local message) to the
#: rspamd and DNS timeouts of the checks.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


def destination_class(address: str, smarthost: bool) -> str:
    """``smarthost``, ``literal`` (``user@[192.0.2.1]``) or ``mx`` for a relayed recipient."""
    if smarthost:
        return "smarthost"
    return "literal" if address.rpartition("@")[2].startswith("[") else "mx"


def tls_version(description: str | None) -> str:
    """``TLSv1.3`` from ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``; ``none`` for plain text."""
    return description.split(" ", 1)[0] if description else "none"


class _Family:
    """A labelled metric whose children are kept in a dict: ``labels()`` takes a lock and
    builds a key each time (about 2 µs); a dict lookup is a tenth of that."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def child(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        return child

    def inc(self, *labels: str, amount: float = 1) -> None:
        self.child(*labels).inc(amount)


class Volume:
    """Messages and bytes per address since the last daily report, for its top senders and
    recipients.  Not Prometheus labels: a series per address would grow without end.  At
    most ``limit`` addresses are kept; the rest are counted under ``OTHERS``."""

    OTHERS = "(other addresses)"

    def __init__(self, limit: int = 10000) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}

    def add(self, address: str, size: int) -> None:
        with self._lock:
            entry = self._counts.get(address)
            if entry is None:
                if len(self._counts) >= self.limit:
                    address = self.OTHERS
                entry = self._counts.setdefault(address, [0, 0])
            entry[0] += 1
            entry[1] += size

    def take(self) -> dict[str, tuple[int, int]]:
        """address -> (messages, bytes) so far; counting starts again from nothing."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return {address: (n, size) for address, (n, size) in counts.items()}


def snapshot(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter's value now: (sample name, sorted labels) -> value (the daily report
    subtracts the previous day's)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() if family.type in ("counter", "histogram")
            for s in family.samples if s.name.endswith(("_total", "_count", "_sum"))}


class Metrics:
    """Every counter of the server, in ``self.registry``; one method per kind of event."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        #: Top senders and recipients for the daily report.
        self.senders, self.recipients = Volume(), Volume()

        def counter(name: str, doc: str, *labels: str) -> _Family:
            return _Family(Counter(name, doc, labels, registry=r))

        self._connections = counter(
            "mailsrv_connections", "SMTP connections admitted, by listener (smtp, submission)",
            "listener")
        self._connections_refused = counter(
            "mailsrv_connections_refused",
            "SMTP connections refused before any command: max_connections, "
            "max_connections_per_ip, connections_per_minute, early_talker", "reason")
        self.connections_open = Gauge(
            "mailsrv_connections_open", "SMTP connections open now", registry=r)
        self._accepted = counter(
            "mailsrv_messages_accepted", "Messages accepted (250 after DATA), by listener",
            "listener")
        self._refused = counter(
            "mailsrv_refused",
            "Refusals, by stage (mail: the sender, rcpt: a recipient, data: the message) and "
            "by the check or the rule that refused", "stage", "reason")
        self._bytes = Counter(
            "mailsrv_received_bytes", "Bytes of the messages accepted (as received)",
            registry=r)
        self._deliveries = counter(
            "mailsrv_deliveries",
            "Recipients done with, by result: delivered (into a local mailbox), relayed, "
            "bounced (a permanent failure), expired (bounced after queue.max_age)", "result")
        self._queued = Counter(
            "mailsrv_queued_recipients", "Recipients put in the outbound queue", registry=r)
        self._relay = counter(
            "mailsrv_relay_attempts",
            "Relay attempts per recipient, by result (sent, deferred, bounced, expired) and "
            "destination class (mx, smarthost, literal)", "result", "destination")
        self._dsn = counter(
            "mailsrv_dsn_sent",
            "Delivery status notifications made: failure, delay, success (NOTIFY=SUCCESS), "
            "double_bounce (to the postmaster)", "kind")
        self._auth = counter(
            "mailsrv_auth",
            "AUTH outcomes: success, failure, lockout (an address locked out), locked_out "
            "(an attempt refused during a lockout), malformed", "result")
        self._tls = counter(
            "mailsrv_tls_sessions", "TLS sessions, by direction (inbound, outbound) and version",
            "direction", "version")
        self.latency = Histogram(
            "mailsrv_delivery_latency_seconds",
            "From the end of DATA to every copy fsync'd (the checks included)",
            buckets=LATENCY_BUCKETS, registry=r)
        self._reloads = counter(
            "mailsrv_reloads", "Reloads, by what (users, tls, dkim) and result (ok, failed)",
            "what", "result")
        self._decisions = counter(
            "mailsrv_check_decisions",
            "Verdicts of the checks pipeline, by check, stage and decision (accept, reject, "
            "tempfail, add_headers, file_into)", "check", "stage", "decision")

    # --- connections -------------------------------------------------------------------

    def connection_opened(self, listener: str) -> None:
        self._connections.inc(listener)
        self.connections_open.inc()

    def connection_closed(self) -> None:
        self.connections_open.dec()

    def connection_refused(self, reason: str) -> None:
        self._connections_refused.inc(reason)

    # --- intake --------------------------------------------------------------------------

    def refused(self, stage: str, reason: str | None) -> None:
        self._refused.inc(stage, reason or "unknown")

    def accepted(self, listener: str, size: int, local: int, queued: int,
                 started: float | None = None, sender: str = "<>",
                 recipients: Iterable[str] = ()) -> None:
        """A message stored: ``local`` mailbox copies delivered, ``queued`` recipients
        queued; ``started`` the ``time.monotonic()`` of its end of DATA."""
        self._accepted.inc(listener)
        self.senders.add(sender, size)
        for recipient in recipients:
            self.recipients.add(recipient, size)
        self._bytes.inc(size)
        if local:
            self._deliveries.inc("delivered", amount=local)
        if queued:
            self._queued.inc(queued)
        if started is not None:
            self.latency.observe(time.monotonic() - started)

    def decision(self, check: str, stage: str, decision: str, amount: int = 1) -> None:
        """One check's verdict (called by the pipeline, in any thread); ``amount`` of them,
        as a receiving process's turn sends them (mailsrv.procs.metricsrelay)."""
        self._decisions.inc(check, stage, decision, amount=amount)

    # --- AUTH and TLS ----------------------------------------------------------------------

    def auth(self, result: str) -> None:
        self._auth.inc(result)

    def tls(self, direction: str, description: str | None) -> None:
        self._tls.inc(direction, tls_version(description))

    # --- relay ---------------------------------------------------------------------------

    def relay_result(self, status: str, destination: str) -> None:
        """One recipient's attempt: sent, deferred, bounced or expired."""
        self._relay.inc(status, destination)
        if status != "deferred":
            self._deliveries.inc("relayed" if status == "sent" else status)

    def dsn(self, kind: str) -> None:
        self._dsn.inc(kind)

    # --- the rest ------------------------------------------------------------------------

    def reload(self, what: str, ok: bool) -> None:
        self._reloads.inc(what, "ok" if ok else "failed")

    def add_state(self, runtime: Any, clock: Callable[[], float] = time.time) -> None:
        """Read the runtime's queue and certificate at every scrape."""
        self.registry.register(StateCollector(runtime, clock))


class StateCollector:
    """The queue (messages, recipients waiting, the oldest message's age) and the server
    certificate's expiry, read from the runtime when scraped."""

    def __init__(self, runtime: Any, clock: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self.clock = clock

    def describe(self) -> Iterable[Any]:
        return []  # its families depend on the runtime: not checked for clashes up front

    def collect(self) -> Iterator[Any]:
        relayer = self.runtime.relayer
        messages = getattr(relayer, "messages", None)
        if messages is not None and getattr(relayer, "loaded", True):
            snapshot = list(messages.values())  # one step under the GIL: no resize under us
            now = self.clock()
            yield GaugeMetricFamily(
                "mailsrv_queue_messages", "Messages in the outbound queue", len(snapshot))
            yield GaugeMetricFamily(
                "mailsrv_queue_recipients", "Recipients in the outbound queue still to be sent",
                sum(len(m.pending) for m in snapshot))
            oldest = min((m.created for m in snapshot), default=None)
            yield GaugeMetricFamily(
                "mailsrv_queue_oldest_message_age_seconds",
                "Age of the oldest message in the outbound queue (0 when empty)",
                max(0.0, now - oldest) if oldest is not None else 0.0)
        expires = getattr(self.runtime.tls, "expires", None)
        if expires is not None:
            yield GaugeMetricFamily(
                "mailsrv_tls_certificate_expiry_timestamp_seconds",
                "When the server certificate in use expires (Unix time)", expires)
