"""Tests for mailsrv.storage.maildir: fsync'd, all-or-nothing Maildir delivery (real files)."""

from __future__ import annotations

import errno
import mailbox
import os
import re
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from mailsrv.storage import maildir
from mailsrv.storage.maildir import DeliveryError, remove_delivered
from mailsrv.storage.maildir_name import unique_name
from support.procfs import open_fd_count

PREFIX = b"Return-Path: <a@example.org>\nReceived: from x (unknown [192.0.2.7])\n"
BODY = b"Subject: hello\n\nHello Bob.\n"
NAME_RE = re.compile(
    r"(?P<secs>\d+)\.M(?P<usecs>\d{1,6})P(?P<pid>\d+)Q(?P<q>\d+)R(?P<rand>[0-9a-f]{16})"
    r"\.(?P<host>[^/:]+),S=(?P<size>\d+)"
)


@pytest.fixture
def body(tmp_path: Path) -> Path:
    path = tmp_path / "spool" / "incoming" / "ID1"
    path.parent.mkdir(parents=True)
    path.write_bytes(BODY)
    return path


def deliver(*args: object, **kwargs: object) -> list[Path]:
    """maildir.deliver, its paths (strings) read here as Paths."""
    return [Path(p) for p in maildir.deliver(*args, **kwargs)]  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def files_in(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.is_dir() for p in d.iterdir()]


def leftovers(*maildirs: Path) -> list[Path]:
    return files_in(*(m / sub for m in maildirs for sub in ("tmp", "new", "cur")))


def rel(root: Path, *maildirs: Path) -> list[Path]:
    """The maildirs as ``deliver`` takes them: relative to the root."""
    return [m.relative_to(root) for m in maildirs]


def is_dir_of(fd: object, path: Path) -> bool:
    """Whether the descriptor *fd* (a ``dir_fd`` argument) is the directory *path*."""
    return isinstance(fd, int) and path.is_dir() and os.path.samestat(os.fstat(fd), path.stat())


# --- unique_name -----------------------------------------------------------------


def test_unique_name_format() -> None:
    name = unique_name("mail.example.org", 1234)
    match = NAME_RE.fullmatch(name)
    assert match, name
    assert match["host"] == "mail.example.org"
    assert match["size"] == "1234"
    assert int(match["pid"]) == os.getpid()
    assert int(match["usecs"]) < 1_000_000


def test_unique_name_escapes_host() -> None:
    name = unique_name("a/b:c", 1)
    assert name.endswith(".a\\057b\\072c,S=1")
    assert "/" not in name and ":" not in name


def test_unique_name_unique_across_threads() -> None:
    names: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [unique_name("h", 1) for _ in range(500)]
        with lock:
            names.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == len(names) == 4000
    counters = [int(NAME_RE.fullmatch(n)["q"]) for n in names]  # type: ignore[index]
    assert len(set(counters)) == len(counters)


# --- deliver ---------------------------------------------------------------------


def test_deliver_readable_with_mailbox_module(tmp_path: Path, body: Path) -> None:
    md = tmp_path / "mail" / "example.org" / "alice"
    [path] = deliver(tmp_path, rel(tmp_path, md), PREFIX, body, hostname="mail.example.org")
    assert path.parent == md / "new"
    box = mailbox.Maildir(md, factory=None, create=False)
    keys = box.keys()
    assert len(keys) == 1
    assert box.get_bytes(keys[0]) == PREFIX + BODY
    assert box[keys[0]]["Subject"] == "hello"
    assert path.read_bytes() == PREFIX + BODY
    # The body in the spool is left alone (the caller owns it).
    assert body.read_bytes() == BODY


