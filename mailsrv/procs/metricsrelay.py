"""
The counters of a receiving process, counted in the parent's ``Metrics``: one registry, so
``/metrics`` and the daily report (both the parent's) count every process's mail.

A receiving process's runtime gets a ``MetricsRelay`` instead of a ``Metrics``: each event
call (``accepted``, ``refused``, ``auth``…) is recorded, and in the reactor's next turn the
calls recorded are sent to the parent in one ``metrics`` message, which ``replay`` applies
to the parent's ``Metrics`` by the same method names: a scrape after the ``250`` counts
the message.  Events are recorded from any thread
(the checks pipeline reports from worker threads): a deque takes them without a lock.

What this costs: a list append per event, one message (and one wake-up of the reactor) per
turn that had events.  The checks' verdicts (``decision``: one per check, stage and recipient,
most of the events) are sent as one event per distinct verdict with its ``amount``, so that
neither process encodes, decodes and counts each: ten recipients made about forty of them.
What it loses: the events of the turn in which a process is killed by SIGKILL (the mail is
safe; only those counts are missing).  The delivery latency is sent as the time it took, not
as the monotonic start.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from typing import Any

__all__ = ["EVENTS", "MetricsRelay", "replay"]

#: Metrics' event methods (mailsrv.metrics.Metrics); anything else is not relayed.
EVENTS = frozenset((
    "connection_opened", "connection_closed", "connection_refused", "refused", "accepted",
    "decision", "auth", "tls", "relay_result", "dsn",
))
#: Events of a receiving process the parent does not count: every process reloads on SIGHUP,
#: and ``mailsrv_reloads_total`` counts the server's reloads (the parent's), not N + 1 of
#: them; a process's refusal is in the log with its ``proc=``.
NOT_RELAYED = frozenset(("reload",))

#: Bytes of events per message at most (a message must fit the channel's socket buffer and
#: its reader's buffer, mailsrv.procs.channel); one longer event goes alone.
BATCH_BYTES = 60000


class MetricsRelay:
    """Records Metrics event calls; ``flush`` sends them (``send(payload)``)."""

    def __init__(self, send: Callable[[str], Any], reactor: Any = None) -> None:
        self.send = send
        self.reactor = reactor
        self._events: collections.deque[list[Any]] = collections.deque()
        self._flushing = False

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
                # One flush for the events of this turn of the reactor (or of any thread).
                self._flushing = True
                self.reactor.callFromThread(self.flush)

        return record

    def add_state(self, runtime: Any, clock: Any = None) -> None:
        """The queue's state is the parent's (its relayer): nothing to read here."""

    def flush(self) -> None:
        """Send what was recorded (on the reactor thread)."""
        self._flushing = False
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
