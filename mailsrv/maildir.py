"""fsync'd, all-or-nothing Maildir delivery (blocking; call it via deferToThread).

Why not ``twisted.mail.maildir``: it writes files 0644, never fsyncs, and writes
one copy per recipient.  The server answers ``250`` only after ``deliver``
returns, so by then every copy must be on disk; and when anything fails, no
partial message may be visible in any ``new/`` (the client will retry after our
``451``/``452``, so a half delivery would become a duplicate).

The qmail discipline: write the message once into ``tmp/`` under a unique name,
fsync it, hard-link it into each ``new/``, fsync each ``new/``, remove ``tmp/``.

Below the configured root nothing is reached through a symbolic link: every level
(domain, user, ``tmp``/``new``/``cur``) is opened by descriptor with ``O_NOFOLLOW``
(``mailsrv.dirfd``) and a link there refuses the whole delivery.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path

from mailsrv import dirfd
from mailsrv.dirfd import fsync_dir

__all__ = [
    "DeliveryError",
    "unique_name",
    "deliver",
    "remove_delivered",
    "ensure_dir",
    "fsync_dir",
]

_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_CHUNK = 1 << 20  # bytes per read/write when the kernel copy is not available
# sendfile errors meaning "not supported for these files": fall back to read/write.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})

# The pid in unique names, read once (and again in a forked child) rather than per message.
_pid = os.getpid()


def _update_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_update_pid)

# Per-process delivery counter for unique names.  next() on itertools.count is
# atomic under the GIL, so concurrent worker threads never get the same value.
_counter = itertools.count(1)

# Group commit of the new/ directories' fsyncs, shared by the delivery threads.
_new_dir_sync = dirfd.DirectorySync()


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


class _doing:
    """``with _doing(action, path):`` turns an OSError raised in the block into a DeliveryError
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


def unique_name(hostname: str, size: int) -> str:
    """A Maildir file name: ``<secs>.M<usecs>P<pid>Q<n>R<hex>.<host>,S=<size>``.

    Unique through time, pid, a per-process counter and 64 random bits (so
    even a pid reused within the same microsecond, say in a container, does
    not collide).  ``/`` and ``:`` in the host are escaped as the Maildir
    specification asks, since they would be a path separator and the start of
    the info part.  ``,S=<size>`` lets readers (Dovecot) skip a stat.
    """
    now = time.time_ns()
    secs, nanos = divmod(now, 1_000_000_000)
    host = (hostname or "localhost").replace("/", "\\057").replace(":", "\\072")
    return (
        f"{secs}.M{nanos // 1000}P{_pid}Q{next(_counter)}R{secrets.token_hex(8)}"
        f".{host},S={size}"
    )


