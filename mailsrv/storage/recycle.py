"""Files of finished queue entries kept, emptied, for the next envelope and spool files
(blocking I/O; call it from the thread pool).

Why: on ext4 creating a file after removals is slow (the inode allocator skips recently
deleted inodes), and it was the dearest step of an enqueue, more than an fsync; every relayed
message removed two files (``.json``, ``.body``) and created two (the envelope, and the spare
spool file that replaced the one its body took). Here the relayer's removal moves the two
files into ``<queue>/recycle/`` instead, and an enqueue (its envelope's dot-file) and the spare
spool files (``mailsrv.storage.spoolfiles``) take files from there by ``rename``: no inode is
made or freed per message while the stock lasts.

The stock is shared on disk by every process of the server (with ``[server] processes`` > 1
the parent removes, the receiving processes enqueue and spool). A file is taken by renaming
it to a name of the taker's own with ``RENAME_NOREPLACE``: ENOENT means another process took
it (the next one is tried), so a file never has two owners; EEXIST means the destination
exists (reported as a creation with O_EXCL would be).

What a crash can leave, and why none of it is ever taken for a message:

- ``retire`` moves ``messages/<id>.json`` and ``.body`` to ``recycle/.<id>.json`` (dot-files:
  not in stock yet) and returns; the caller fsyncs ``messages/`` (that makes the removal
  durable, as the unlinks were), and only then ``stock`` truncates each dot-file and renames it
  to its stock name. So a truncated file never has a name in ``messages/``, and a file whose
  move out was lost by a crash still holds the whole message (the queue still has it).
- Dot-files in ``recycle/`` are moves cut short; ``clean`` (the start-up scan's) removes them,
  and any stock file that is not empty (a file system may write the rename to the stock name
  before the truncation). Both are unlinks by name, atomic against a concurrent take.
- A taker opens its file with ``O_TRUNC`` whatever it holds.

The stock is bounded (``LIMIT`` files, counted now and then): beyond it a removal unlinks.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import os
import secrets
import threading
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["RECYCLE_DIR", "LIMIT", "clean", "retire", "stock", "take"]

#: The stock's directory under the queue (same file system as messages/ and spare/).
RECYCLE_DIR = "recycle"
#: At most about this many files in stock; a removal beyond it unlinks.
LIMIT = 256
#: After a listing found the stock empty, takers create files for this long (seconds) before
#: listing again: the stock of another process's removals is found that late at most.
_RELIST = 0.1
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


class _State:
    """This process's view of a stock directory: names seen in it, and a count of its files."""

    def __init__(self) -> None:
        # Bounded: a process that puts and seldom takes (the parent, with several processes)
        # keeps only the newest names; the others are found again by listing.
        self.names: collections.deque[str] = collections.deque(maxlen=LIMIT)
        self.listed = 0.0  # monotonic time of the last listing that found nothing
        self.count: int | None = None  # files in stock, as last counted plus our puts
        self.puts = 0  # puts since the last count
        self.lock = threading.Lock()
        self.disabled = False  # renameat2 unsupported here: create and remove as before


_states: dict[str, _State] = {}
_states_lock = threading.Lock()


def _state(directory: os.PathLike[str] | str) -> _State:
    key = os.fspath(directory)
    state = _states.get(key)
    if state is None:
        with _states_lock:
            state = _states.setdefault(key, _State())
    return state


def _rename_noreplace(src: str, dst: str) -> None:
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)


def take(directory: Path, dest: os.PathLike[str] | str) -> bool:
    """Move a file of the stock in *directory* to *dest* (which must not exist); False when the
    stock is empty (the caller creates its file). The file may hold anything: open it with
    ``O_TRUNC``. FileExistsError when *dest* exists (nothing moved)."""
    state = _state(directory)
    if state.disabled:
        return False
    while True:
        with state.lock:
            if not state.names:
                now = time.monotonic()
                if now - state.listed < _RELIST:
                    return False  # listed empty a moment ago: do not list on every take
                try:
                    state.names.extend(n for n in os.listdir(directory) if not n.startswith("."))
                except FileNotFoundError:
                    pass
                state.count = len(state.names)
                if not state.names:
                    state.listed = now
                    return False
            name = state.names.pop()
        try:
            _rename_noreplace(os.path.join(directory, name), os.fspath(dest))
            return True
        except OSError as e:
            if e.errno == errno.ENOENT:
                continue  # another process (or thread) took it
            if e.errno == errno.EEXIST:
                with state.lock:
                    state.names.append(name)
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dest))
            state.disabled = True  # EINVAL/ENOSYS (no RENAME_NOREPLACE), EXDEV: as before
            return False


def _room(directory: str, state: _State) -> bool:
    """Whether the stock may take one more file (counted again every LIMIT // 4 puts)."""
    with state.lock:
        if state.count is None or state.puts >= LIMIT // 4:
            try:
                state.count = sum(1 for n in os.listdir(directory) if not n.startswith("."))
            except FileNotFoundError:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                state.count = 0
            state.puts = 0
        if state.count >= LIMIT:
            state.puts += 1  # full: count again after as many removals
            return False
        state.count += 1
        state.puts += 1
        return True


def retire(directory: str, messages: str, names: Iterable[str]) -> tuple[bool, list[str]]:
    """Take *names* out of *messages* (in order): moved to dot-files in the stock *directory*
    while it has room, removed otherwise. Returns whether any was there, and the dot-files,
    for :func:`stock` once the caller has fsync'd *messages*. (Paths as strings: this runs
    for every message relayed, and making Path objects was a tenth of it.)"""
    state = _state(directory)
    found = False
    moved: list[str] = []
    for name in names:
        source = os.path.join(messages, name)
        try:
            if not state.disabled and _room(directory, state):
                dot = os.path.join(directory, f".{name}")
                os.rename(source, dot)
                moved.append(dot)
            else:
                os.unlink(source)
            found = True
        except FileNotFoundError:
            pass
    return found, moved


def stock(moved: Iterable[str], keep: bool = True) -> None:
    """Empty the dot-files *retire* made and put them in stock (after the fsync of messages/:
    a truncated file must never be one a crash could leave named in messages/); with
    ``keep=False`` (that fsync failed) remove them. Never raises: a file that cannot be
    recycled is removed (or left for :func:`clean`)."""
    for dot in moved:
        try:
            if not keep:
                raise OSError(errno.ECANCELED, "not recycled")
            os.truncate(dot, 0)
            name = f"r{secrets.token_hex(8)}"
            directory = os.path.dirname(dot)
            os.rename(dot, os.path.join(directory, name))
            state = _state(directory)
            with state.lock:  # this process's takers need not list the directory to find it
                state.names.append(name)
        except OSError:
            try:
                os.unlink(dot)
            except OSError:
                pass


def clean(directory: Path) -> list[str]:
    """At start-up: remove what a crash left (dot-files, stock files that are not empty);
    returns their names. Safe while other processes take files (unlinks by name)."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        try:
            if entry.name.startswith(".") or entry.stat(follow_symlinks=False).st_size:
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:  # taken meanwhile (ENOENT), or not a file of ours: left alone
            pass
    return removed
