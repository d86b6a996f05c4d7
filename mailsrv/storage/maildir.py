"""fsync'd, all-or-nothing Maildir delivery (blocking; call it via deferToThread).

Why not ``twisted.mail.maildir``: it writes files 0644, never fsyncs, and writes
one copy per recipient.  The server answers ``250`` only after ``deliver``
returns, so by then every copy must be on disk; and when anything fails, no
partial message may be visible in any ``new/`` (the client will retry after our
``451``/``452``, so a half delivery would become a duplicate).

The qmail discipline, in the order that costs one journal commit: write the message once
into ``tmp/`` under a unique name, write it out to the disk (``fdio.write_out``), hard-link it
into each ``new/``, then fsync the file and each ``new/``, remove ``tmp/``.  Both fsyncs come
before ``deliver`` returns, so a ``250`` rests on them as before.  With the data written
before any link, a crash before them leaves no link or a whole message, never a short one,
and the file's fsync commits the data and the links together (the fsync of ``new/`` then
finds nothing left to commit): a fsync of the file before the links, then one of ``new/``,
was two commits, one after the other, for every message (2.0 -> 1.4 ms on one ext4 disk).
Where the data cannot be written out first (no ``sync_file_range``), the file is fsync'd
before the links, qmail's own order.

Below the configured root nothing is reached through a symbolic link: every level
(domain, user, ``tmp``/``new``/``cur``) is opened by descriptor with ``O_NOFOLLOW``
(``mailsrv.storage.dirfd``) and a link there refuses the whole delivery.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path

from mailsrv.storage import dirfd
from mailsrv.storage.durable import DeliveryError, doing, ensure_dir
from mailsrv.storage.fdio import copy_data as _copy_data
from mailsrv.storage.fdio import write_all as _write_all
from mailsrv.storage.fdio import write_out as _write_out
from mailsrv.storage.maildir_name import unique_name

__all__ = [
    "DeliveryError",
    "deliver",
    "remove_delivered",
    "ensure_dir",
]

# Group commit of the new/ directories' fsyncs, shared by the delivery threads.
_new_dir_sync = dirfd.DirectorySync()


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
    with doing("open directory", f"{base}/{text}"):
        if text.startswith("/") or not names:
            raise OSError(errno.EINVAL, "not a path below the root")
        for name in names:
            dirfd.check_name(name, f"{base}/{text}")
    return names


def _open_root(root: str) -> int:
    """The root's descriptor. The root is the administrator's choice: a link there is followed."""
    with doing("open directory", root):
        try:
            return os.open(root, dirfd.FOLLOWED_DIR_FLAGS)
        except FileNotFoundError:
            pass
    ensure_dir(root)  # removed since start-up: made again, as before
    with doing("open directory", root):
        return os.open(root, dirfd.FOLLOWED_DIR_FLAGS)


# Maildirs one delivery keeps open from writing its files to linking them (two descriptors
# each); the others are closed and walked to again for the links, so that a message for
# hundreds of mailboxes, in each of the delivery threads at once, stays far from the limit
# on open files.
_HELD = 8


def deliver(
    root: os.PathLike[str] | str,
    maildirs: Sequence[os.PathLike[str] | str],
    prefix: bytes,
    body_path: os.PathLike[str] | str,
    *,
    hostname: str,
    body: bytes | None = None,
) -> list[str]:
    """Deliver *prefix* + the content of *body_path* into every maildir, durably.

    *body*, when the caller holds it, is that content: written from memory with the prefix
    in one write, not read back from the file (a message small enough to be held costs four
    system calls less, each a hand-over of the GIL between the delivery thread and the
    reactor).

    *maildirs* are relative to *root* (``example.org/alice``). The root may be reached
    through a symbolic link (the administrator's choice); below it, a link at any level —
    domain, user, ``tmp``/``new``/``cur`` — refuses the delivery (DeliveryError naming the
    path and saying why) and nothing is written through it.

    The message is written once, into the ``tmp/`` of the first maildir (0600), then
    hard-linked into the ``new/`` of each maildir (copied first when a maildir is on
    another file system); it is written before any link, so that a full disk shows in no
    ``new/``.  The file and every ``new/`` are fsync'd before returning, so the caller may
    answer ``250`` (the order of the writes and fsyncs: the module's docstring).
    Missing ``tmp``/``new``/``cur`` directories (and the levels above them, up to the root)
    are created 0700.  Duplicate maildirs (same names, or the same directory reached by a
    bind mount) receive one link.

    All or nothing: on any OSError or refusal, every file created by this call in any
    ``new/`` or ``tmp/`` is removed and DeliveryError is raised (``disk_full``
    for ENOSPC/EDQUOT).

    Returns the path in ``new/`` for each element of *maildirs* (a string: a Path made per
    delivery cost more than the link), aligned with the argument (so callers can ``zip``
    it with their recipients); a duplicate maildir gets the same path as its first
    occurrence.  Undo a delivery that must not stand with ``remove_delivered``.
    """
    base = os.fspath(root)  # a string: a Path made and printed per delivery cost 2 % of it
    wanted = [_names(base, maildir) for maildir in maildirs]
    if not wanted:
        return []
    run = _Delivery(_open_root(base), base)
    try:
        run.write(wanted, prefix, body_path, hostname, body)
        new_paths = run.link()
    except BaseException:
        run.roll_back()
        raise
    finally:
        run.close()
    return [new_paths[run.index_of[names]] for names in wanted]


class _Delivery:
    """The state of one ``deliver`` call: which directories, which file, what is linked."""

    def __init__(self, root_fd: int, base: str) -> None:
        self.root_fd, self.base = root_fd, base
        self.unique: list[tuple[str, ...]] = []  # names of each distinct directory
        self.index_of: dict[tuple[str, ...], int] = {}  # names -> index in unique
        self.held: dict[int, dirfd.OpenMaildir] = {}  # index -> kept open (at most _HELD)
        self.name, self.size = "", 0  # the file, and its size
        self.written = False  # the file is in the tmp/ of the first directory (index 0)
        self.unsynced: int | None = None  # the file, written out, to fsync after the links
        self.linked: list[tuple[tuple[str, ...], tuple[int, int] | None, str]] = []

    def write(
        self, wanted: list[tuple[str, ...]], prefix: bytes,
        body_path: os.PathLike[str] | str, hostname: str, body: bytes | None = None,
    ) -> None:
        """Open (or make) every directory, find duplicates, write the file into the first."""
        src_fd = None
        if body is None:
            with doing("open", body_path):
                src_fd = os.open(body_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if src_fd is None:
                assert body is not None
                body_size = len(body)
            else:
                with doing("stat", body_path):
                    body_size = os.fstat(src_fd).st_size
            index_of_key: dict[tuple[int, int], int] = {}
            for names in wanted:
                if names in self.index_of:
                    continue
                box = self._open(names)
                index = index_of_key.get(box.key)
                if index is not None:  # the same directory under another name
                    self.index_of[names] = index
                    box.close()
                    continue
                index = index_of_key[box.key] = self.index_of[names] = len(self.unique)
                self.unique.append(names)
                try:
                    if index == 0:
                        self.size = len(prefix) + body_size
                        self.name = unique_name(hostname, self.size)
                        self.unsynced = _write_tmp(
                            box, self.name, prefix, src_fd, body_size, body, link_first=True)
                        self.written = True
                finally:
                    if len(self.held) < _HELD:  # always the first one: it holds the file
                        self.held[index] = box
                    else:
                        box.close()
        finally:
            if src_fd is not None:
                os.close(src_fd)

    def link(self) -> dict[int, str]:
        """Link the file into the ``new/`` of every directory, fsync it and each; their paths.

        The directories held open are fsync'd after all the links: links made in a row
        land in one transaction of a journaling file system, so the first fsync commits
        them all and the others find (nearly) nothing left to do; one fsync after each
        link made a delivery to ten mailboxes wait for ten commits.  A directory not held
        is fsync'd before its descriptor is closed: walking to it again could reach another
        directory than the one linked into."""
        source = self.held[0]
        new_paths: dict[int, str] = {}
        for index, names in enumerate(self.unique):
            box = self._box(index)
            try:
                _link(source, box, self.name, self.size)
                self.linked.append((names, box.key, self.name))
                new_paths[index] = f"{box.path}/new/{self.name}"
                if index not in self.held:
                    _sync_new(box)
            finally:
                if index not in self.held:
                    box.close()
        if self.unsynced is not None:
            with doing("fsync", f"{source.path}/tmp/{self.name}"):
                os.fsync(self.unsynced)
        for box in self.held.values():
            _sync_new(box)
        # Linked everywhere: the tmp/ name is only litter now.  A failure to remove it must
        # not turn a durable delivery into an error (and a retry, a duplicate); tmpclean
        # removes what is left.
        with suppress(OSError):
            os.unlink(self.name, dir_fd=source.tmp_fd)
        self.written = False
        return new_paths

    def roll_back(self) -> None:
        """Remove every link made and the file written; best effort, never raises."""
        _rollback(self.root_fd, self.base, self.linked)
        if self.written:
            with suppress(OSError):
                os.unlink(self.name, dir_fd=self.held[0].tmp_fd)

    def close(self) -> None:
        if self.unsynced is not None:
            os.close(self.unsynced)
        for box in self.held.values():
            box.close()
        os.close(self.root_fd)

    def _open(self, names: tuple[str, ...]) -> dirfd.OpenMaildir:
        with doing("open directory", self.base):
            return dirfd.open_maildir(self.root_fd, self.base, names)

    def _box(self, index: int) -> dirfd.OpenMaildir:
        """The directory *index*, held open or walked to again (then the caller closes it)."""
        return self.held.get(index) or self._open(self.unique[index])


def _sync_new(box: dirfd.OpenMaildir) -> None:
    """fsync the ``new/`` of *box*, shared with concurrent deliveries into it."""
    with doing("fsync directory", f"{box.path}/new"):
        _new_dir_sync.sync(box.key, functools.partial(os.fsync, box.new_fd))


def _write_tmp(
    box: dirfd.OpenMaildir, name: str, prefix: bytes, src_fd: int | None, body_size: int,
    body: bytes | None = None, *, link_first: bool = False,
) -> int | None:
    """Write *prefix* and the body (*body*, or *body_size* octets of *src_fd*) into
    ``tmp/name`` of *box*, fsync'd; nothing left on error.

    With *link_first*, a file whose data could be written out to the disk is not fsync'd
    here but returned open, for the caller to link, fsync and close (the module's docstring);
    else None."""
    path = f"{box.path}/tmp/{name}"
    with doing("create", path):
        dst_fd = _create(box.tmp_fd, name)
    try:
        with doing("write", path):
            if src_fd is None:
                assert body is not None
                _write_all(dst_fd, prefix + body)
            else:
                _write_all(dst_fd, prefix)
                _copy_data(src_fd, dst_fd, body_size)
        if link_first and _write_out(dst_fd):
            return dst_fd
        with doing("fsync", path):
            os.fsync(dst_fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(name, dir_fd=box.tmp_fd)
        os.close(dst_fd)
        raise
    os.close(dst_fd)
    return None


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
    with doing("open", f"{first.path}/tmp/{name}"):
        src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=first.tmp_fd)
    try:
        _write_tmp(box, name, b"", src_fd, size)
    finally:
        os.close(src_fd)
    try:
        with doing("link into", new_path):
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
        root_fd = os.open(root, dirfd.FOLLOWED_DIR_FLAGS)
    except OSError:
        return
    linked: list[tuple[tuple[str, ...], tuple[int, int] | None, str]] = []
    for path in dict.fromkeys(Path(p) for p in paths):
        with suppress(ValueError):
            *names, new, name = path.relative_to(root).parts
            if new == "new" and names:
                linked.append((tuple(names), None, name))
    try:
        _rollback(root_fd, os.fspath(root), linked)
    finally:
        os.close(root_fd)


def _rollback(
    root_fd: int, root: str, linked: Sequence[tuple[tuple[str, ...], tuple[int, int] | None, str]]
) -> None:
    """Remove each (maildir names, identity of its new/, file name) in *linked*; best effort,
    never raises.

    Each ``new/`` is opened again without following links and, when its identity is known,
    only the very directory the message was linked into is touched. It is fsync'd after
    the removal, so that a crash right after our ``451`` cannot bring back a link the
    client will resend.
    """
    for names, key, name in linked:
        try:
            fd = dirfd.open_sub(root_fd, root, names, "new")
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
