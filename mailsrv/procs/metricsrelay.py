"""
The counters of a receiving process, counted in the parent's ``Metrics``: one registry, so
``/metrics`` and the daily report (both the parent's) count every process's mail.

A receiving process's runtime gets a ``MetricsRelay`` instead of a ``Metrics``: each event
call (``accepted``, ``refused``, ``auth``…) is recorded, and every ``INTERVAL`` seconds the
calls recorded are sent to the parent in one ``metrics`` message, which ``replay`` applies
to the parent's ``Metrics`` by the same method names.  Events are recorded from any thread
(the checks pipeline reports from worker threads): a deque takes them without a lock.

What this costs: a list append per event, one message per process per interval.  What it
loses: the events of the last interval of a process killed by SIGKILL (the mail is safe;
only those counts are missing).  The delivery latency is sent as the time it took, not as
the monotonic start, so the interval's wait is not added to it.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import task

__all__ = ["EVENTS", "MetricsRelay", "replay", "INTERVAL"]

#: Metrics' event methods (mailsrv.metrics.Metrics); anything else is not relayed.
EVENTS = frozenset((
    "connection_opened", "connection_closed", "connection_refused", "refused", "accepted",
    "decision", "auth", "tls", "relay_result", "dsn", "reload",
))

#: Seconds between two messages of counts to the parent.
INTERVAL = 0.2
#: Bytes of events per message at most (a message must fit the channel's socket buffer and
#: its reader's buffer, mailsrv.procs.channel); one longer event goes alone.
BATCH_BYTES = 60000


class MetricsRelay:
    """Records Metrics event calls; ``flush`` sends them (``send(payload)``)."""

    def __init__(self, send: Callable[[str], Any], reactor: Any = None,
                 interval: float = INTERVAL) -> None:
        self.send = send
        self._events: collections.deque[list[Any]] = collections.deque()
        self._loop: task.LoopingCall | None = None
        if reactor is not None:
            self._loop = task.LoopingCall(self.flush)
            self._loop.clock = reactor
            self._loop.start(interval, now=False)

    def __getattr__(self, name: str) -> Any:
        if name not in EVENTS:
            raise AttributeError(name)

        def record(*args: Any, **kwargs: Any) -> None:
            if name == "accepted":
                args, kwargs = _elapsed(args, kwargs)
            self._events.append([name, list(args), kwargs])

        return record

    def add_state(self, runtime: Any, clock: Any = None) -> None:
        """The queue's state is the parent's (its relayer): nothing to read here."""

    def flush(self) -> None:
        """Send what was recorded (on the reactor thread)."""
        batch: list[str] = []
        size = 0
        while self._events:
            text = json.dumps(self._events.popleft(), separators=(",", ":"))
            if batch and size + len(text) > BATCH_BYTES:
                self.send("[" + ",".join(batch) + "]")
                batch, size = [], 0
            batch.append(text)
            size += len(text) + 1
        if batch:
            self.send("[" + ",".join(batch) + "]")

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
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
        counts[name] += 1
        if name == "accepted":
            elapsed = kwargs.pop("elapsed", None)
            if elapsed is not None:
                kwargs["started"] = time.monotonic() - elapsed
        getattr(metrics, name)(*args, **kwargs)
    return counts
