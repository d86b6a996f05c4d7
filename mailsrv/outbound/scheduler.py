"""
When the relayer starts which session: due recipients, grouped by destination, within limits.

The relayer keeps the queue's messages in memory; this scheduler only decides *when*.  A heap
holds, per message, the time its next recipient is due.  When the timer fires, every due
recipient that is not already being delivered is marked in flight and put in its destination's
waiting line (its domain, or the smarthost); then as many sessions start as the limits allow
(``relay.max_connections`` in all, ``relay.max_connections_per_domain`` per destination), each
carrying up to :data:`MESSAGES_PER_SESSION` messages.  When a session ends its recipients leave
flight, the messages are looked at again (a deferred recipient has a new due time), and the
waiting lines move on.

Recipient times are wall-clock (they are stored in the envelopes); the timer runs on the
reactor given, so a test drives both with one ``task.Clock``.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailsrv.storage.envelope import QueuedMessage, QueuedRecipient

__all__ = ["MESSAGES_PER_SESSION", "Batch", "Scheduler"]

log = Logger(namespace="mailsrv")

#: Messages carried by one session before it ends (the next session takes the rest).
MESSAGES_PER_SESSION = 100

#: One session's work: (queue id, the addresses of that message it is to deliver), in order.
Batch = list[tuple[str, list[str]]]


class Scheduler:
    """Starts ``deliver(key, batch)`` for due recipients; one instance per relayer."""

    def __init__(
        self,
        reactor: Any,
        messages: Mapping[str, QueuedMessage],
        *,
        key_of: Callable[[QueuedRecipient], str],
        deliver: Callable[[str, Batch], defer.Deferred],
        max_sessions: int,
        max_sessions_per_key: int,
        ready: Callable[[], bool],
        now: Callable[[], float] = time.time,
        per_session: int = MESSAGES_PER_SESSION,
    ) -> None:
        """``messages`` is the relayer's own (live) view of the queue; ``key_of`` names a
        recipient's destination; ``ready`` says whether sessions may start now (the service
        runs and the queue is loaded)."""
        self.reactor = reactor
        self.messages = messages
        self.key_of = key_of
        self.deliver = deliver
        self.max_sessions = max_sessions
        self.max_sessions_per_key = max_sessions_per_key
        self.ready = ready
        self.now = now
        self.per_session = per_session
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._in_flight: set[tuple[str, str]] = set()
        self._waiting: dict[str, deque[tuple[str, list[str]]]] = defaultdict(deque)
        self._sessions: dict[str, int] = defaultdict(int)
        self._total_sessions = 0
        self._timer: Any = None

    # --- what the relayer tells it ---------------------------------------------------

    def push(self, message: QueuedMessage) -> None:
        """Note when ``message``'s next recipient not in flight is due (a message may be
        pushed more than once: the earliest entry wins, the later ones find nothing due)."""
        in_flight = self._in_flight
        times = [
            r.next_attempt for r in message.pending if (message.id, r.address) not in in_flight
        ]
        if times:
            heapq.heappush(self._heap, (min(times), next(self._seq), message.id))

    def wake(self, delay: float = 0.0) -> None:
        """Look for due recipients in ``delay`` seconds (or sooner, if already planned)."""
        if not self.ready():
            return
        when = self.reactor.seconds() + delay
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._run)

    def stop(self) -> None:
        """No more looking (sessions under way finish, and their results are recorded)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def in_flight(self, queue_id: str, address: str) -> bool:
        """A session is delivering this recipient right now."""
        return (queue_id, address) in self._in_flight

    @property
    def sessions(self) -> int:
        """Sessions under way, all destinations together."""
        return self._total_sessions

    # --- the timer -------------------------------------------------------------------

    def _run(self) -> None:
        self._timer = None
        now = self.now()
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
                    by_key[self.key_of(r)].append(r.address)
            for key, addresses in by_key.items():
                self._in_flight.update((queue_id, a) for a in addresses)
                self._waiting[key].append((queue_id, addresses))
            self.push(message)  # its later recipients, if any
        self._dispatch()
        if self._heap:
            self.wake(max(0.0, self._heap[0][0] - self.now()))

    def _dispatch(self) -> None:
        for key, waiting in list(self._waiting.items()):
            while (
                waiting
                and self._total_sessions < self.max_sessions
                and self._sessions[key] < self.max_sessions_per_key
            ):
                batch = [waiting.popleft() for _ in range(min(self.per_session, len(waiting)))]
                self._sessions[key] += 1
                self._total_sessions += 1
                d = self.deliver(key, batch)
                d.addErrback(lambda f: log.failure("relay session failed", f))
                d.addBoth(self._session_ended, key, batch)
            # A session that ended at once (a destination refused without a lookup, such as
            # an address literal naming this host) has run _dispatch itself meanwhile.
            if not waiting and self._waiting.get(key) is waiting:
                del self._waiting[key]

    def _session_ended(self, _: Any, key: str, batch: Batch) -> None:
        self._sessions[key] -= 1
        if not self._sessions[key]:
            del self._sessions[key]
        self._total_sessions -= 1
        for queue_id, addresses in batch:
            self._in_flight.difference_update((queue_id, a) for a in addresses)
            message = self.messages.get(queue_id)
            if message is not None:
                self.push(message)
        self._dispatch()
        self.wake()