def _mkdir(path: Path, synced: set[Path]) -> None:
    """Create *path* and its missing parents, each 0700; note parents to fsync."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
        return  # created concurrently (or already there): not ours to chmod
    except FileNotFoundError:
        parent = path.parent
        if parent == path:
            raise
        _mkdir(parent, synced)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not path.is_dir():
                raise NotADirectoryError(
                    errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)
                ) from None
            return
    # mkdir's mode is filtered by the umask; set it explicitly.
    os.chmod(path, 0o700)
    synced.add(path.parent)


def _ensure_dirs(paths: Sequence[Path]) -> None:
    """Create the missing directories among *paths* (0700, with parents) durably."""
    synced: set[Path] = set()
    for path in paths:
        if not path.is_dir():
            with _doing("create directory", path):
                _mkdir(path, synced)
    for directory in sorted(synced, key=lambda p: len(p.parts), reverse=True):
        with _doing("fsync directory", directory):
            fsync_dir(directory)


def ensure_dir(path: os.PathLike[str] | str) -> None:
    """``mkdir -p`` with mode 0700, fsyncing every parent that got a new entry.

    Raises DeliveryError, like every other failure of this module.
    """
    _ensure_dirs([Path(path)])


def _write_all(fd: int, data: bytes) -> None:
    """os.write until all of *data* is written (a write may be short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_data(src_fd: int, dst_fd: int, count: int) -> None:
    """Copy *count* bytes from offset 0 of *src_fd* to the position of *dst_fd*.

    Uses the kernel (sendfile) so the body never passes through Python memory;
    falls back to 1 MiB reads where sendfile to a file is not supported.
    Raises OSError(EIO) if the source is shorter than *count* (it changed
    under us: the S= size in the name would be a lie).
    """
    offset = 0
    use_sendfile = hasattr(os, "sendfile")
    while offset < count:
        if use_sendfile:
            try:
                sent = os.sendfile(dst_fd, src_fd, offset, min(count - offset, 1 << 30))
            except OSError as exc:
                if offset == 0 and exc.errno in _NO_SENDFILE:
                    use_sendfile = False
                    continue
                raise
        else:
            chunk = os.pread(src_fd, min(_CHUNK, count - offset), offset)
            if chunk:
                _write_all(dst_fd, chunk)
            sent = len(chunk)
        if sent == 0:
            raise OSError(errno.EIO, f"source ended after {offset} of {count} bytes")
        offset += sent


def _create(dir_fd: int, name: str) -> int:
    """Open a new file *name* in *dir_fd* for writing, 0600, failing if the name exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o600)  # exact mode whatever the process umask is
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    return fd


def _names(base: str, maildir: os.PathLike[str] | str) -> tuple[str, ...]:
    """The directory names of *maildir* below the root *base*, each checked before anything
    is made (``a//b/./c`` is ``a``, ``b``, ``c``, as for the kernel)."""
    text = os.fspath(maildir)
    names = tuple(name for name in text.split("/") if name not in ("", "."))
    with _doing("open directory", f"{base}/{text}"):
        if text.startswith("/") or not names:
            raise OSError(errno.EINVAL, "not a path below the root")
        for name in names:
            dirfd.check_name(name, f"{base}/{text}")
    return names


def _open_root(root: Path) -> int:
    """The root's descriptor. The root is the administrator's choice: a link there is followed."""
    with _doing("open directory", root):
        try:
            return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
    ensure_dir(root)  # removed since start-up: made again, as before
    with _doing("open directory", root):
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def deliver(
    root: os.PathLike[str] | str,
    maildirs: Sequence[os.PathLike[str] | str],
    prefix: bytes,
    body_path: os.PathLike[str] | str,
    *,
    hostname: str,
) -> list[Path]:
    """Deliver *prefix* + the content of *body_path* into every maildir, durably.

    *maildirs* are relative to *root* (``example.org/alice``). The root may be reached
    through a symbolic link (the administrator's choice); below it, a link at any level —
    domain, user, ``tmp``/``new``/``cur`` — refuses the delivery (DeliveryError naming the
    path and saying why) and nothing is written through it.

    The message is written once into the first maildir's ``tmp/`` (0600),
    fsync'd, then hard-linked into each ``new/`` (copied first when a maildir is
    on another file system); every ``new/`` is fsync'd before returning, so the
    caller may answer ``250``.  Missing ``tmp``/``new``/``cur`` directories
    (and the levels above them, up to the root) are created 0700.  Duplicate
    maildirs (same names, or the same directory reached by a bind mount)
    receive one copy.

    All or nothing: on any OSError or refusal, every file created by this call in any
    ``new/`` or ``tmp/`` is removed and DeliveryError is raised (``disk_full``
    for ENOSPC/EDQUOT).

    Returns the path in ``new/`` for each element of *maildirs*, aligned with
    the argument (so callers can ``zip`` it with their recipients); a
    duplicate maildir gets the same path as its first occurrence.  Undo a
    delivery that must not stand with ``remove_delivered``.
    """
    root = Path(root)
    base = os.fspath(root)
    wanted = [_names(base, maildir) for maildir in maildirs]
    if not wanted:
        return []
    root_fd = _open_root(root)
    index_of_key: dict[tuple[int, int], int] = {}
    index_of: dict[tuple[str, ...], int] = {}  # names -> index in delivered
    delivered: list[Path] = []  # the new/ path of each distinct directory
    linked: list[tuple[tuple[str, ...], tuple[int, int]]] = []  # for the rollback
    first: dirfd.OpenMaildir | None = None  # holds the file in its tmp/
    name = ""
    try:
        with _doing("open", body_path):
            src_fd = os.open(body_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with _doing("stat", body_path):
                body_size = os.fstat(src_fd).st_size
            size = len(prefix) + body_size
            name = unique_name(hostname, size)
            # One maildir at a time: two descriptors open, however many recipients.
            for names in dict.fromkeys(wanted):
                with _doing("open directory", base):
                    box = dirfd.open_maildir(root_fd, base, names)
                try:
                    if box.key in index_of_key:  # the same directory under another name
                        index_of[names] = index_of_key[box.key]
                        continue
                    if first is None:
                        _write_tmp(box, name, prefix, src_fd, body_size)
                        first = box
                    _link(first, box, name, size)
                    linked.append((names, box.key))
                    with _doing("fsync directory", f"{box.path}/new"):
                        _new_dir_sync.sync(box.key, functools.partial(os.fsync, box.new_fd))
                    index_of_key[box.key] = index_of[names] = len(delivered)
                    delivered.append(Path(f"{box.path}/new/{name}"))
                finally:
                    if box is not first:
                        box.close()
        finally:
            os.close(src_fd)
    except BaseException:
        _rollback(root_fd, base, linked, name)
        raise
    finally:
        # Committed or rolled back, the tmp/ name is only litter now.  A failure to remove
        # it must not turn a durable delivery into an error (and a retry, a duplicate);
        # tmpclean removes what is left.
        if first is not None:
            with suppress(OSError):
                os.unlink(name, dir_fd=first.tmp_fd)
            first.close()
        os.close(root_fd)
    return [delivered[index_of[names]] for names in wanted]


def _write_tmp(
    box: dirfd.OpenMaildir, name: str, prefix: bytes, src_fd: int, body_size: int
) -> None:
    """Write *prefix* and the body into ``tmp/name`` of *box*, fsync'd; nothing left on error."""
    path = f"{box.path}/tmp/{name}"
    with _doing("create", path):
        dst_fd = _create(box.tmp_fd, name)
    try:
        with _doing("write", path):
            _write_all(dst_fd, prefix)
            _copy_data(src_fd, dst_fd, body_size)
        with _doing("fsync", path):
            os.fsync(dst_fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(name, dir_fd=box.tmp_fd)
        raise
    finally:
        os.close(dst_fd)


def _link(first: dirfd.OpenMaildir, box: dirfd.OpenMaildir, name: str, size: int) -> None:
    """Link ``tmp/name`` of *first* into ``new/`` of *box* (through a copy across devices)."""
    new_path = f"{box.path}/new/{name}"
    try:
        os.link(name, name, src_dir_fd=first.tmp_fd, dst_dir_fd=box.new_fd, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise DeliveryError.from_oserror("link into", new_path, exc) from exc
    # Another file system: a copy of its own in its tmp/, made durable, then linked.
    with _doing("open", f"{first.path}/tmp/{name}"):
        src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=first.tmp_fd)
    try:
        _write_tmp(box, name, b"", src_fd, size)
    finally:
        os.close(src_fd)
    try:
        with _doing("link into", new_path):
            os.link(name, name, src_dir_fd=box.tmp_fd, dst_dir_fd=box.new_fd,
                    follow_symlinks=False)
    finally:
        with suppress(OSError):
            os.unlink(name, dir_fd=box.tmp_fd)


def remove_delivered(root: os.PathLike[str] | str, paths: Iterable[os.PathLike[str] | str]) -> None:
    """Take back a delivery made by ``deliver`` (best effort, never raises).

    For the caller whose later step failed (the queue could not take the
    remote recipients): the client gets ``451`` and will send again, so the
    local copies must go, or they would be delivered twice.  *paths* are what
    ``deliver`` returned for *root*; they are reached without following links.
    The ``new/`` directories are fsync'd so the removal survives a crash.
    """
    root = Path(root)
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        for path in dict.fromkeys(Path(p) for p in paths):
            with suppress(ValueError):
                *names, new, name = path.relative_to(root).parts
                if new == "new" and names:
                    _rollback(root_fd, os.fspath(root), [(tuple(names), None)], name)
    finally:
        os.close(root_fd)


def _rollback(
    root_fd: int, root: str, linked: Sequence[tuple[tuple[str, ...], tuple[int, int] | None]],
    name: str,
) -> None:
    """Remove *name* from the ``new/`` of each maildir in *linked*; best effort, never raises.

    Each ``new/`` is opened again without following links and, when its identity is known,
    only the very directory the message was linked into is touched. It is fsync'd after
    the removal, so that a crash right after our ``451`` cannot bring back a link the
    client will resend.
    """
    for names, key in linked:
        try:
            fd = dirfd.open_new(root_fd, root, names)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if key is None or key == (st.st_dev, st.st_ino):
                os.unlink(name, dir_fd=fd)
                os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
