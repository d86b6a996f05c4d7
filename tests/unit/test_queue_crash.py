"""The enqueue's crash guarantee, step by step: every state a crash can leave in the queue is
one the start-up scan handles (never sends half a message, never loses one that got 250).

The enqueue is traced (its fsyncs and renames, real files under tmp_path); from the trace every
crash state is rebuilt in a fresh queue — at each step, with any of the renames not yet covered
by a fsync of ``messages/`` lost (a file system may write them in either order) — and loaded.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import threading
from pathlib import Path

import pytest
from twisted.internet import defer

from mailsrv.outbound.relayer import Relayer
from mailsrv.storage import queue, queue_scan
from mailsrv.storage.queue import queue_dirs
from support.procfs import fd_path
from support.queue_files import BODY, enqueue_spare, spool_dir
from support.queue_runtime import enqueue as queued
from support.queue_runtime import queue_runtime


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    return spool_dir(tmp_path)


def traced_enqueue(qdir: Path, monkeypatch: pytest.MonkeyPatch,
                   write_out: bool = True) -> tuple[list[tuple], object]:
    """Run one enqueue; its write-outs, fsyncs and renames in order, then ("returned",). The
    write-outs are refused when *write_out* is False (a system without sync_file_range)."""
    ops: list[tuple] = []
    real_fsync, real_rename, real_write_out = os.fsync, os.rename, queue.write_out

    def fsync(fd: int) -> None:
        ops.append(("fsync", fd_path(fd)))
        real_fsync(fd)

    def take_write_out(fd: int) -> bool:
        ops.append(("write out", fd_path(fd)))
        return write_out and real_write_out(fd)

    def rename(src: object, dst: object, **kwargs: object) -> None:
        real_rename(src, dst, **kwargs)  # type: ignore[arg-type]
        ops.append(("rename", str(src), str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(queue, "write_out", take_write_out)
    message = enqueue_spare(qdir)
    monkeypatch.undo()
    ops.append(("returned",))
    return ops, message


def check_order(ops: list[tuple], messages: str) -> None:
    """Each file's content is on the disk before it gets its name in messages/: fsync'd, or
    written out (fdio.write_out: a journaling file system commits the name only with or after
    it); each file is fsync'd, and messages/ after the last rename, before enqueue returns
    (the 250)."""
    renames = [i for i, op in enumerate(ops) if op[0] == "rename"]
    assert renames, ops
    for i in renames:
        source = ops[i][1]
        assert ("fsync", source) in ops[:i] or ("write out", source) in ops[:i], (
            f"{source} renamed before its content was on the disk")
        fsynced = ("fsync", source) in ops[:i] or ("fsync", ops[i][2]) in ops[i:]
        assert fsynced, f"{ops[i][2]} not fsync'd before the 250"
    assert ("fsync", messages) in ops[renames[-1]:], "messages/ not fsync'd before the 250"


def crash_states(ops: list[tuple], messages: str):
    """(step, the renames durable at a crash there, whether 250 was given)."""
    for step in range(len(ops) + 1):
        done = ops[:step]
        synced = max((i for i, op in enumerate(done) if op == ("fsync", messages)), default=-1)
        sure = [op for op in done[: synced + 1] if op[0] == "rename"]
        maybe = [op for op in done[synced + 1:] if op[0] == "rename"]
        for n in range(len(maybe) + 1):
            for kept in itertools.combinations(maybe, n):
                yield step, sure + list(kept), ("returned",) in done


def rebuild(tmp: Path, qdir: Path, renames: list[tuple], files: dict[str, bytes]) -> Path:
    """A fresh queue holding *files* (path under the traced queue: content) after *renames*."""
    if tmp.exists():
        shutil.rmtree(tmp)
    queue_dirs(tmp)
    state = dict(files)
    for _, src, dst in renames:
        state[dst] = state.pop(src)
    for path, content in state.items():
        (tmp / Path(path).relative_to(qdir)).write_bytes(content)
    return tmp


@pytest.mark.parametrize("write_out", [True, False], ids=["written-out", "fsynced-first"])
def test_every_crash_state_loads_whole_or_not_at_all(
    qdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_out: bool
) -> None:
    ops, message = traced_enqueue(qdir, monkeypatch, write_out)
    messages = str(qdir / "messages")
    check_order(ops, messages)
    envelope = (qdir / "messages" / "ID1.json").read_bytes()
    tmp_json = str(qdir / "messages" / ".ID1.json.tmp")
    # Before the first rename the body is in spare/ and the envelope (on the disk:
    # check_order) in its dot-file; the dot-file may also be there half written (a crash in its write).
    start = {str(qdir / "spare" / "s1"): BODY, tmp_json: envelope}
    seen = set()
    for step, renames, answered in crash_states(ops, messages):
        for files in (start, {**start, tmp_json: envelope[:20]}):
            if files[tmp_json] != envelope and renames:
                continue  # renamed only once whole
            crashed = rebuild(tmp_path / "crashed", qdir, renames, files)
            report = queue_scan.load(crashed)
            loaded = [m.id for m in report.messages]
            seen.add((len(renames), tuple(loaded)))
            if answered:
                assert loaded == ["ID1"], (step, renames)
            assert loaded in ([], ["ID1"]), (step, renames)
            if loaded:
                assert report.messages == [message]
                assert (crashed / "messages" / "ID1.body").read_bytes() == BODY
            # What was not loaded is gone from messages/ (never sent later either).
            assert sorted(p.name for p in (crashed / "messages").iterdir()) == (
                ["ID1.body", "ID1.json"] if loaded else [])
    # The states that matter were reached: nothing, the body or the envelope alone, both.
    assert {(0, ()), (1, ()), (2, ("ID1",))} <= seen


def test_body_without_envelope_is_removed(qdir: Path) -> None:
    """A crash between the body's rename and the envelope's (or with the envelope's lost)."""
    os.rename(qdir / "spare" / "s1", qdir / "messages" / "ID1.body")
    (qdir / "messages" / ".ID1.json.tmp").write_bytes(b"{}")
    report = queue_scan.load(qdir)
    assert report.messages == [] and sorted(report.unfinished) == [".ID1.json.tmp", "ID1.body"]
    assert list((qdir / "messages").iterdir()) == [] and list((qdir / "corrupt").iterdir()) == []


def test_envelope_without_body_is_removed(qdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The envelope's rename reached the disk and the body's did not: no 250 was given."""
    enqueue_spare(qdir)
    os.unlink(qdir / "messages" / "ID1.body")
    report = queue_scan.load(qdir)
    assert report.messages == [] and report.unfinished == ["ID1.json"]
    assert list((qdir / "messages").iterdir()) == [] and list((qdir / "corrupt").iterdir()) == []


def test_both_files_written_out_named_then_fsyncd_with_the_directory(
    qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One journal commit per enqueue: the body's fsync after the names commits them with
    both contents; the envelope's and the directory's find nothing left to commit."""
    ops, _ = traced_enqueue(qdir, monkeypatch)
    messages = qdir / "messages"
    assert [op[:2] for op in ops] == [
        ("write out", str(messages / ".ID1.json.tmp")), ("write out", str(qdir / "spare" / "s1")),
        ("rename", str(qdir / "spare" / "s1")), ("rename", str(messages / ".ID1.json.tmp")),
        ("fsync", str(messages / "ID1.body")), ("fsync", str(messages / "ID1.json")),
        ("fsync", str(messages)), ("returned",)]


def test_without_write_out_both_files_are_fsyncd_before_their_names(
    qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops, _ = traced_enqueue(qdir, monkeypatch, write_out=False)
    messages = qdir / "messages"
    assert [op[:2] for op in ops if op[0] != "write out"] == [
        ("fsync", str(qdir / "spare" / "s1")), ("fsync", str(messages / ".ID1.json.tmp")),
        ("rename", str(qdir / "spare" / "s1")), ("rename", str(messages / ".ID1.json.tmp")),
        ("fsync", str(messages)), ("returned",)]


def test_the_scan_waits_for_an_enqueue_in_progress(
    qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server accepts mail while its queue loads: an enqueue half done when the scan
    starts must not be taken for a crash's leftover."""
    enqueue_spare(qdir, "OLD")
    # An enqueue in progress: messages/ locked shared, its body renamed, its envelope not yet.
    held = os.open(qdir / "messages", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_SH)
    (qdir / "messages" / "NEW.body").write_bytes(BODY)
    envelope = (qdir / "messages" / "OLD.json").read_bytes()
    asking = threading.Event()
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX:
            asking.set()
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    result: list[queue_scan.LoadReport] = []
    scan = threading.Thread(target=lambda: result.append(queue_scan.load(qdir)))
    scan.start()
    try:
        assert asking.wait(30), "the scan did not lock messages/"
        (qdir / "messages" / "NEW.json").write_bytes(envelope.replace(b'"OLD"', b'"NEW"'))
    finally:
        os.close(held)  # the enqueue is done: the scan goes on
        scan.join(30)
    assert not scan.is_alive()
    assert sorted(m.id for m in result[0].messages) == ["NEW", "OLD"]
    assert result[0].unfinished == []


def test_a_message_accepted_while_the_queue_loads_goes_out_once(tmp_path: Path) -> None:
    """The intake hands a new message to the relayer (add) without waiting for a scan; when
    the start-up scan, still running, finds it too, it is not scheduled a second time."""
    runtime = queue_runtime(tmp_path)
    relayer = Relayer(runtime)
    sessions: list = []
    relayer.scheduler.deliver = lambda key, batch: sessions.append(batch) or defer.Deferred()
    runtime.workers.hold()
    relayer.startService()  # the scan waits in the (held) thread
    try:
        message = queued(runtime, "NEW", "a@example.org", ["bob@remote.test"], 0.0)
        relayer.add(message)
        runtime.workers.release()  # the scan runs now, and finds NEW on disk
        assert relayer.loaded and relayer.messages["NEW"] is message
        relayer.reactor.advance(0)
        relayer.reactor.advance(1)
        assert sessions == [[("NEW", ["bob@remote.test"])]]
    finally:
        relayer.stopService()


def test_an_id_being_enqueued_elsewhere_is_refused_and_left_alone(qdir: Path) -> None:
    """The same id's envelope dot-file exists (another enqueue under way): refused, and its
    dot-file is not ours to remove."""
    (qdir / "messages" / ".ID1.json.tmp").write_bytes(b"theirs")
    with pytest.raises(queue.DeliveryError, match="File exists"):
        enqueue_spare(qdir)
    assert (qdir / "messages" / ".ID1.json.tmp").read_bytes() == b"theirs"
    assert (qdir / "spare" / "s1").read_bytes() == BODY
