"""
mailsrv's one thread runner: threads for blocking work, lighter than Twisted's thread pool,
with results handed back to the reactor thread in batches.

The server runs two instances (mailsrv.runtime.Runtime.build), one per role:

- ``delivery`` (8 threads): the disk work of deliveries, the queue's writes, reloads;
- ``passwords`` (2 threads): bcrypt, a quarter of a second of CPU per check, so that a flood
  of AUTH attempts only queues behind itself, never in front of the fsyncs of deliveries.

Why not ``deferToThreadPool``: under load the server is bound by the one core its reactor
thread (holding the GIL) can use, and profiles showed about a fifth of that time in Twisted's
thread-pool machinery (``Team``/``LockWorker`` coordination, a context copy and a
``callFromThread`` per call, ``Condition`` hand-offs). Here a job is one ``SimpleQueue.put``
(implemented in C), and a worker that finishes a job wakes the reactor only when no wake-up is
already pending: the reactor thread then fires every finished job's Deferred in one go. Under
load many deliveries finish per wake-up, which is the reactor-side half of group commit (the
disk-side half is the shared directory fsync in ``mailsrv.storage.maildir``).

The number of threads bounds how many deliveries wait on the disk at once; fsyncs of
concurrent deliveries into the same ``new/`` are coalesced, so a handful is enough.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.interfaces import IThreadRunner

__all__ = ["ThreadRunner", "DELIVERY_THREADS", "PASSWORD_THREADS"]

#: Deliveries waiting on the disk at once; fsyncs into the same ``new/`` are coalesced, so a
#: handful is enough.
DELIVERY_THREADS = 8
#: bcrypt checks at once.
PASSWORD_THREADS = 2

_STOP = object()


@implementer(IThreadRunner)
class ThreadRunner:
    """``run(f, *args)`` calls ``f`` in one of ``size`` threads; a Deferred fires with its result.

    Threads start when first needed, and end at the reactor's shutdown (after the queued jobs,
    30 seconds at most).
    """

    def __init__(
        self, reactor: IReactorThreads, size: int = DELIVERY_THREADS, name: str = "delivery"
    ) -> None:
        self.reactor = reactor
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._threads: list[threading.Thread] = []
        self._stopping = False
        reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``f(*args)`` in a worker thread (reactor thread only)."""
        if self._stopping:
            return defer.fail(RuntimeError("the server is stopping"))
        if len(self._threads) < self.size:
            self._start_thread()
        d: defer.Deferred = defer.Deferred()
        self._jobs.put((d, f, args))
        return d

    def _start_thread(self) -> None:
        name = f"mailsrv-{self.name}-{len(self._threads)}"
        thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            d, f, args = job
            try:
                result: tuple[bool, Any] = (True, f(*args))
            except BaseException:
                result = (False, Failure())
            self._done.append((d, result))
            with self._lock:
                if self._wake_pending:
                    continue  # the pending wake-up will take this result too
                self._wake_pending = True
            self.reactor.callFromThread(self._fire_finished)

    def _fire_finished(self) -> None:
        """On the reactor thread: fire the Deferred of every job finished so far."""
        with self._lock:
            # Cleared before draining: a result appended after this point either is drained
            # below or schedules a wake-up of its own.
            self._wake_pending = False
        while True:
            try:
                d, (ok, value) = self._done.popleft()
            except IndexError:
                return
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def stop(self, timeout: float = 30.0) -> None:
        """Let the queued jobs finish (bounded by ``timeout`` in all), then end the threads."""
        if self._stopping:
            return
        self._stopping = True
        for _ in self._threads:
            self._jobs.put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._fire_finished()