def test_deliver_modes(tmp_path: Path, body: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    md = root / "example.org" / "alice"
    old = os.umask(0o022)
    try:
        [path] = deliver(tmp_path, rel(tmp_path, md), PREFIX, body, hostname="h")
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    for d in (root / "example.org", md, md / "tmp", md / "new", md / "cur"):
        assert mode(d) == 0o700, d
    assert mode(root) == 0o755  # existing directories are not touched


def test_deliver_modes_with_strict_umask(tmp_path: Path, body: Path) -> None:
    md = tmp_path / "alice"
    old = os.umask(0o777)
    try:
        [path] = deliver(tmp_path, rel(tmp_path, md), PREFIX, body, hostname="h")
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert mode(md / "new") == 0o700


def test_deliver_name_and_size(tmp_path: Path, body: Path) -> None:
    md = tmp_path / "alice"
    [path] = deliver(tmp_path, rel(tmp_path, md), PREFIX, body, hostname="mail.example.org")
    match = NAME_RE.fullmatch(path.name)
    assert match, path.name
    assert int(match["size"]) == len(PREFIX) + len(BODY) == path.stat().st_size
    assert match["host"] == "mail.example.org"


def test_deliver_no_tmp_left(tmp_path: Path, body: Path) -> None:
    md = tmp_path / "alice"
    deliver(tmp_path, rel(tmp_path, md), PREFIX, body, hostname="h")
    assert files_in(md / "tmp", md / "cur") == []
    assert len(files_in(md / "new")) == 1


def test_a_body_held_in_memory_is_written_without_reading_the_file(tmp_path: Path) -> None:
    """The caller that holds the body passes it: the file is the same, and the body file
    is never opened (here it does not even exist)."""
    a, b = tmp_path / "d" / "alice", tmp_path / "d" / "bob"
    missing = tmp_path / "spool" / "never-written"
    pa, pb = deliver(tmp_path, rel(tmp_path, a, b), PREFIX, missing, hostname="h", body=BODY)
    assert pa.read_bytes() == PREFIX + BODY and pb.samefile(pa)
    assert int(NAME_RE.fullmatch(pa.name)["size"]) == len(PREFIX) + len(BODY)
    assert mode(pa) == 0o600 and files_in(a / "tmp", b / "tmp") == []


def test_deliver_existing_maildir(tmp_path: Path, body: Path) -> None:
    md = tmp_path / "alice"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
    first = deliver(tmp_path, rel(tmp_path, md), PREFIX, body, hostname="h")
    second = deliver(tmp_path, rel(tmp_path, md), PREFIX, body, hostname="h")
    assert first != second
    assert len(files_in(md / "new")) == 2


def test_deliver_two_maildirs_share_inode(tmp_path: Path, body: Path) -> None:
    a, b = tmp_path / "d" / "alice", tmp_path / "d" / "bob"
    pa, pb = deliver(tmp_path, rel(tmp_path, a, b), PREFIX, body, hostname="h")
    assert pa.parent == a / "new" and pb.parent == b / "new"
    assert pa.name == pb.name
    sa, sb = pa.stat(), pb.stat()
    assert (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    assert sa.st_nlink == 2
    assert pa.read_bytes() == PREFIX + BODY
    assert sorted(leftovers(a, b)) == sorted([pa, pb])


def test_deliver_duplicates_once(tmp_path: Path, body: Path) -> None:
    a, b = tmp_path / "alice", tmp_path / "bob"
    result = deliver(tmp_path, ["alice", "bob", "alice", "./alice"], PREFIX, body, hostname="h")
    # One path per argument (zip-able with the recipients), one copy per maildir.
    assert len(result) == 4
    assert result[0] == result[2] == result[3]
    assert len(files_in(a / "new")) == 1 and len(files_in(b / "new")) == 1
    assert result[0].stat().st_nlink == 2


def test_deliver_same_directory_through_a_bind_mount_once(tmp_path: Path, body: Path) -> None:
    """Two names for one directory without a link (a bind mount): one copy."""
    a, b = tmp_path / "alice", tmp_path / "bob"
    a.mkdir()
    b.mkdir()
    if subprocess.run(["mount", "--bind", str(a), str(b)], capture_output=True).returncode:
        pytest.skip("bind mounts need root (and mount)")
    try:
        result = deliver(tmp_path, ["alice", "bob"], PREFIX, body, hostname="h")
        assert result[0] == result[1] == a / "new" / result[0].name
        assert len(files_in(a / "new")) == 1
        assert result[0].stat().st_nlink == 1
    finally:
        subprocess.run(["umount", str(b)], check=False)


def test_the_file_is_written_before_any_link(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up while the file is written leaves nothing in any new/."""
    a, b = tmp_path / "alice", tmp_path / "bob"
    linked: list[str] = []
    real_link = os.link

    def create(dir_fd: int, name: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

    def link(src: object, dst: object, **kwargs: object) -> None:
        linked.append(str(dst))
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir, "_create", create)
    monkeypatch.setattr(os, "link", link)
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, ["alice", "bob"], PREFIX, body, hostname="h")
    assert info.value.disk_full
    assert linked == []
    assert leftovers(a, b) == []


def test_new_directories_are_fsynced_after_every_link(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Links in a row share one journal commit: no new/ is fsync'd between two links
    (one fsync per link made ten mailboxes wait for ten commits); each new/ is fsync'd."""
    users = [f"u{n}" for n in range(maildir._HELD)]
    steps: list[tuple[str, object]] = []
    real_link, real_fsync = os.link, os.fsync

    def link(src: object, dst: object, **kwargs: object) -> None:
        steps.append(("link", kwargs.get("dst_dir_fd")))
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            steps.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "fsync", fsync)
    paths = deliver(tmp_path, users, PREFIX, body, hostname="h")
    kinds = [kind for kind, _ in steps]
    first = kinds.index("link")  # the fsyncs before it made the directories
    steps, kinds = steps[first:], kinds[first:]
    assert kinds == ["link"] * len(users) + ["fsync"] * len(users)
    assert {ino for kind, ino in steps if kind == "fsync"} == {
        (tmp_path / u / "new").stat().st_ino for u in users}
    assert paths[0].stat().st_nlink == len(users)


def _record_steps(monkeypatch: pytest.MonkeyPatch, steps: list[str], write_out: bool) -> None:
    """Note each write-out, link and fsync (of the file or of a directory) in *steps*; the
    write-out is refused when *write_out* is False (a system without sync_file_range)."""
    real_link, real_fsync, real_write_out = os.link, os.fsync, maildir._write_out

    def link(src: object, dst: object, **kwargs: object) -> None:
        steps.append("link")
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        steps.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def take_write_out(fd: int) -> bool:
        steps.append("write out")
        return write_out and real_write_out(fd)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(maildir, "_write_out", take_write_out)


def test_the_links_come_between_the_write_out_and_the_fsyncs(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One journal commit per delivery: the data is written out before any link, the file
    is fsync'd after the last link (committing the links with it), then each new/; all
    before deliver returns."""
    deliver(tmp_path, ["alice", "bob"], PREFIX, body, hostname="h")  # makes the directories
    steps: list[str] = []
    _record_steps(monkeypatch, steps, write_out=True)
    paths = deliver(tmp_path, ["alice", "bob"], PREFIX, body, hostname="h")
    assert steps == ["write out", "link", "link", "fsync file", "fsync dir", "fsync dir"]
    assert paths[0].read_bytes() == PREFIX + BODY and paths[0].stat().st_nlink == 2


def test_where_the_data_cannot_be_written_out_the_file_is_fsyncd_before_any_link(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliver(tmp_path, ["alice", "bob"], PREFIX, body, hostname="h")  # makes the directories
    steps: list[str] = []
    _record_steps(monkeypatch, steps, write_out=False)
    paths = deliver(tmp_path, ["alice", "bob"], PREFIX, body, hostname="h")
    assert steps == ["write out", "fsync file", "link", "link", "fsync dir", "fsync dir"]
    assert paths[1].read_bytes() == PREFIX + BODY


def test_failure_at_fsync_of_the_file_after_the_links_rolls_back(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The links made before the file's fsync are taken back when it fails: the client gets
    a 451 and sends again, so no copy may stay."""
    a, b = tmp_path / "alice", tmp_path / "bob"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, a, b), PREFIX, body, hostname="h")
    assert str(info.value).startswith(f"cannot fsync {a / 'tmp'}/")
    assert str(info.value).endswith(": [Errno 5] Input/output error")
    assert leftovers(a, b) == []


def test_many_maildirs_keep_few_descriptors_open(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the few Maildirs a delivery holds open, the others are walked to again."""
    count = 3 * maildir._HELD
    users = [f"u{n}" for n in range(count)]
    real_link = os.link
    open_fds: list[int] = []

    def link(src: object, dst: object, **kwargs: object) -> None:
        open_fds.append(open_fd_count())
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    before = open_fd_count()
    paths = deliver(tmp_path, users, PREFIX, body, hostname="h")
    assert max(open_fds) <= before + 2 * maildir._HELD + 8
    assert open_fd_count() == before
    for user, path in zip(users, paths):
        assert path.parent == tmp_path / user / "new"
        assert path.read_bytes() == PREFIX + BODY
    assert paths[0].stat().st_nlink == count  # one file
    assert sorted(leftovers(*(tmp_path / u for u in users))) == sorted(paths)


def test_failure_with_many_maildirs_rolls_back_everything(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 2 * maildir._HELD + 2
    users = [f"u{n}" for n in range(count)]
    real_link = os.link

    def link(src: object, dst: object, **kwargs: object) -> None:
        if is_dir_of(kwargs.get("dst_dir_fd"), tmp_path / users[-1] / "new"):
            raise OSError(errno.EIO, "Input/output error")
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(DeliveryError):
        deliver(tmp_path, users, PREFIX, body, hostname="h")
    assert leftovers(*(tmp_path / u for u in users)) == []


def test_deliver_nothing(tmp_path: Path, body: Path) -> None:
    assert deliver(tmp_path, [], PREFIX, body, hostname="h") == []


def test_deliver_empty_body_and_prefix(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    [path] = deliver(tmp_path, ["alice"], b"", empty, hostname="h")
    assert path.read_bytes() == b""
    assert path.name.endswith(",S=0")


def test_deliver_large_body_streamed(tmp_path: Path) -> None:
    big = tmp_path / "big"
    chunk = bytes(range(256)) * 4096  # 1 MiB, not all one byte value
    with open(big, "wb") as f:
        for i in range(20):
            f.write(chunk[i:] + chunk[:i])
    size = big.stat().st_size
    assert size == 20 * 1024 * 1024
    [path] = deliver(tmp_path, ["alice"], PREFIX, big, hostname="h")
    assert path.stat().st_size == len(PREFIX) + size
    assert path.name.endswith(f",S={len(PREFIX) + size}")
    with open(path, "rb") as got, open(big, "rb") as want:
        assert got.read(len(PREFIX)) == PREFIX
        while True:
            a, b = got.read(1 << 20), want.read(1 << 20)
            assert a == b
            if not a:
                break


def test_deliver_large_body_without_sendfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read/write fallback copies in bounded chunks and gives the same bytes."""

    def no_sendfile(*args: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    reads: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    monkeypatch.setattr(os, "pread", pread)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    [path] = deliver(tmp_path, ["alice"], PREFIX, big, hostname="h")
    assert path.read_bytes() == PREFIX + big.read_bytes()
    assert max(reads) <= 1 << 20


def test_deliver_missing_body(tmp_path: Path) -> None:
    md = tmp_path / "alice"
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, md), PREFIX, tmp_path / "nope", hostname="h")
    assert not info.value.disk_full
    assert "nope" in str(info.value)
    assert leftovers(md) == []


def test_failure_when_second_maildir_parent_is_a_file(tmp_path: Path, body: Path) -> None:
    first = tmp_path / "example.org" / "alice"
    blocker = tmp_path / "other.org"
    blocker.write_bytes(b"not a directory")
    second = blocker / "bob"
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, first, second), PREFIX, body, hostname="h")
    assert not info.value.disk_full
    assert "other.org" in str(info.value)
    assert leftovers(first) == []


