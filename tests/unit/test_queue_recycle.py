"""Recycled queue files (mailsrv.storage.recycle): a finished message's files are moved to
``recycle/``, emptied, and taken again by enqueues and spare spool files.

The crash tests trace the real operations (renames, truncations, removals, writes, write-outs,
fsyncs, on real files under tmp_path) and rebuild from the trace every state a crash can leave:
at each step, with any change not yet covered by an fsync of ``messages/`` lost (per file in
order; a truncation may be lost on its own, a file system may write it after the rename that
follows), a write not yet fsync'd half done unless written out (``fdio.write_out``) before a
rename or removal that survived (a journaling file system commits that change only after what
was written out before it); then the start-up scan loads it. A recycled file is never
taken for a message, a message is whole or absent, and what stays in stock is empty.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import threading
from pathlib import Path

import pytest

from mailsrv.storage import queue, queue_scan, recycle
from mailsrv.storage.queue import queue_dirs
from support.procfs import fd_path
from support.queue_files import BODY, enqueue_spare, spool_dir


@pytest.fixture(autouse=True)
def fresh_views():
    """Each test's processes start without a view of the stock (names listed, counts)."""
    recycle._states.clear()
    yield
    recycle._states.clear()


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    return spool_dir(tmp_path)


def stock(qdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (qdir / "recycle").iterdir()}


# --------------------------------------------------------------------------- tracing


def traced(qdir: Path, monkeypatch: pytest.MonkeyPatch, f) -> tuple[list[tuple], dict, object]:
    """Run ``f()``; its file operations in order (paths relative to *qdir*), then ("returned",).
    Also the files before it (relative path: content)."""
    before = {str(p.relative_to(qdir)): p.read_bytes() for p in qdir.rglob("*") if p.is_file()}
    ops: list[tuple] = []
    real = {name: getattr(os, name) for name in ("fsync", "rename", "truncate", "unlink", "write")}
    real_noreplace = recycle._rename_noreplace
    real_write_out = queue.write_out

    def rel(path: object) -> str:
        return os.path.relpath(os.fspath(path), qdir)  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        real["fsync"](fd)
        path = fd_path(fd)
        content = Path(path).read_bytes() if os.path.isfile(path) else None
        ops.append(("fsync", rel(path), content))

    def rename(src: object, dst: object, **kw: object) -> None:
        real["rename"](src, dst, **kw)
        ops.append(("rename", rel(src), rel(dst)))

    def noreplace(src: str, dst: str) -> None:
        real_noreplace(src, dst)
        ops.append(("rename", rel(src), rel(dst)))

    def truncate(path: object, length: int) -> None:
        real["truncate"](path, length)
        ops.append(("truncate", rel(path)))

    def unlink(path: object, **kw: object) -> None:
        real["unlink"](path, **kw)
        ops.append(("unlink", rel(path)))

    def write(fd: int, data: bytes) -> int:
        n = real["write"](fd, data)
        path = fd_path(fd)
        if path.startswith(str(qdir)):
            ops.append(("write", rel(path)))
        return n

    def write_out(fd: int) -> bool:
        done = real_write_out(fd)
        path = fd_path(fd)
        ops.append(("write out", rel(path), Path(path).read_bytes() if done else None))
        return done

    monkeypatch.setattr(queue, "write_out", write_out)
    for name, fake in (("fsync", fsync), ("rename", rename), ("truncate", truncate),
                       ("unlink", unlink), ("write", write)):
        monkeypatch.setattr(os, name, fake)
    monkeypatch.setattr(recycle, "_rename_noreplace", noreplace)
    result = f()
    monkeypatch.undo()
    ops.append(("returned",))
    return ops, before, result


def _with_files(ops: list[tuple], before: dict) -> list[tuple]:
    """The ops with the file (named by its path before the run) each one acts on."""
    names = {path: path for path in before}  # current path: file
    out = []
    for op in ops:
        if op[0] == "rename":
            file = names.pop(op[1])
            names[op[2]] = file
        elif op[0] in ("truncate", "unlink", "write", "write out", "fsync"):
            file = names.get(op[1], op[1])
            if op[0] == "unlink":
                names.pop(op[1], None)
        else:
            file = None
        out.append((op, file))
    return out


