"""
The greylisting memory: triplets and client networks in memory, where the RCPT check reads
and updates them on the reactor thread, and in an SQLite file (the standard library's) that
survives restarts, written behind, in order, by a thread of its own, so that the reactor
never waits on it; the writes that come while that thread is busy are committed together, in
one transaction, and a commit goes to SQLite's write-ahead log without an fsync: at hundreds of
messages a second, a commit of its own for every RCPT (SQLite's rollback journal, about five
fdatasyncs a message) slowed durable delivery, the disk's syncs going to the greylist.
Read once at start-up; entries unused for ``expire`` seconds are dropped, and at most
MAX_TRIPLETS are kept (the least recently used go first).  A crash loses at most the writes
not yet committed: those triplets are greylisted once more, nothing worse.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from mailsrv.checks.greylist import Triplet, Triplets

__all__ = ["Greylist", "MAX_TRIPLETS"]

log = Logger(namespace="mailsrv")

#: Triplets remembered at most (a few MB of memory and disk).
MAX_TRIPLETS = 200_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    network TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_passed REAL NOT NULL, passes INTEGER NOT NULL,
    PRIMARY KEY (network, sender, recipient));
CREATE TABLE IF NOT EXISTS clients (
    network TEXT PRIMARY KEY, passes INTEGER NOT NULL, last_passed REAL NOT NULL);
"""


class Greylist:
    """Triplets and client networks, remembered."""

    def __init__(
        self, path: Path, expire: float, clock: Callable[[], float],
        in_thread: Callable[..., Any], owns: Callable[[str], bool] | None = None,
    ) -> None:
        # ``owns``: the client networks this process greylists ([server] processes > 1: the
        # parent sends each network's connections to one process, mailsrv.procs.dispatch);
        # only their rows are read, so that another's rows are never evicted from here.
        self.owns = owns
        self.path = Path(path)
        self.expire = expire
        self.clock = clock
        self._in_thread = in_thread
        self._lock = threading.Lock()
        #: Writes not yet taken by the writer thread, in order (``_queue``, ``_flush``).
        self._batch: list[tuple[str, tuple]] = []
        self._batch_lock = threading.Lock()  # for ``_batch`` alone: never held during I/O
        self._triplets: OrderedDict[Triplet, Triplets] = OrderedDict()
        self._clients: dict[str, tuple[int, float]] = {}
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # ours alone: who mails whom
        os.close(fd)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # A commit appends to the write-ahead log without an fsync (SQLite syncs at its
        # checkpoints): a crash of the machine may lose the last commits, which only
        # greylists those triplets once more; a crash of the server loses nothing committed.
        # SQLite makes the -wal and -shm files with the database file's mode (0600).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._load()

    def _load(self) -> None:
        """Read what is still valid (blocking: at start-up, before anything listens)."""
        oldest = self.clock() - self.expire
        with self._lock:
            self._db.execute("DELETE FROM triplets WHERE max(first_seen, last_passed) < ?",
                             (oldest,))
            self._db.execute("DELETE FROM clients WHERE last_passed < ?", (oldest,))
            rows = self._db.execute(
                "SELECT network, sender, recipient, first_seen, last_passed, passes "
                "FROM triplets ORDER BY max(first_seen, last_passed) DESC LIMIT ?",
                (MAX_TRIPLETS,)).fetchall()
            clients = self._db.execute("SELECT network, passes, last_passed FROM clients")
            self._clients = {n: (p, t) for n, p, t in clients.fetchall()
                             if self.owns is None or self.owns(n)}
        for network, sender, recipient, first, passed, passes in reversed(rows):
            if self.owns is not None and not self.owns(network):
                continue
            self._triplets[(network, sender, recipient)] = Triplets(first, passed, passes)

    def __len__(self) -> int:
        return len(self._triplets)

    def client_passes(self, network: str) -> int:
        passes, last = self._clients.get(network, (0, 0.0))
        return passes if self.clock() - last <= self.expire else 0

    def attempt(self, key: Triplet, delay: float) -> float:
        """Seconds the triplet must still wait (0: it passes now, and is remembered)."""
        now = self.clock()
        state = self._triplets.get(key)
        if state is None or now - max(state.first_seen, state.last_passed) > self.expire:
            state = self._triplets[key] = Triplets(now)
            self._bound()
            self._save(key, state)
            return delay
        waited = now - state.first_seen
        if state.passes == 0 and waited < delay:
            return delay - waited  # too soon: the first attempt's time stands
        state.passes += 1
        state.last_passed = now
        self._triplets.move_to_end(key)
        passes = self.client_passes(key[0]) + 1
        self._clients[key[0]] = (passes, now)
        self._save(key, state, (key[0], passes, now))
        return 0.0

    def _bound(self) -> None:
        while len(self._triplets) > MAX_TRIPLETS:
            key, _ = self._triplets.popitem(last=False)
            self._queue("DELETE FROM triplets WHERE network = ? AND sender = ? "
                        "AND recipient = ?", key)

    def _save(self, key: Triplet, state: Triplets, client: tuple | None = None) -> None:
        self._queue("INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?, ?, ?)",
                    (*key, state.first_seen, state.last_passed, state.passes))
        if client is not None:
            self._queue("INSERT OR REPLACE INTO clients VALUES (?, ?, ?)", client)

    def _queue(self, statement: str, values: tuple) -> None:
        """The write, in order, in the greylist's own (one) thread: with the writes queued
        while a commit of that thread ran, in one transaction.  A failure is logged (the
        memory stays right; the file misses that batch's changes until the triplets change
        again)."""
        with self._batch_lock:
            self._batch.append((statement, values))
            if len(self._batch) > 1:
                return  # a flush is already on its way and will take this write too
        d = self._in_thread(self._flush)
        d.addErrback(lambda f: log.failure("greylist: writing {path} failed", f, path=self.path))

    def _flush(self) -> None:
        """In the writer thread: every write queued so far, in one transaction."""
        with self._batch_lock:
            batch, self._batch = self._batch, []
        with self._lock:
            try:
                self._db.execute("BEGIN")
                for statement, values in batch:
                    self._db.execute(statement, values)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