def test_failure_when_second_new_is_a_file(tmp_path: Path, body: Path) -> None:
    first, second = tmp_path / "alice", tmp_path / "bob"
    (second / "tmp").mkdir(parents=True)
    (second / "cur").mkdir()
    (second / "new").write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, first, second), PREFIX, body, hostname="h")
    assert str(second / "new") in str(info.value)
    assert leftovers(first) == []
    assert files_in(second / "tmp") == []


def test_failure_after_first_link_rolls_back(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first copy is already in new/ when the second link fails: it must go."""
    a, b, c = tmp_path / "alice", tmp_path / "bob", tmp_path / "carol"
    real_link = os.link
    seen: list[str] = []

    def link(src: object, dst: object, **kwargs: object) -> None:
        seen.append(str(dst))
        if is_dir_of(kwargs.get("dst_dir_fd"), b / "new"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, a, b, c), PREFIX, body, hostname="h")
    assert len(seen) == 2  # alice linked, bob failed, carol never tried
    assert not info.value.disk_full
    assert "Input/output error" in str(info.value)
    assert leftovers(a, b, c) == []


def test_failure_at_fsync_of_new_rolls_back(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "alice", tmp_path / "bob"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if is_dir_of(fd, b / "new"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, a, b), PREFIX, body, hostname="h")
    assert str(info.value) == f"cannot fsync directory {b / 'new'}: [Errno 5] Input/output error"
    assert leftovers(a, b) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_on_write(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def write(fd: int, data: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", write)
    a, b = tmp_path / "alice", tmp_path / "bob"
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, a, b), PREFIX, body, hostname="h")
    assert info.value.disk_full
    assert info.value.errno == code
    assert "tmp" in str(info.value) and os.strerror(code) in str(info.value)
    assert leftovers(a, b) == []


def test_disk_full_in_body_copy(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def copy(src_fd: int, dst_fd: int, count: int) -> None:
        os.write(dst_fd, b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir, "_copy_data", copy)
    a = tmp_path / "alice"
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, a), PREFIX, body, hostname="h")
    assert info.value.disk_full
    assert leftovers(a) == []


def test_other_error_is_not_disk_full(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    a = tmp_path / "alice"
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, a), PREFIX, body, hostname="h")
    assert not info.value.disk_full
    assert leftovers(a) == []


def test_cross_device_falls_back_to_copy(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "alice", tmp_path / "bob"
    real_link = os.link

    def link(src: object, dst: object, **kwargs: object) -> None:
        # Pretend bob is on another file system: only links from bob's own tmp/ work.
        if is_dir_of(kwargs.get("dst_dir_fd"), b / "new") and not is_dir_of(
            kwargs.get("src_dir_fd"), b / "tmp"
        ):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    pa, pb = deliver(tmp_path, rel(tmp_path, a, b), PREFIX, body, hostname="h")
    assert pa.read_bytes() == pb.read_bytes() == PREFIX + BODY
    assert pa.stat().st_ino != pb.stat().st_ino
    assert pa.stat().st_nlink == pb.stat().st_nlink == 1
    assert mode(pb) == 0o600
    assert files_in(a / "tmp", b / "tmp") == []


def test_cross_device_copy_failure_rolls_back(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "alice", tmp_path / "bob"
    real_copy = maildir._copy_data
    real_link = os.link
    calls: list[int] = []

    def link(src: object, dst: object, **kwargs: object) -> None:
        if is_dir_of(kwargs.get("dst_dir_fd"), b / "new"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    def copy(src_fd: int, dst_fd: int, count: int) -> None:
        calls.append(count)
        if len(calls) == 2:  # the copy into bob's tmp/
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(src_fd, dst_fd, count)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(maildir, "_copy_data", copy)
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, rel(tmp_path, a, b), PREFIX, body, hostname="h")
    assert info.value.disk_full
    assert leftovers(a, b) == []


def test_remove_delivered(tmp_path: Path, body: Path) -> None:
    a, b = tmp_path / "alice", tmp_path / "bob"
    paths = deliver(tmp_path, rel(tmp_path, a, b, a), PREFIX, body, hostname="h")
    remove_delivered(tmp_path, paths)
    assert leftovers(a, b) == []
    remove_delivered(tmp_path, paths)  # already gone: no error
    remove_delivered(tmp_path, [])


def test_remove_delivered_follows_no_link(tmp_path: Path, body: Path) -> None:
    """A new/ replaced by a link since the delivery: the file it leads to is not removed."""
    [path] = deliver(tmp_path, ["example.org/bob"], PREFIX, body, hostname="h")
    new = tmp_path / "example.org" / "bob" / "new"
    new.rename(tmp_path / "elsewhere")
    new.symlink_to(tmp_path / "elsewhere")
    remove_delivered(tmp_path, [path])
    assert (tmp_path / "elsewhere" / path.name).exists()


def test_delivery_error_str_names_path_and_error() -> None:
    err = DeliveryError.from_oserror(
        "create", Path("/x/tmp/y"), OSError(errno.ENOSPC, "No space left on device")
    )
    assert str(err) == "cannot create /x/tmp/y: [Errno 28] No space left on device"
    assert err.disk_full
    assert isinstance(err, Exception)
    plain = DeliveryError("something")
    assert not plain.disk_full


def test_ensure_dir(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    maildir.ensure_dir(target)
    maildir.ensure_dir(target)  # idempotent
    assert all(mode(p) == 0o700 for p in (tmp_path / "a", tmp_path / "a" / "b", target))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DeliveryError):
        maildir.ensure_dir(tmp_path / "file" / "sub")
    with pytest.raises(DeliveryError):
        maildir.ensure_dir(tmp_path / "file")


# --- symbolic links below the root ----------------------------------------------------


def tree(path: Path) -> list[str]:
    """Every name under *path* (not following links), to show nothing was written there."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def make_maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    return path


@pytest.mark.parametrize(
    "link, target",
    [
        ("example.org", "elsewhere"),  # the domain directory
        ("example.org/bob", "elsewhere/bob"),  # the user's, to a directory outside
        ("example.org/bob", "example.org/carol"),  # ... to another user's Maildir
        ("example.org/bob", "other.net/carol"),  # ... written as ../other.net/carol
        ("example.org/bob/new", "elsewhere/bob/new"),
        ("example.org/bob/tmp", "elsewhere/bob/tmp"),
        ("example.org/bob/cur", "elsewhere/bob/cur"),
    ],
)
def test_a_symlink_below_the_root_is_refused_and_nothing_is_written(
    tmp_path: Path, body: Path, link: str, target: str
) -> None:
    root = tmp_path / "mail"
    alice = make_maildir(root / "example.org" / "alice")
    for place in ("elsewhere/bob", "example.org/carol", "other.net/carol"):
        make_maildir(root / place)
    bob = root / "example.org" / "bob"
    if link.startswith("example.org/bob/"):
        make_maildir(bob)
        (root / link).rmdir()
    else:
        bob.parent.mkdir(exist_ok=True)
    if link == "example.org":
        (root / "elsewhere" / "alice").mkdir()
        alice = root / "elsewhere" / "alice"  # what alice's mail would go into
        for path in sorted((root / "example.org").rglob("*"), reverse=True):
            path.rmdir()
        (root / "example.org").rmdir()
    (root / link).symlink_to(os.path.relpath(root / target, (root / link).parent))
    before = tree(root / target.split("/")[0]), tree(alice)
    with pytest.raises(DeliveryError) as info:
        deliver(root, ["example.org/alice", "example.org/bob"], PREFIX, body, hostname="h")
    assert str(info.value) == (
        f"cannot open directory {root / link}: [Errno 40] a symbolic link, not followed"
    )
    assert not info.value.disk_full
    # All or nothing: alice got nothing either, and nothing was created through the link.
    assert (tree(root / target.split("/")[0]), tree(alice)) == before
    assert os.path.islink(root / link)


def test_a_symlinked_root_is_followed(tmp_path: Path, body: Path) -> None:
    """The administrator may put the root elsewhere (/var/mail -> /srv/mail)."""
    (tmp_path / "srv" / "mail").mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "mail").symlink_to(tmp_path / "srv" / "mail")
    root = tmp_path / "var" / "mail"
    [path] = deliver(root, ["example.org/bob"], PREFIX, body, hostname="h")
    assert path == root / "example.org" / "bob" / "new" / path.name
    assert files_in(tmp_path / "srv" / "mail" / "example.org" / "bob" / "new") == [
        tmp_path / "srv" / "mail" / "example.org" / "bob" / "new" / path.name
    ]


