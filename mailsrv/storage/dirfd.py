"""Directories reached through open descriptors, never through symbolic links (blocking I/O).

Why: a Maildir path is built from the configured root and names taken from mail addresses. The
root is the administrator's choice and may well be a link (``/var/mail -> /srv/mail``); below
it, everything is mailsrv's own, and a link there (``bob -> ../carol``, ``bob/new -> /tmp/x``)
would send mail somewhere nobody asked for. Each level is therefore opened with
``O_DIRECTORY | O_NOFOLLOW`` relative to the descriptor of its parent (``openat``), and
everything created or linked inside is named relative to a descriptor too, so that a link
planted at any level, even between two of our own system calls, is refused and never
followed. A refusal is an ``OSError`` whose text says what was found there.

The group commit of directory fsyncs (``DirectorySync``) lives here as well: it is keyed by the
directory's identity (device, inode), not by a path a link could redirect.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Hashable
from pathlib import Path

__all__ = [
    "DIR_FLAGS",
    "FOLLOWED_DIR_FLAGS",
    "NOT_FOLLOWED",
    "DirectorySync",
    "OpenMaildir",
    "StepError",
    "check_name",
    "fsync_dir",
    "make_dirs",
    "open_dir",
    "open_maildir",
    "open_sub",
]

#: Open a directory, never through a link (a link fails: ENOTDIR on Linux, ELOOP elsewhere).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Open a directory the configuration names (the mail root, the queue's): a link is followed,
#: the administrator's choice.
FOLLOWED_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: What a refused link is called in errors and in the log.
NOT_FOLLOWED = "a symbolic link, not followed"


class StepError(OSError):
    """An OSError naming the step that failed (``action``) and its path (``filename``)."""

    def __init__(self, action: str, path: os.PathLike[str] | str, exc: OSError) -> None:
        super().__init__(exc.errno, exc.strerror, os.fspath(path))
        self.action = action


def fsync_dir(path: os.PathLike[str] | str) -> None:
    """fsync a directory, making the entries created in (or removed from) it durable."""
    fd = os.open(path, FOLLOWED_DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def make_dirs(path: Path) -> None:
    """``mkdir -p`` of a path the administrator configured (the queue, the mailbox root: links
    in it are followed); each directory made is 0700 and each parent that got an entry is
    fsync'd. StepError names the step and the path."""
    if path.is_dir():
        return
    synced: set[Path] = set()
    try:
        _mkdir(path, synced)
    except OSError as exc:
        raise StepError("create directory", path, exc) from exc
    for directory in sorted(synced, key=lambda p: len(p.parts), reverse=True):
        try:
            fsync_dir(directory)
        except OSError as exc:
            raise StepError("fsync directory", directory, exc) from exc


