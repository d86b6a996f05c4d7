"""Tests for mailsrv.maildir: fsync'd, all-or-nothing Maildir delivery (real files)."""

from __future__ import annotations

import errno
import mailbox
import os
import re
import stat
import threading
from pathlib import Path

import pytest

from mailsrv import maildir
from mailsrv.maildir import DeliveryError, deliver, remove_delivered, unique_name

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


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def files_in(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.is_dir() for p in d.iterdir()]


def leftovers(*maildirs: Path) -> list[Path]:
    return files_in(*(m / sub for m in maildirs for sub in ("tmp", "new", "cur")))


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
    [path] = deliver([md], PREFIX, body, hostname="mail.example.org")
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
        [path] = deliver([md], PREFIX, body, hostname="h")
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
        [path] = deliver([md], PREFIX, body, hostname="h")
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert mode(md / "new") == 0o700


def test_deliver_name_and_size(tmp_path: Path, body: Path) -> None:
    md = tmp_path / "alice"
    [path] = deliver([md], PREFIX, body, hostname="mail.example.org")
    match = NAME_RE.fullmatch(path.name)
    assert match, path.name
    assert int(match["size"]) == len(PREFIX) + len(BODY) == path.stat().st_size
    assert match["host"] == "mail.example.org"


def test_deliver_no_tmp_left(tmp_path: Path, body: Path) -> None:
    md = tmp_path / "alice"
    deliver([md], PREFIX, body, hostname="h")
    assert files_in(md / "tmp", md / "cur") == []
    assert len(files_in(md / "new")) == 1


def test_deliver_existing_maildir(tmp_path: Path, body: Path) -> None:
    md = tmp_path / "alice"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
    first = deliver([md], PREFIX, body, hostname="h")
    second = deliver([md], PREFIX, body, hostname="h")
    assert first != second
    assert len(files_in(md / "new")) == 2


