"""Durable file writes: write, fsync, rename, fsync the directory (blocking I/O).

Why one module: the server answers ``250`` only once a message is on disk, the queue's state
must survive a crash as the old state or the new one, and ``mailsrv user`` must never leave
half a users file; all three need the same discipline, and a step missed in one copy of it
(the directory's fsync, the temporary removed on failure) would lose data only after a crash,
where no test looks. So the steps are written once here:

- :func:`write_new` creates a file that must not exist, writes it and fsyncs it
  (:func:`create` without the fsync, for a caller that names the file first);
- :func:`replace` puts new content in place of a file atomically: a temporary in the same
  directory, written and fsync'd, renamed over the file, then the directory fsync'd;
- :func:`sync_dir` fsyncs a directory, making the names created or removed in it durable.

Errors: the mail paths (Maildir, queue) report a failed step as a :class:`DeliveryError`
naming the step and the path (``cannot fsync /q/messages/.x.json.tmp: [Errno 5] ...``), with
``disk_full`` set so that the client is told ``452 4.3.1``; they pass ``named=doing``. Other
callers get the plain ``OSError``.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from mailsrv.storage import dirfd
from mailsrv.storage.dirfd import fsync_dir
from mailsrv.storage.fdio import write_all

__all__ = [
    "DeliveryError",
    "create",
    "doing",
    "ensure_dir",
    "replace",
    "sync_dir",
    "write_new",
]

_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})

#: How a step's OSError is reported: ``named(action, path)`` is a context manager around the
#: step (:class:`doing` for DeliveryError; the default lets the OSError through unchanged).
Naming = Callable[[str, "os.PathLike[str] | str"], AbstractContextManager[object]]


class DeliveryError(Exception):
    """A Maildir (or queue) write failed; nothing was left visible.

    ``disk_full`` is True for ENOSPC/EDQUOT, so that the server can answer
    ``452 4.3.1`` instead of ``451 4.3.0``.  ``str(err)`` names the operation,
    the path and the OS error, for the log line.
    """

    def __init__(self, message: str, *, disk_full: bool = False, errno: int | None = None) -> None:
        super().__init__(message)
        self.disk_full = disk_full
        self.errno = errno

    @classmethod
    def from_oserror(cls, action: str, path: os.PathLike[str] | str, exc: OSError) -> DeliveryError:
        """Wrap *exc*, raised while doing *action* on *path*."""
        reason = exc.strerror or str(exc)
        code = exc.errno
        text = f"cannot {action} {os.fspath(path)}: [Errno {code}] {reason}" if code else (
            f"cannot {action} {os.fspath(path)}: {reason}"
        )
        return cls(text, disk_full=code in _DISK_FULL, errno=code)


class doing:
    """``with doing(action, path):`` turns an OSError raised in the block into a DeliveryError
    naming *path* (a class, not a generator: it is on every delivery's path several times)."""

    __slots__ = ("action", "path")

    def __init__(self, action: str, path: os.PathLike[str] | str) -> None:
        self.action, self.path = action, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError):
            action, path = self.action, self.path
            if isinstance(exc, dirfd.StepError):  # it knows the step and the path better
                action, path = exc.action, exc.filename
            raise DeliveryError.from_oserror(action, path, exc) from exc


def _as_is(action: str, path: os.PathLike[str] | str) -> AbstractContextManager[object]:
    return nullcontext()


def ensure_dir(path: os.PathLike[str] | str) -> None:
    """``mkdir -p`` with mode 0700, fsyncing every parent that got a new entry.

    Raises DeliveryError, like every other failure of the mail paths.
    """
    with doing("create directory", path):
        dirfd.make_dirs(Path(path))


def sync_dir(directory: os.PathLike[str] | str, *, named: Naming = _as_is) -> None:
    """fsync *directory*: the names just created, renamed or removed in it become durable."""
    with named("fsync directory", directory):
        fsync_dir(directory)


def create(
    path: os.PathLike[str] | str,
    data: bytes,
    *,
    mode: int = 0o600,
    named: Naming = _as_is,
    take: Callable[[os.PathLike[str] | str], bool] | None = None,
) -> int:
    """Create *path* (which must not exist) with *mode* and write *data*; its descriptor,
    open, for the caller to fsync and close (:func:`write_new` does both).

    ``take(path)`` may put an existing file of ours at *path* instead of a new one
    (``mailsrv.storage.recycle``: True when it did, FileExistsError when *path* exists); it
    is emptied on opening. On failure the file may remain; the caller removes it.
    """
    with named("create", path):
        if take is not None and take(path):
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with named("write", path):
            os.fchmod(fd, mode)  # whatever the umask
            write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_new(
    path: os.PathLike[str] | str,
    data: bytes,
    *,
    mode: int = 0o600,
    prepare: Callable[[int], None] | None = None,
    named: Naming = _as_is,
) -> None:
    """Create *path* (which must not exist) with *mode*, write *data*, fsync it.

    ``prepare(fd)``, called after the write and before the fsync, may change the new file's
    owner and mode. On failure the file may remain; the caller removes it (:func:`replace`
    removes its temporary itself).
    """
    fd = create(path, data, mode=mode, named=named)
    try:
        if prepare is not None:
            prepare(fd)
        with named("fsync", path):
            os.fsync(fd)
    finally:
        os.close(fd)


def replace(
    path: os.PathLike[str] | str,
    data: bytes,
    *,
    tmp: os.PathLike[str] | str | None = None,
    mode: int = 0o600,
    prepare: Callable[[int], None] | None = None,
    check: Callable[[Path], None] | None = None,
    action: str = "replace",
    named: Naming = _as_is,
) -> None:
    """Replace *path* with *data* atomically and durably: a reader (or a crash) sees the old
    content or the new one, never a mixture, and once this returns the new one stays.

    The temporary is *tmp* or a unique dot-file beside *path*. ``prepare(fd)`` may change the
    new file's owner and mode before it is fsync'd; ``check(tmp)`` may refuse the written file
    by raising, before it takes the old one's place. On any failure before the rename the
    temporary is removed and *path* is untouched; a failing fsync of the directory after the
    rename is raised too (the new content is then in place but not yet known to be durable).
    """
    target = Path(path)
    temporary = Path(tmp) if tmp is not None else (
        target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    )
    try:
        write_new(temporary, data, mode=mode, prepare=prepare, named=named)
        if check is not None:
            check(temporary)
        with named(action, target):
            os.rename(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    sync_dir(target.parent, named=named)
