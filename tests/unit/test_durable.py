"""Tests for mailsrv.storage.durable: write, fsync, rename, fsync the directory."""

from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import pytest

import mailsrv
from mailsrv.storage import durable
from mailsrv.storage.durable import DeliveryError, doing
from support.procfs import fd_path


def _eio() -> OSError:
    return OSError(errno.EIO, "Input/output error")


def test_replace_puts_the_new_content_in_place_and_fsyncs_file_then_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    events: list[str] = []
    real_fsync, real_rename, real_fsync_dir = os.fsync, os.rename, durable.fsync_dir

    def fsync(fd: int) -> None:
        path = fd_path(fd)
        if not os.path.isdir(path):
            events.append("fsync " + os.path.basename(path))
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        events.append("rename")
        real_rename(src, dst)

    def fsync_dir(path: object) -> None:
        events.append(f"fsync dir {os.fspath(path)}")  # type: ignore[call-overload]
        real_fsync_dir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    durable.replace(target, b"new")
    assert target.read_bytes() == b"new"
    assert events[0].startswith("fsync .state.json.") and events[0].endswith(".tmp")
    assert events[1:] == ["rename", f"fsync dir {tmp_path}"]
    assert os.listdir(tmp_path) == ["state.json"]
    assert target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("step", ["write", "fsync", "check", "rename"])
def test_a_failed_replace_keeps_the_old_content_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    target = tmp_path / "users"
    target.write_bytes(b"old")

    def fail(*args: object, **kwargs: object) -> None:
        raise _eio()

    def refuse(path: Path) -> None:
        assert path.read_bytes() == b"new" and path.parent == tmp_path
        raise ValueError("refused")

    if step != "check":
        monkeypatch.setattr(os, step, fail)
    with pytest.raises(ValueError if step == "check" else OSError):
        durable.replace(target, b"new", check=refuse if step == "check" else None)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["users"]


def test_prepare_sees_the_written_file_before_its_fsync(tmp_path: Path) -> None:
    target = tmp_path / "users"
    seen: list[int] = []

    def prepare(fd: int) -> None:
        seen.append(os.fstat(fd).st_size)
        os.fchmod(fd, 0o640)

    durable.replace(target, b"text", prepare=prepare)
    assert seen == [4] and target.stat().st_mode & 0o777 == 0o640


def test_write_out_is_taken_by_a_file_and_refused_quietly_elsewhere(tmp_path: Path) -> None:
    """The call reaches the kernel for a file with unwritten data (Linux has sync_file_range:
    were it not found, enqueues and Maildir deliveries would silently cost two journal
    commits again); a pipe refuses it (ESPIPE) without an exception."""
    from mailsrv.storage.fdio import write_out as call

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    read_end, write_end = os.pipe()
    try:
        os.write(fd, b"x" * 5000)
        assert call(fd) is True
        assert call(write_end) is False
    finally:
        for each in (fd, read_end, write_end):
            os.close(each)


def test_read_file_reads_all_of_a_file_and_closes_it(tmp_path: Path) -> None:
    from mailsrv.storage.fdio import read_file

    data = bytes(range(256)) * 600  # beyond one read of 64 KiB
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    before = len(os.listdir("/proc/self/fd"))
    assert read_file(tmp_path / "big") == data and read_file(str(tmp_path / "empty")) == b""
    with pytest.raises(FileNotFoundError):
        read_file(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        read_file(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == before


def test_write_new_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "x"
    durable.write_new(path, b"one")
    with pytest.raises(FileExistsError):
        durable.write_new(path, b"two")
    assert path.read_bytes() == b"one"


def test_named_by_doing_a_failed_step_is_a_delivery_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DeliveryError) as info:
        durable.write_new(tmp_path / "x", b"data", named=doing)
    assert info.value.disk_full
    assert str(info.value) == f"cannot write {tmp_path / 'x'}: [Errno 28] No space left on device"

    monkeypatch.undo()
    monkeypatch.setattr(durable, "fsync_dir", lambda path: (_ for _ in ()).throw(_eio()))
    with pytest.raises(DeliveryError) as info:
        durable.replace(tmp_path / "y", b"data", named=doing)
    assert str(info.value) == f"cannot fsync directory {tmp_path}: [Errno 5] Input/output error"
    assert not info.value.disk_full


def test_no_module_imports_another_modules_private_names() -> None:
    """The queue once borrowed maildir's ``_doing`` and ``_write_all``: storage helpers are
    public, in mailsrv.storage.durable, mailsrv.storage.dirfd and mailsrv.storage.fdio."""
    package = Path(mailsrv.__file__).parent
    borrowed = []
    for source in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mailsrv"):
                borrowed += [f"{source.name}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert borrowed == []