def test_deliver_two_maildirs_share_inode(tmp_path: Path, body: Path) -> None:
    a, b = tmp_path / "d" / "alice", tmp_path / "d" / "bob"
    pa, pb = deliver([a, b], PREFIX, body, hostname="h")
    assert pa.parent == a / "new" and pb.parent == b / "new"
    assert pa.name == pb.name
    sa, sb = pa.stat(), pb.stat()
    assert (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    assert sa.st_nlink == 2
    assert pa.read_bytes() == PREFIX + BODY
    assert sorted(leftovers(a, b)) == sorted([pa, pb])


def test_deliver_duplicates_once(tmp_path: Path, body: Path) -> None:
    a, b = tmp_path / "alice", tmp_path / "bob"
    result = deliver([a, b, a, tmp_path / "x" / ".." / "alice"], PREFIX, body, hostname="h")
    # One path per argument (zip-able with the recipients), one copy per maildir.
    assert len(result) == 4
    assert result[0] == result[2] and result[0].name == result[3].name
    assert result[3].resolve() == result[0].resolve()
    assert len(files_in(a / "new")) == 1 and len(files_in(b / "new")) == 1
    assert result[0].stat().st_nlink == 2


def test_deliver_same_directory_through_symlink_once(tmp_path: Path, body: Path) -> None:
    a = tmp_path / "alice"
    deliver([a], b"", body, hostname="h")  # create it
    (tmp_path / "link").symlink_to(a)
    result = deliver([a, tmp_path / "link"], PREFIX, body, hostname="h")
    assert result[0].name == result[1].name
    assert len(files_in(a / "new")) == 2  # one from the first call, one now
    assert result[0].stat().st_nlink == 1


def dt(address: str) -> bytes:
    return b"Delivered-To: " + address.encode() + b"\n" + PREFIX


def test_deliver_one_prefix_per_maildir(tmp_path: Path, body: Path) -> None:
    a, b, c = tmp_path / "alice", tmp_path / "bob", tmp_path / "carol"
    pa, pb, pc = deliver([a, b, c], [dt("alice"), dt("bob"), dt("alice")], body, hostname="h")
    assert pa.read_bytes() == dt("alice") + BODY and pb.read_bytes() == dt("bob") + BODY
    # Different prefixes: files of their own, each in its own tmp/ first (no copying).
    assert pa.stat().st_ino != pb.stat().st_ino and pb.stat().st_nlink == 1
    # The same prefix: still one file, hard-linked.
    assert pa.stat().st_ino == pc.stat().st_ino and pa.stat().st_nlink == 2
    assert int(NAME_RE.fullmatch(pb.name)["size"]) == len(dt("bob") + BODY)  # type: ignore[index]
    assert sorted(leftovers(a, b, c)) == sorted([pa, pb, pc])


def test_deliver_duplicate_maildir_takes_the_first_prefix(tmp_path: Path, body: Path) -> None:
    a = tmp_path / "alice"
    first, again = deliver([a, a], [dt("one"), dt("two")], body, hostname="h")
    assert first == again and first.read_bytes() == dt("one") + BODY
    assert files_in(a / "new") == [first]


def test_deliver_prefixes_must_match_maildirs(tmp_path: Path, body: Path) -> None:
    with pytest.raises(ValueError):
        deliver([tmp_path / "a", tmp_path / "b"], [PREFIX], body, hostname="h")


def test_every_copy_is_written_before_any_is_linked(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up while writing the second copy leaves nothing in any new/."""
    a, b = tmp_path / "alice", tmp_path / "bob"
    real_create = maildir._create
    linked: list[str] = []
    real_link = os.link

    def create(path: Path) -> int:
        if path.is_relative_to(b):
            assert linked == []
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_create(path)

    def link(src: object, dst: object, *args: object, **kwargs: object) -> None:
        linked.append(str(dst))
        real_link(src, dst, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir, "_create", create)
    monkeypatch.setattr(os, "link", link)
    with pytest.raises(DeliveryError) as info:
        deliver([a, b], [dt("alice"), dt("bob")], body, hostname="h")
    assert info.value.disk_full
    assert linked == []
    assert leftovers(a, b) == []


def test_deliver_nothing(tmp_path: Path, body: Path) -> None:
    assert deliver([], PREFIX, body, hostname="h") == []


def test_deliver_empty_body_and_prefix(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    [path] = deliver([tmp_path / "alice"], b"", empty, hostname="h")
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
    [path] = deliver([tmp_path / "alice"], PREFIX, big, hostname="h")
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
    [path] = deliver([tmp_path / "alice"], PREFIX, big, hostname="h")
    assert path.read_bytes() == PREFIX + big.read_bytes()
    assert max(reads) <= 1 << 20


def test_deliver_missing_body(tmp_path: Path) -> None:
    md = tmp_path / "alice"
    with pytest.raises(DeliveryError) as info:
        deliver([md], PREFIX, tmp_path / "nope", hostname="h")
    assert not info.value.disk_full
    assert "nope" in str(info.value)
    assert leftovers(md) == []


def test_failure_when_second_maildir_parent_is_a_file(tmp_path: Path, body: Path) -> None:
    first = tmp_path / "example.org" / "alice"
    blocker = tmp_path / "other.org"
    blocker.write_bytes(b"not a directory")
    second = blocker / "bob"
    with pytest.raises(DeliveryError) as info:
        deliver([first, second], PREFIX, body, hostname="h")
    assert not info.value.disk_full
    assert "other.org" in str(info.value)
    assert leftovers(first) == []


def test_failure_when_second_new_is_a_file(tmp_path: Path, body: Path) -> None:
    first, second = tmp_path / "alice", tmp_path / "bob"
    (second / "tmp").mkdir(parents=True)
    (second / "cur").mkdir()
    (second / "new").write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        deliver([first, second], PREFIX, body, hostname="h")
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

    def link(src: object, dst: object, *args: object, **kwargs: object) -> None:
        seen.append(str(dst))
        if str(dst).startswith(str(b)):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_link(src, dst, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(DeliveryError) as info:
        deliver([a, b, c], PREFIX, body, hostname="h")
    assert len(seen) == 2  # alice linked, bob failed, carol never tried
    assert not info.value.disk_full
    assert "Input/output error" in str(info.value)
    assert leftovers(a, b, c) == []


def test_failure_at_fsync_of_new_rolls_back(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "alice", tmp_path / "bob"
    real_fsync_dir = maildir.fsync_dir

    def fsync_dir(path: object) -> None:
        if str(path) == str(b / "new"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir, "fsync_dir", fsync_dir)
    with pytest.raises(DeliveryError):
        deliver([a, b], PREFIX, body, hostname="h")
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
        deliver([a, b], PREFIX, body, hostname="h")
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
        deliver([a], PREFIX, body, hostname="h")
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
        deliver([a], PREFIX, body, hostname="h")
    assert not info.value.disk_full
    assert leftovers(a) == []


def test_cross_device_falls_back_to_copy(
    tmp_path: Path, body: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "alice", tmp_path / "bob"
    real_link = os.link

    def link(src: object, dst: object, *args: object, **kwargs: object) -> None:
        # Pretend bob is on another file system: only links from bob's own tmp/ work.
        if str(dst).startswith(str(b)) and not str(src).startswith(str(b)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    pa, pb = deliver([a, b], PREFIX, body, hostname="h")
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

    def link(src: object, dst: object, *args: object, **kwargs: object) -> None:
        if str(dst).startswith(str(b)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst)

    def copy(src_fd: int, dst_fd: int, count: int) -> None:
        calls.append(count)
        if len(calls) == 2:  # the copy into bob's tmp/
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(src_fd, dst_fd, count)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(maildir, "_copy_data", copy)
    with pytest.raises(DeliveryError) as info:
        deliver([a, b], PREFIX, body, hostname="h")
    assert info.value.disk_full
    assert leftovers(a, b) == []


def test_remove_delivered(tmp_path: Path, body: Path) -> None:
    a, b = tmp_path / "alice", tmp_path / "bob"
    paths = deliver([a, b, a], PREFIX, body, hostname="h")
    remove_delivered(paths)
    assert leftovers(a, b) == []
    remove_delivered(paths)  # already gone: no error
    remove_delivered([])


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
