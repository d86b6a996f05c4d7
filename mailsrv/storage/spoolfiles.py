"""
Spool files created ahead of need in the thread pool, so that the reactor thread never creates
one itself.

Creating a file is a metadata change of the file system: on ext4 it needs a journal handle,
and while the journal commits (which every delivery's fsync forces, many times a second under
load) starting a handle can wait for milliseconds. Done at ``DATA`` on the reactor thread,
that wait stopped every connection at once; profiles of the server under load showed about a
fifth of the reactor thread's time in that ``open``. Here a worker thread keeps a few empty
files ready in ``<queue>/spare/`` (the queue's file system, so that ``enqueue`` can still
rename a body into ``messages/``), and ``take`` hands one over without a system call.

The files hold nothing that was ever answered ``250`` (a body is moved out, or removed, at the
end of its transaction), so the directory is emptied at start-up, like ``incoming/``; a crash
leaves at most a few empty or unfinished files there.
"""

from __future__ import annotations

import collections
import os
import secrets
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.interfaces import ISpareSpoolFiles
from mailsrv.storage import recycle

__all__ = ["SpareSpoolFiles", "SPARE_DIR"]

log = Logger(namespace="mailsrv")

#: The directory under the queue that holds the ready files.
SPARE_DIR = "spare"


@implementer(ISpareSpoolFiles)
class SpareSpoolFiles:
    """A small stock of open, empty spool files (0600), refilled in the thread pool."""

    def __init__(
        self, queue_path: Path, reactor: Any, stock: int = 32, subdir: str | None = None,
    ) -> None:
        # ``subdir``: a receiving process's own (mailsrv.procs), which it empties at its start
        # without touching the files of the others.
        self.directory = Path(queue_path) / SPARE_DIR
        self.recycled = Path(queue_path) / recycle.RECYCLE_DIR
        if subdir is not None:
            self.directory = self.directory / subdir
        self._directory = os.fspath(self.directory)  # compared per message, as a string
        self.reactor = reactor
        self.stock = stock
        self._ready: collections.deque[tuple[Path, int]] = collections.deque()
        self._refilling = False
        self._stopped = False
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        # Left by an earlier run: never answered 250, so nothing to keep.
        for entry in os.scandir(self.directory):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)

    def take(self) -> tuple[Path, int] | None:
        """A ready (path, fd) opened for writing, or None when the stock is empty right now
        (the caller then creates its file itself). Reactor thread only."""
        try:
            ready = self._ready.popleft()
        except IndexError:
            ready = None
        if len(self._ready) < self.stock // 2:
            self._refill()
        return ready

    def release(self, path: os.PathLike[str] | str) -> None:
        """A transaction is done with its spool file: reuse it, or remove it.

        Called from a worker thread. A file of ours (in spare/) is emptied and put back in
        stock instead of being removed: on ext4 every removed inode makes the allocation of
        the next ones slower for a while (the allocator skips recently deleted inodes, and
        profiles under load showed a fifth of the CPU in that scan). One file created and one
        removed per message was the server's largest cost in the kernel. Opening an existing
        file with O_TRUNC changes no directory. A body moved into the queue is gone already;
        a file from elsewhere (incoming/, when the stock was empty) is removed.
        """
        if os.path.dirname(path) == self._directory and not self._stopped and (
            len(self._ready) < 2 * self.stock
        ):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            except OSError:
                pass
            else:
                # deque.append: safe from any thread
                self._ready.append((path if isinstance(path, Path) else Path(path), fd))
                return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _refill(self) -> None:
        if self._refilling or self._stopped:
            return
        self._refilling = True
        wanted = self.stock - len(self._ready)
        self.reactor.callInThread(self._create, wanted)

    def _create(self, count: int) -> None:
        """In a worker thread: make ``count`` files, then hand them to the reactor thread.

        A file is taken from the queue's recycled ones (``mailsrv.storage.recycle``: finished
        messages' files, emptied) while there are some, and created otherwise."""
        made: list[tuple[Path, int]] = []
        error: OSError | None = None
        for _ in range(count):
            path = self.directory / f"s{secrets.token_hex(8)}"
            try:
                if recycle.take(self.recycled, path):
                    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
                else:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as e:  # full disk and the like: the callers create their own
                error = e
                break
            made.append((path, fd))
        self.reactor.callFromThread(self._add, made, error)

    def _add(self, made: list[tuple[Path, int]], error: OSError | None) -> None:
        self._refilling = False
        if self._stopped:
            self._discard(made)
            return
        self._ready.extend(made)
        if error is not None:
            log.warn("cannot create spare spool files in {dir}: {error}",
                     dir=self.directory, error=error)

    @staticmethod
    def _discard(files: list[tuple[Path, int]]) -> None:
        for path, fd in files:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass

    def stop(self) -> None:
        """Close and remove the unused files (at shutdown)."""
        self._stopped = True
        ready, self._ready = list(self._ready), collections.deque()
        self._discard(ready)
