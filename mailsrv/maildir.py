"""fsync'd, all-or-nothing Maildir delivery (blocking; call it via deferToThread).

Why not ``twisted.mail.maildir``: it writes files 0644, never fsyncs, and writes
one copy per recipient.  The server answers ``250`` only after ``deliver``
returns, so by then every copy must be on disk; and when anything fails, no
partial message may be visible in any ``new/`` (the client will retry after our
``451``/``452``, so a half delivery would become a duplicate).

The qmail discipline: write the message once into ``tmp/`` under a unique name,
fsync it, hard-link it into each ``new/``, fsync each ``new/``, remove ``tmp/``.
Copies whose trace fields differ (each mailbox's own ``Delivered-To:``) are one file
each, all written and fsync'd before the first link.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

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
_SUBDIRS = ("tmp", "new", "cur")
# sendfile errors meaning "not supported for these files": fall back to read/write.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})

# The pid in unique names, read once (and again in a forked child) rather than per message.
_pid = os.getpid()


def _update_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_update_pid)

# Maildirs whose tmp/, new/ and cur/ were there at the last delivery: not looked at again
# (three stat calls per mailbox and message). A delivery that fails for a missing directory
# (removed by hand meanwhile) forgets its maildirs, so the client's retry recreates them.
_known_maildirs: set[Path] = set()

# Per-process delivery counter for unique names.  next() on itertools.count is
# atomic under the GIL, so concurrent worker threads never get the same value.
_counter = itertools.count(1)


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


@contextmanager
def _doing(action: str, path: os.PathLike[str] | str) -> Iterator[None]:
    """Turn an OSError raised in the block into a DeliveryError naming *path*."""
    try:
        yield
    except OSError as exc:
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


def fsync_dir(path: os.PathLike[str] | str) -> None:
    """fsync a directory, making the entries created in (or removed from) it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirectorySync:
    """Group commit for directory fsyncs: one fsync of a ``new/`` serves every link made before
    it started.

    Concurrent deliveries into one Maildir each used to fsync its ``new/`` after their own
    link; the fsyncs queued behind each other on the directory (and on the file system's
    journal), although one of them, started after all those links, makes them all durable.
    ``sync(path)`` takes a ticket (a number increasing per directory) after the caller's link;
    a fsync started when the tickets were up to N covers tickets ≤ N. A caller whose ticket is
    covered by a fsync that *succeeded* returns at once; otherwise it waits for the running
    fsync and, if still uncovered, runs the next one itself (taking every ticket issued so far
    with it). A failed fsync covers nobody: the thread that ran it raises, and the others try
    their own, so each caller either saw a successful fsync that started after its link or
    gets the error — the guarantee of a plain per-delivery fsync, with far fewer of them.
    """

    class _State:
        __slots__ = ("issued", "done", "running")

        def __init__(self) -> None:
            self.issued = 0  # last ticket handed out
            self.done = 0  # every ticket <= done is durable
            self.running = False

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._states: dict[str, _DirectorySync._State] = {}

    def sync(self, path: os.PathLike[str] | str) -> None:
        key = os.fspath(path)
        with self._cond:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = self._State()
            state.issued += 1
            ticket = state.issued
            while True:
                if state.done >= ticket:
                    return
                if not state.running:
                    break
                self._cond.wait()
            state.running = True
            covers = state.issued
        succeeded = False
        try:
            fsync_dir(key)
            succeeded = True
        finally:
            with self._cond:
                state.running = False
                if succeeded and covers > state.done:
                    state.done = covers
                if state.done >= state.issued and len(self._states) > 1024:
                    # Idle directory: forget it, so that the table stays small.
                    del self._states[key]
                self._cond.notify_all()


_new_dir_sync = _DirectorySync()


def sync_new_dir(path: os.PathLike[str] | str) -> None:
    """Make the entries linked into the directory *path* so far durable (group commit)."""
    _new_dir_sync.sync(path)


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


