"""
The counters of a receiving process, counted in the parent's ``Metrics``: one registry, so
``/metrics`` and the daily report (both the parent's) count every process's mail.

A receiving process's runtime gets a ``MetricsRelay`` instead of a ``Metrics``: each event
call (``accepted``, ``refused``, ``auth``…) is recorded, and FLUSH_DELAY after the first one
recorded the calls recorded since are sent to the parent in one ``metrics`` message, which
``replay`` applies to the parent's ``Metrics`` by the same method names: a scrape counts a
message at most FLUSH_DELAY after its ``250``. Events are recorded from any thread (the
checks pipeline reports from worker threads): a deque takes them without a lock.

What this costs: a list append per event, and one message per FLUSH_DELAY while events come.
Sending the events of each reactor turn instead (as until 2026-12-03) was three or four
messages per message received, each encoded, written, read, decoded and applied, and a
wake-up of the reactor each: about a tenth of a receiving process's CPU under load. The
checks' verdicts (``decision``: one per check, stage and recipient, most of the events) are
sent as one event per distinct verdict with its ``amount``, so that neither process encodes,
decodes and counts each. What it loses: the events of the last FLUSH_DELAY when a process is
killed by SIGKILL (the mail is safe; only those counts are missing). The delivery latency is
sent as the time it took, not as the monotonic start.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from mailsrv.procs.channel import SEND_BYTES

__all__ = ["EVENTS", "FLUSH_DELAY", "MetricsRelay", "replay"]

#: Metrics' event methods (mailsrv.metrics.Metrics); anything else is not relayed.
EVENTS = frozenset((
    "connection_opened", "connection_closed", "connection_refused", "refused", "accepted",
    "decision", "auth", "tls", "relay_result", "dsn",
))
#: Events of a receiving process the parent does not count: every process reloads on SIGHUP,
#: and ``mailsrv_reloads_total`` counts the server's reloads (the parent's), not N + 1 of
#: them; a process's refusal is in the log with its ``proc=``.
NOT_RELAYED = frozenset(("reload",))

#: Seconds from the first event recorded to the message that sends it and those after it.
FLUSH_DELAY = 0.05

#: Bytes of events per message at most; one longer event goes alone.
BATCH_BYTES = SEND_BYTES


class MetricsRelay:
    """Records Metrics event calls; ``flush`` sends them (``send(payload)``)."""

    def __init__(self, send: Callable[[str], Any], reactor: Any = None) -> None:
        """Made on the reactor's thread (the one that calls ``reactor.run``)."""
        self.send = send
        self.reactor = reactor
        self._reactor_thread = threading.get_ident()
        self._events: collections.deque[list[Any]] = collections.deque()
        self._flushing = False
        self._timer: Any = None

    def __getattr__(self, name: str) -> Any:
        if name in NOT_RELAYED:
            return lambda *args, **kwargs: None
        if name not in EVENTS:
            raise AttributeError(name)

        def record(*args: Any, **kwargs: Any) -> None:
            if name == "accepted":
                args, kwargs = _elapsed(args, kwargs)
            self._events.append([name, list(args), kwargs])
            if not self._flushing and self.reactor is not None:
                # One flush for the events of the next FLUSH_DELAY (from any thread; two
                # threads that both see no flush coming each schedule one: harmless).
                self._flushing = True
                if threading.get_ident() == self._reactor_thread:
                    self._schedule()
                else:
                    self.reactor.callFromThread(self._schedule)

        return record

    def add_state(self, runtime: Any, clock: Any = None) -> None:
        """The queue's state is the parent's (its relayer): nothing to read here."""

    def _schedule(self) -> None:
        self._timer = self.reactor.callLater(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Send what was recorded (on the reactor thread)."""
        self._flushing = False
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()  # called before its time (stop)
        batch: list[str] = []
        size = 0
        for event in self._taken():
            text = json.dumps(event, separators=(",", ":"))
            if batch and size + len(text) > BATCH_BYTES:
                self.send("[" + ",".join(batch) + "]")
                batch, size = [], 0
            batch.append(text)
            size += len(text) + 1
        if batch:
            self.send("[" + ",".join(batch) + "]")

    def _taken(self) -> list[list[Any]]:
        """The events recorded so far, the same verdicts made one ``decision`` with an
        ``amount`` (counters add up in any order)."""
        events: list[list[Any]] = []
        verdicts: collections.Counter[tuple[Any, ...]] = collections.Counter()
        while self._events:
            event = self._events.popleft()
            if event[0] == "decision" and not event[2]:
                verdicts[tuple(event[1])] += 1
            else:
                events.append(event)
        events += [["decision", list(verdict), {"amount": n} if n > 1 else {}]
                   for verdict, n in verdicts.items()]
        return events

    def stop(self) -> None:
        self.flush()


def _elapsed(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``accepted``'s monotonic ``started`` (5th argument) made the time it took."""
    kwargs = dict(kwargs)
    if "recipients" in kwargs:
        kwargs["recipients"] = list(kwargs["recipients"])
    if len(args) >= 5:
        started, args = args[4], args[:4]
        kwargs["started"] = started
    started = kwargs.pop("started", None)
    if started is not None:
        kwargs["elapsed"] = time.monotonic() - started
    return args, kwargs


def replay(metrics: Any, payload: str) -> collections.Counter[str]:
    """Apply a receiving process's events to the parent's ``metrics``; how many of each.
    A name outside EVENTS is ignored: the message comes from our own process, but one
    message never calls anything else."""
    events = json.loads(payload)
    counts: collections.Counter[str] = collections.Counter()
    for name, args, kwargs in events:
        if name not in EVENTS:
            continue
        counts[name] += kwargs.get("amount", 1) if name == "decision" else 1
        if name == "accepted":
            elapsed = kwargs.pop("elapsed", None)
            if elapsed is not None:
                kwargs["started"] = time.monotonic() - elapsed
        getattr(metrics, name)(*args, **kwargs)
    return counts