def test_a_maildir_replaced_by_a_symlink_after_a_delivery_is_refused(
    tmp_path: Path, body: Path
) -> None:
    """What earlier deliveries found is not trusted: every level is opened again."""
    root = tmp_path / "mail"
    deliver(root, ["example.org/bob"], PREFIX, body, hostname="h")
    bob = root / "example.org" / "bob"
    bob.rename(root / "example.org" / "bob.old")
    bob.symlink_to("bob.old")
    with pytest.raises(DeliveryError, match="a symbolic link, not followed"):
        deliver(root, ["example.org/bob"], PREFIX, body, hostname="h")
    assert len(files_in(root / "example.org" / "bob.old" / "new")) == 1
    bob.unlink()  # repaired by hand: delivered again (the directories are made anew)
    deliver(root, ["example.org/bob"], PREFIX, body, hostname="h")
    assert len(files_in(bob / "new")) == 1
    (bob / "new").rename(bob / "new.old")
    (bob / "new").symlink_to("new.old")
    with pytest.raises(DeliveryError, match="a symbolic link, not followed"):
        deliver(root, ["example.org/bob"], PREFIX, body, hostname="h")
    assert len(files_in(bob / "new.old")) == 1
    assert files_in(bob / "tmp") == []


def test_a_file_in_place_of_tmp_is_refused(tmp_path: Path, body: Path) -> None:
    bob = tmp_path / "bob"
    bob.mkdir()
    (bob / "tmp").write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path, ["bob"], PREFIX, body, hostname="h")
    assert str(info.value) == f"cannot open directory {bob / 'tmp'}: [Errno 20] not a directory"


@pytest.mark.parametrize("maildir_name", ["../bob", "example.org/../bob", "/abs/bob"])
def test_a_maildir_outside_the_root_is_refused(
    tmp_path: Path, body: Path, maildir_name: str
) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    with pytest.raises(DeliveryError, match="(not a plain directory name|not a path below)"):
        deliver(root, ["alice", maildir_name], PREFIX, body, hostname="h")
    assert tree(tmp_path) == ["mail", "spool", "spool/incoming", "spool/incoming/ID1"]