def crash_images(ops: list[tuple], before: dict):
    """(step, {path: content}) for every state a crash at any step may leave."""
    tagged = _with_files(ops, before)
    for step in range(len(tagged) + 1):
        done = tagged[:step]
        synced = max((i for i, (op, _) in enumerate(done) if op[:2] == ("fsync", "messages")),
                     default=-1)
        optional = [i for i, (op, _) in enumerate(done)
                    if op[0] in ("rename", "unlink", "truncate")
                    and not (i < synced and op[0] != "truncate" and _touches_messages(op))]
        for n in range(len(optional) + 1):
            for lost in itertools.combinations(optional, n):
                image = _image(done, set(lost), before)
                if image is not None:
                    yield from ((step, variant) for variant in image)


def _touches_messages(op: tuple) -> bool:
    return any(str(p).startswith("messages/") for p in op[1:3])


def _image(done: list, lost: set[int], before: dict):
    names = dict((path, path) for path in before)  # path: file
    content = dict(before)  # file: durable content
    gone: set[str] = set()  # files of which a metadata change was lost: later ones are too
    written: set[str] = set()  # files written and not fsync'd since
    written_out: dict[str, bytes] = {}  # file: content on the disk once a later change is
    for i, (op, file) in enumerate(done):
        if op[0] in ("rename", "unlink"):
            if i in lost:
                gone.add(file)
                continue
            if file in gone:
                return None  # a later change of a file without its earlier one: not a state
            content.update(written_out)  # committed after what was written out before it
            written.difference_update(written_out)
            written_out.clear()
            path = next(p for p, f in names.items() if f == file)
            del names[path]
            if op[0] == "rename":
                names[op[2]] = file
        elif op[0] == "truncate" and i not in lost:
            content[file] = b""
        elif op[0] == "write":
            written.add(file)
        elif op[0] == "write out" and op[2] is not None:
            written_out[file] = op[2]
        elif op[0] == "fsync" and op[2] is not None:
            content[file] = op[2]
            written.discard(file)
    variants = [{path: content[file] for path, file in names.items()}]
    for file in written:  # a write not fsync'd: whatever it was, or a part
        path = next((p for p, f in names.items() if f == file), None)
        if path is not None:
            variants += [{**v, path: b'{"half'} for v in variants]
    return variants


def rebuild(tmp: Path, image: dict[str, bytes]) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    queue_dirs(tmp)
    for path, data in image.items():
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp / path).write_bytes(data)
    return tmp


def check_loaded(crashed: Path, message, may: bool, must: bool) -> list[str]:
    """Load the crashed queue: the message whole or absent, recycle/ holds empty files only."""
    report = queue_scan.load(crashed)
    loaded = [m.id for m in report.messages]
    assert loaded in ((["ID1"], []) if may else ([],)), loaded
    if must:
        assert loaded == ["ID1"]
    if loaded:
        assert report.messages == [message]
        assert (crashed / "messages" / "ID1.body").read_bytes() == BODY
    assert sorted(p.name for p in (crashed / "messages").iterdir()) == (
        ["ID1.body", "ID1.json"] if loaded else [])
    assert report.corrupt == []
    for name, data in stock(crashed).items():
        assert not name.startswith(".") and data == b"", (name, data)
    return loaded


# --------------------------------------------------------------------------- crash tests