def check_name(name: str, path: str) -> None:
    """Refuse a path component that is not one plain name (``..`` would climb out)."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"{name!r} is not a plain directory name", path)


def _refusal(exc: OSError, parent_fd: int, name: str, path: str) -> OSError:
    """The OSError to raise for a failed ``openat``: a link or a non-directory said so plainly.

    Linux answers ENOTDIR for a link opened with ``O_DIRECTORY | O_NOFOLLOW`` (ELOOP without
    ``O_DIRECTORY``), so an ENOTDIR is looked at to tell which.
    """
    if exc.errno == errno.ENOTDIR:
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if not is_link:
            return OSError(errno.ENOTDIR, "not a directory", path)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return OSError(errno.ELOOP, NOT_FOLLOWED, path)
    return OSError(exc.errno, exc.strerror, path)


def open_dir(parent_fd: int, name: str, path: str, *, create: bool) -> tuple[int, bool]:
    """Open the directory *name* in *parent_fd* without following a link; (fd, created).

    With *create*, a missing directory is made (0700 whatever the umask); the caller fsyncs
    *parent_fd* when ``created`` is True. *path* is the full path, for errors only. A link, a
    file or anything else that is not a real directory raises OSError (ELOOP, ENOTDIR).
    """
    check_name(name, path)
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd), False
    except FileNotFoundError:
        if not create:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None
    except OSError as exc:
        raise _refusal(exc, parent_fd, name, path) from None
    created = True
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        created = False  # made concurrently (or a link appeared): the open below decides
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise _refusal(exc, parent_fd, name, path) from None
    if created:
        try:
            os.fchmod(fd, 0o700)  # mkdir's mode went through the umask
        except BaseException:
            os.close(fd)
            raise
    return fd, created


class DirectorySync:
    """Group commit for directory fsyncs: one fsync of a ``new/`` serves every link made before
    it started.

    Concurrent deliveries into one Maildir each used to fsync its ``new/`` after their own
    link; the fsyncs queued behind each other on the directory (and on the file system's
    journal), although one of them, started after all those links, makes them all durable.
    ``sync(key, fsync)`` takes a ticket (a number increasing per directory) after the caller's
    link; a fsync started when the tickets were up to N covers tickets ≤ N. A caller whose
    ticket is covered by a fsync that *succeeded* returns at once; otherwise it waits for the
    running fsync and, if still uncovered, runs the next one itself through its own *fsync*
    (of its own descriptor of the directory), taking every ticket issued so far with it. A
    failed fsync covers nobody: the thread that ran it raises, and the others try their own,
    so each caller either saw a successful fsync that started after its link or gets the error
    — the guarantee of a plain per-delivery fsync, with far fewer of them.

    *key* names the directory by identity, ``(st_dev, st_ino)`` of the caller's descriptor:
    a path could be redirected by a link between the link and the fsync.
    """

    class _State:
        __slots__ = ("issued", "done", "running")

        def __init__(self) -> None:
            self.issued = 0  # last ticket handed out
            self.done = 0  # every ticket <= done is durable
            self.running = False

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._states: dict[Hashable, DirectorySync._State] = {}

    def sync(self, key: Hashable, fsync: Callable[[], None]) -> None:
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
            fsync()
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


# Maildirs (root, names below it) whose cur/ was there at an earlier delivery: cur/ is not
# looked at again. Only cur/, which a delivery never writes into: every directory written
# into (domain, user, tmp/, new/) is opened again, without following links, by every
# delivery. A cache of their paths or descriptors could be fooled: a directory replaced by a
# link, or renamed away (a held descriptor still points at it), after it was cached.
_known_maildirs: set[tuple[str, tuple[str, ...]]] = set()


class OpenMaildir:
    """One Maildir opened for a delivery: its path (a string, for names and errors),
    descriptors of its ``tmp/`` and ``new/``, and the identity (device, inode) of ``new/``."""

    __slots__ = ("path", "tmp_fd", "new_fd", "key")

    def __init__(self, path: str, tmp_fd: int, new_fd: int) -> None:
        self.path, self.tmp_fd, self.new_fd = path, tmp_fd, new_fd
        st = os.fstat(new_fd)
        self.key = (st.st_dev, st.st_ino)

    def close(self) -> None:
        os.close(self.tmp_fd)
        os.close(self.new_fd)


def open_maildir(root_fd: int, root: str, names: tuple[str, ...]) -> OpenMaildir:
    """Open ``root/names/{tmp,new}``, following no link below the root; StepError if not.

    Missing directories are created 0700 (``cur/`` with them) and every directory that got an
    entry is fsync'd, so that they are durable before a message is linked into them. Only two
    descriptors stay open (tmp/ and new/), whatever the number of recipients. Paths are plain
    strings here: this runs for every delivery, and pathlib's joins were most of its cost.
    """
    levels: list[int] = []  # descriptors of the levels below the root, closed on return
    dirty: list[tuple[int, str]] = []  # directories that got a new entry
    opened: list[int] = []  # tmp/ and new/, closed only on failure
    path, parent = root, root_fd
    action, where = "open directory", root
    try:
        for name in names:
            where = f"{path}/{name}"
            fd, created = open_dir(parent, name, where, create=True)
            levels.append(fd)
            if created:
                dirty.append((parent, path))
            path, parent = where, fd
        made = False
        for sub in ("tmp", "new"):
            where = f"{path}/{sub}"
            fd, created = open_dir(parent, sub, where, create=True)
            opened.append(fd)
            made = made or created
        known = (root, names)
        if made or known not in _known_maildirs:
            where = f"{path}/cur"
            fd, created = open_dir(parent, "cur", where, create=True)
            os.close(fd)
            made = made or created
        if made:
            dirty.append((parent, path))
        action = "fsync directory"
        for fd, _path in reversed(dirty):  # deepest first
            os.fsync(fd)
        action, where = "stat", f"{path}/new"
        box = OpenMaildir(path, opened[0], opened[1])
        _known_maildirs.add(known)
        return box
    except BaseException as exc:
        for fd in opened:
            os.close(fd)
        if isinstance(exc, OSError) and not isinstance(exc, StepError):
            raise StepError(action, where, exc) from exc
        raise
    finally:
        for fd in levels:
            os.close(fd)


def open_sub(root_fd: int, root: str, names: tuple[str, ...], sub: str) -> int:
    """A descriptor of an existing ``root/names/sub``, following no link; OSError if none."""
    fds: list[int] = []
    path, parent = root, root_fd
    try:
        for name in (*names, sub):
            path = f"{path}/{name}"
            parent, _ = open_dir(parent, name, path, create=False)
            fds.append(parent)
        return fds.pop()
    finally:
        for fd in fds:
            os.close(fd)