def _create(path: Path) -> int:
    """Open a new file for writing, 0600, failing if the name exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exact mode whatever the process umask is
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(path)
        raise
    return fd


def _unique_spellings(paths: Sequence[Path]) -> list[Path]:
    """*paths* without exact repetitions (no need to look at a directory twice).

    Other spellings of one directory (``a/../b``, symlinks) are caught later
    by comparing inodes; normalising ``..`` textually would be wrong when a
    component is a symlink.
    """
    return list(dict.fromkeys(paths))


def deliver(
    maildirs: Sequence[os.PathLike[str] | str],
    prefix: bytes | Sequence[bytes],
    body_path: os.PathLike[str] | str,
    *,
    hostname: str,
) -> list[Path]:
    """Deliver *prefix* + the content of *body_path* into every maildir, durably.

    *prefix* is one for all, or one per maildir (aligned with *maildirs*: a copy's own
    ``Delivered-To:``).  The message is written once per distinct prefix into the
    ``tmp/`` of the first maildir taking it (0600), fsync'd, then hard-linked into the
    ``new/`` of each maildir taking that prefix (copied first when a maildir is on another
    file system); every file is written before any is linked, so that a full disk shows
    in no ``new/``.  Every ``new/`` is fsync'd before returning, so the caller may answer
    ``250``.  Missing ``tmp``/``new``/``cur`` directories (and their parents) are created
    0700.  Duplicate maildirs (same path, or the same directory reached by another path)
    receive one copy, with the prefix of the first occurrence.

    All or nothing: on any OSError, every file created by this call in any
    ``new/`` or ``tmp/`` is removed and DeliveryError is raised (``disk_full``
    for ENOSPC/EDQUOT).

    Returns the path in ``new/`` for each element of *maildirs*, aligned with
    the argument (so callers can ``zip`` it with their recipients); a
    duplicate maildir gets the same path as its first occurrence.  Undo a
    delivery that must not stand with ``remove_delivered``.
    """
    paths = [Path(maildir) for maildir in maildirs]
    if not paths:
        return []
    prefixes = [prefix] * len(paths) if isinstance(prefix, bytes) else list(prefix)
    if len(prefixes) != len(paths):
        raise ValueError(f"{len(prefixes)} prefixes for {len(paths)} maildirs")
    spellings = _unique_spellings(paths)
    missing = [path for path in spellings if path not in _known_maildirs]
    if missing:
        _ensure_dirs([path / sub for path in missing for sub in _SUBDIRS])
        _known_maildirs.update(missing)

    # One copy per directory, however it is spelt (a/../b, symlinks, bind mounts).
    unique: list[Path] = []
    which: list[int] = []  # for each argument, its index in unique
    if len(spellings) == 1:
        unique, which = spellings, [0] * len(paths)  # one directory: nothing to compare
    else:
        index_of: dict[tuple[int, int], int] = {}
        for path in paths:
            with _doing("stat", path):
                st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            if key not in index_of:
                index_of[key] = len(unique)
                unique.append(path)
            which.append(index_of[key])
    # The directories taking each distinct prefix (indexes into unique): one file each.
    groups: dict[bytes, list[int]] = {}
    grouped: set[int] = set()
    for argument, index in enumerate(which):
        if index not in grouped:  # a directory's first occurrence gives its prefix
            grouped.add(index)
            groups.setdefault(prefixes[argument], []).append(index)

    created_tmp: list[Path] = []
    created_new: list[Path] = []
    try:
        with _doing("open", body_path):
            src_fd = os.open(body_path, os.O_RDONLY | os.O_CLOEXEC)
        files: list[tuple[Path, str, int]] = []  # per group: its tmp file, name, size
        try:
            with _doing("stat", body_path):
                body_size = os.fstat(src_fd).st_size
            for group_prefix, members in groups.items():
                size = len(group_prefix) + body_size
                name = unique_name(hostname, size)
                tmp = unique[members[0]] / "tmp" / name
                with _doing("create", tmp):
                    dst_fd = _create(tmp)
                created_tmp.append(tmp)
                try:
                    with _doing("write", tmp):
                        _write_all(dst_fd, group_prefix)
                        _copy_data(src_fd, dst_fd, body_size)
                    with _doing("fsync", tmp):
                        os.fsync(dst_fd)
                finally:
                    os.close(dst_fd)
                files.append((tmp, name, size))
        finally:
            os.close(src_fd)

        new_paths: dict[int, Path] = {}  # index in unique -> its file in new/
        for (tmp, name, size), members in zip(files, groups.values()):
            for index in members:
                target = unique[index]
                new_path = target / "new" / name
                try:
                    os.link(tmp, new_path)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise DeliveryError.from_oserror("link into", new_path, exc) from exc
                    # Another file system: a copy of its own, made durable, then linked.
                    own_tmp = target / "tmp" / name
                    _copy_file(tmp, own_tmp, size, created_tmp)
                    with _doing("link into", new_path):
                        os.link(own_tmp, new_path)
                created_new.append(new_path)
                new_paths[index] = new_path

        for target in unique:
            with _doing("fsync directory", target / "new"):
                sync_new_dir(target / "new")
    except BaseException as exc:
        _rollback(created_new, created_tmp)
        if isinstance(exc, DeliveryError) and exc.errno == errno.ENOENT:
            _known_maildirs.difference_update(spellings)
        raise

    # Committed: the tmp names are only litter now.  A failure to remove one
    # must not turn a durable delivery into an error (and a retry, a
    # duplicate); Maildir readers clean old tmp/ files anyway.
    for path in created_tmp:
        with suppress(OSError):
            os.unlink(path)
    return [new_paths[i] for i in which]


def remove_delivered(paths: Iterable[os.PathLike[str] | str]) -> None:
    """Take back a delivery made by ``deliver`` (best effort, never raises).

    For the caller whose later step failed (the queue could not take the
    remote recipients): the client gets ``451`` and will send again, so the
    local copies must go, or they would be delivered twice.  The ``new/``
    directories are fsync'd so the removal survives a crash.
    """
    unique = list(dict.fromkeys(Path(path) for path in paths))
    _rollback(unique, [])


def _copy_file(source: Path, dest: Path, size: int, created_tmp: list[Path]) -> None:
    """Copy *source* (*size* bytes) to the new file *dest*, fsync'd; record it."""
    with _doing("open", source):
        src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _doing("create", dest):
            dst_fd = _create(dest)
        created_tmp.append(dest)
        try:
            with _doing("write", dest):
                _copy_data(src_fd, dst_fd, size)
            with _doing("fsync", dest):
                os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def _rollback(created_new: list[Path], created_tmp: list[Path]) -> None:
    """Remove what a failed delivery created; best effort, never raises.

    The ``new/`` directories are fsync'd after the removal, so that a crash
    right after our ``451`` cannot bring back a link the client will resend.
    """
    for path in created_new + created_tmp:
        with suppress(OSError):
            os.unlink(path)
    for directory in {path.parent for path in created_new}:
        with suppress(OSError):
            fsync_dir(directory)
