"""The machinery the speed work added: the delivery threads, the spare spool files and the
group commit of ``new/`` fsyncs.  Each keeps its promise under concurrency: a result reaches
its own Deferred, a reused spool file starts empty, and no delivery returns before a fsync
that started after its link has succeeded."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mailsrv.storage import dirfd, maildir
from mailsrv.storage.spoolfiles import SpareSpoolFiles
from mailsrv.workers import ThreadRunner


class ThreadReactor:
    """Just what ThreadRunner and SpareSpoolFiles ask of a reactor, run in the test's thread:
    calls from threads are queued and run by ``drain``; callInThread runs at once."""

    def __init__(self) -> None:
        self.calls: list = []
        self.lock = threading.Lock()

    def callFromThread(self, f, *args) -> None:
        with self.lock:
            self.calls.append((f, args))

    def callInThread(self, f, *args) -> None:
        f(*args)

    def addSystemEventTrigger(self, *args) -> None:
        pass

    def drain(self) -> int:
        with self.lock:
            calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)
        return len(calls)


def wait_until(predicate, reactor: ThreadReactor, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reactor.drain()
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError("timed out")


# --------------------------------------------------------------------------- workers


def test_every_job_fires_its_own_deferred_in_batches() -> None:
    reactor = ThreadReactor()
    workers = ThreadRunner(reactor, size=4)
    results: dict[int, object] = {}

    def job(n: int) -> int:
        time.sleep(0.001 * (n % 3))
        if n % 7 == 0:
            raise ValueError(n)
        return n * n

    for n in range(200):
        d = workers.run(job, n)
        d.addCallbacks(lambda value, n=n: results.__setitem__(n, value),
                       lambda failure, n=n: results.__setitem__(n, failure.value))
    wakeups = 0
    deadline = time.monotonic() + 10
    while len(results) < 200 and time.monotonic() < deadline:
        wakeups += reactor.drain()
        time.sleep(0.002)
    assert len(results) == 200
    for n, value in results.items():
        if n % 7 == 0:
            assert isinstance(value, ValueError) and value.args == (n,)
        else:
            assert value == n * n
    assert 1 <= wakeups < 200  # finished jobs share wake-ups of the reactor
    assert len(workers._threads) == 4
    workers.stop()
    assert workers.run(job, 1).called  # after stop: refused at once


def test_stop_lets_queued_jobs_finish() -> None:
    reactor = ThreadReactor()
    workers = ThreadRunner(reactor, size=2)
    done = []
    for n in range(10):
        workers.run(lambda n=n: (time.sleep(0.01), done.append(n)))
    workers.stop(timeout=10)
    assert sorted(done) == list(range(10))


# --------------------------------------------------------------------------- spare spool files


def test_spare_files_are_made_ahead_reused_empty_and_removed_at_stop(tmp_path: Path) -> None:
    reactor = ThreadReactor()
    (tmp_path / "spare").mkdir()
    (tmp_path / "spare" / "sleftover").write_bytes(b"from a crash")
    spare = SpareSpoolFiles(tmp_path, reactor, stock=4)
    assert not (tmp_path / "spare" / "sleftover").exists()  # never answered 250: removed
    assert spare.take() is None  # nothing made yet; this asks for a refill
    reactor.drain()
    path, fd = spare.take()
    assert path.parent == tmp_path / "spare"
    assert (path.stat().st_mode & 0o777) == 0o600
    os.write(fd, b"a message body")
    os.close(fd)
    spare.release(path)  # reused: truncated and back in stock
    assert path.exists() and path.stat().st_size == 0
    taken = [spare.take() for _ in range(4)]
    assert path in [t[0] for t in taken if t is not None]
    for item in taken:
        if item is not None:
            os.close(item[1])
    # A body moved away (into the queue) is simply gone; a file from elsewhere is removed.
    moved = tmp_path / "spare" / "smoved"
    spare.release(moved)
    other = tmp_path / "incoming-file"
    other.write_bytes(b"x")
    spare.release(other)
    assert not other.exists()
    reactor.drain()
    spare.stop()
    # The stock is removed; files handed out (still in use by their transactions) stay.
    in_use = {t[0] for t in taken if t is not None}
    assert set((tmp_path / "spare").iterdir()) == in_use


# --------------------------------------------------------------------------- group commit


def test_group_commit_covers_every_link_made_before_the_fsync() -> None:
    """Each caller returns only after a fsync that *started* after its own call; concurrent
    callers share fsyncs."""
    events: list[tuple[str, int, float]] = []
    lock = threading.Lock()
    fsyncs = []

    def slow_fsync() -> None:
        started = time.monotonic()
        time.sleep(0.01)
        with lock:
            fsyncs.append(started)

    sync = dirfd.DirectorySync()

    def deliver(n: int) -> None:
        linked = time.monotonic()
        sync.sync("new", slow_fsync)
        with lock:
            events.append(("done", n, linked))

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(events) == 40
    assert len(fsyncs) < 40  # shared
    for _, n, linked in events:
        assert any(start >= linked for start in fsyncs), n


def test_a_failed_fsync_covers_nobody() -> None:
    calls = []

    def failing_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.05)
            raise OSError(5, "Input/output error")

    sync = dirfd.DirectorySync()
    outcomes: list[str] = []

    def deliver() -> None:
        try:
            sync.sync("new", failing_once)
        except OSError:
            outcomes.append("error")
        else:
            outcomes.append("ok")

    first = threading.Thread(target=deliver)
    first.start()
    time.sleep(0.01)  # the others arrive while the failing fsync runs
    others = [threading.Thread(target=deliver) for _ in range(5)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(10)
    assert outcomes.count("error") == 1  # the one that ran the failed fsync
    assert outcomes.count("ok") == 5  # the others ran a fsync of their own that succeeded
    assert len(calls) >= 2


@pytest.mark.parametrize("mailboxes", [1, 3])
def test_deliver_still_durable_and_all_or_nothing(tmp_path, mailboxes) -> None:
    spool = tmp_path / "body"
    spool.write_bytes(b"Subject: x\n\nbody\n")
    boxes = [tmp_path / f"box{n}" for n in range(mailboxes)]
    places = maildir.deliver(
        tmp_path, [box.name for box in boxes], b"Return-Path: <a@b>\n", spool,
        hostname="mx.example.org",
    )
    assert len(places) == mailboxes
    for box in boxes:
        [name] = os.listdir(box / "new")
        assert (box / "new" / name).read_bytes() == b"Return-Path: <a@b>\nSubject: x\n\nbody\n"
        assert os.listdir(box / "tmp") == []