def test_every_crash_state_of_a_removal(qdir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    message = enqueue_spare(qdir)
    ops, before, found = traced(qdir, monkeypatch, lambda: queue.remove(qdir, "ID1"))
    assert found
    kinds = [op[0] for op in ops]
    # Moved out, messages/ fsync'd, and only then emptied and put in stock.
    assert kinds == ["rename", "rename", "fsync", "truncate", "rename", "truncate", "rename",
                     "returned"], ops
    assert sorted(stock(qdir).values()) == [b"", b""] and len(stock(qdir)) == 2
    seen = set()
    for step, image in crash_images(ops, before):
        crashed = rebuild(tmp_path / "crashed", image)
        synced = step > kinds.index("fsync")
        loaded = check_loaded(crashed, message, may=not synced, must=step == 0)
        seen.add((synced, tuple(loaded), tuple(sorted(n[0] for n in stock(crashed)))))
    # What matters was reached: still queued, removed with nothing / some in stock.
    assert (False, ("ID1",), ()) in seen and (True, (), ("r", "r")) in seen
    assert (True, (), ()) in seen


def test_every_crash_state_of_an_enqueue_taking_a_recycled_file(
    qdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The envelope's dot-file is a recycled file (here one a crash left not empty)."""
    (qdir / "recycle" / "rold").write_bytes(b"a finished message's body\n" * 200)
    ops, before, message = traced(qdir, monkeypatch, lambda: enqueue_spare(qdir))
    # Taken and written first; both written out, named, then fsync'd (one journal commit).
    assert [op[:2] for op in ops[:5]] == [
        ("rename", "recycle/rold"), ("write", "messages/.ID1.json.tmp"),
        ("write out", "messages/.ID1.json.tmp"), ("write out", "spare/s1"),
        ("rename", "spare/s1")], ops
    assert stock(qdir) == {}
    for i, op in enumerate(ops):  # a name in messages/ only for content on the disk before it
        if op[0] == "rename" and not op[2].startswith("messages/."):
            assert any(o[0] in ("fsync", "write out") and o[1] == op[1] for o in ops[:i]), op
    returned = len(ops) - 1
    seen = set()
    for step, image in crash_images(ops, before):
        crashed = rebuild(tmp_path / "crashed", image)
        loaded = check_loaded(crashed, message, may=True, must=step >= returned)
        seen.add(tuple(loaded))
    assert seen == {(), ("ID1",)}


# --------------------------------------------------------------------------- taking and stock


def test_enqueue_and_spare_files_reuse_what_removals_recycle(qdir: Path) -> None:
    from mailsrv.storage.spoolfiles import SpareSpoolFiles

    enqueue_spare(qdir)
    inodes = {os.stat(qdir / "messages" / f"ID1.{s}").st_ino for s in ("json", "body")}
    queue.remove(qdir, "ID1")
    assert {os.stat(p).st_ino for p in (qdir / "recycle").iterdir()} == inodes
    recycle._states.clear()
    (qdir / "spare" / "s2").write_bytes(BODY)
    enqueue_spare(qdir, "ID2", body="s2")
    envelope = qdir / "messages" / "ID2.json"
    assert os.stat(envelope).st_ino in inodes
    assert queue.read_message(envelope).id == "ID2" and os.stat(envelope).st_mode & 0o777 == 0o600

    class Reactor:  # runs the spare files' refill at once, on this thread
        def callInThread(self, f, *args):
            f(*args)

        def callFromThread(self, f, *args):
            f(*args)

    spare = SpareSpoolFiles(qdir, Reactor(), stock=2, subdir="proc1")
    taken = [spare.take(), spare.take()]
    try:
        made = [os.stat(path).st_ino for path, _ in filter(None, taken)]
        assert (inodes - {os.stat(envelope).st_ino}) <= set(made)
        assert list((qdir / "recycle").iterdir()) == []
    finally:
        spare.stop()
        for item in taken:
            if item:
                os.close(item[1])


def test_a_file_taken_by_another_process_is_skipped(qdir: Path) -> None:
    """The names this process listed may be gone (another process took them): the next one is
    taken; with none left the file is created."""
    for name in ("ra", "rb"):
        (qdir / "recycle" / name).write_bytes(b"")
    stock_dir = qdir / "recycle"
    assert recycle.take(stock_dir, qdir / "spare" / "mine1")  # lists both, takes one
    left = next(stock_dir.iterdir())
    os.rename(left, qdir / "spare" / "theirs")  # another process takes the other
    assert not recycle.take(stock_dir, qdir / "spare" / "mine2")
    assert sorted(p.name for p in (qdir / "spare").iterdir()) == ["mine1", "s1", "theirs"]


def test_a_destination_that_exists_is_refused_and_the_file_stays_in_stock(qdir: Path) -> None:
    (qdir / "recycle" / "ra").write_bytes(b"")
    with pytest.raises(FileExistsError):
        recycle.take(qdir / "recycle", qdir / "spare" / "s1")
    assert (qdir / "spare" / "s1").read_bytes() == BODY
    assert stock(qdir) == {"ra": b""}
    assert recycle.take(qdir / "recycle", qdir / "spare" / "s2")


def test_threads_taking_at_once_never_share_a_file(qdir: Path) -> None:
    """Several takers (threads here; processes share the directory the same way) over one
    stock: every file goes to exactly one of them."""
    for i in range(200):
        (qdir / "recycle" / f"r{i}").write_bytes(b"")
    inodes = {os.stat(p).st_ino for p in (qdir / "recycle").iterdir()}
    got: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def taker(k: int) -> None:
        start.wait()
        for i in range(60):
            recycle._states.pop(os.fspath(qdir / "recycle"), None)  # each its own view
            dest = qdir / "spare" / f"t{k}-{i}"
            if recycle.take(qdir / "recycle", dest):
                got[k].append(dest.name)

    threads = [threading.Thread(target=taker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    taken = [name for names in got for name in names]
    assert len(taken) == 200 and stock(qdir) == {}
    assert {os.stat(qdir / "spare" / n).st_ino for n in taken} == inodes


def test_the_stock_is_bounded(qdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recycle, "LIMIT", 4)
    for i in range(3):
        (qdir / "spare" / f"b{i}").write_bytes(BODY)
        enqueue_spare(qdir, f"ID{i}", body=f"b{i}")
        queue.remove(qdir, f"ID{i}")
    # 6 files finished; 4 kept (empty), the others removed.
    assert sorted(stock(qdir).values()) == [b""] * 4
    assert list((qdir / "messages").iterdir()) == []


def test_a_failed_fsync_of_messages_recycles_nothing(
    qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removal is not known durable: its files are never emptied (a crash might leave them
    named in messages/), they are removed."""
    enqueue_spare(qdir)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fd_path(fd) == str(qdir / "messages"):
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(queue, "_messages_sync", type(queue._messages_sync)())
    with pytest.raises(queue.DeliveryError, match="I/O error"):
        queue.remove(qdir, "ID1")
    assert stock(qdir) == {} and list((qdir / "messages").iterdir()) == []


def test_startup_removes_what_a_crash_left_in_stock(qdir: Path) -> None:
    (qdir / "recycle" / ".ID9.json").write_bytes(b"a finished message's envelope")
    (qdir / "recycle" / "rfull").write_bytes(b"not emptied before the crash")
    (qdir / "recycle" / "rgood").write_bytes(b"")
    report = queue_scan.load(qdir)
    assert sorted(report.unfinished) == ["recycle/.ID9.json", "recycle/rfull"]
    assert stock(qdir) == {"rgood": b""}


def test_a_process_that_puts_and_never_takes_keeps_a_bounded_view(
    qdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several processes the parent removes (puts) and the receiving processes take: the
    names the parent remembers for its own takes stay bounded, and its take still works."""
    monkeypatch.setattr(recycle, "LIMIT", 4)
    recycle._states.clear()
    for i in range(10):
        (qdir / "spare" / f"b{i}").write_bytes(BODY)
        enqueue_spare(qdir, f"ID{i}", body=f"b{i}")
    for i in range(10):
        queue.remove(qdir, f"ID{i}")
        for path in list((qdir / "recycle").iterdir()):  # another process takes them all
            os.rename(path, qdir / "spare" / f"taken-{path.name}")
    view = recycle._states[os.fspath(qdir / "recycle")]
    assert 0 < len(view.names) <= 4
    assert not recycle.take(qdir / "recycle", qdir / "spare" / "mine")  # stale names skipped
    assert not (qdir / "spare" / "mine").exists()
