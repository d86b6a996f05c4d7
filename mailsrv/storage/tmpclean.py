"""Removing the files a crash left in the Maildirs' ``tmp/`` (a walk in a thread, run by a service).

A delivery writes its file into ``tmp/`` and removes it once it is linked into ``new/``; a
crash between the two (SIGKILL, a power cut) leaves it there, and nothing else ever reads
``tmp/``. The Maildir convention, which Dovecot follows, is to remove ``tmp/`` files not
modified for 36 hours: a file still being written is never that old. This is done at start-up
and then every 8 hours (Dovecot's interval), in a thread: a store with many mailboxes is a
long walk, and the reactor must keep serving meanwhile.

Only ``<root>/<domain>/<user>/tmp`` is looked at (where mailsrv writes), every level opened
without following links, as deliveries do: a link planted in the store is never a way to
remove files elsewhere.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application import internet
from twisted.internet import threads
from twisted.logger import Logger

from mailsrv.storage import dirfd

__all__ = ["MAX_AGE", "INTERVAL", "Cleaned", "clean_tmp", "TmpCleaner"]

log = Logger(namespace="mailsrv")

MAX_AGE = 36 * 3600  # seconds without a change after which a tmp/ file is litter
INTERVAL = 8 * 3600  # seconds between two walks
LOGGED_REMOVALS = 100  # removals logged one per line in a run; the rest are counted


@dataclass
class Cleaned:
    """What one walk did: the files removed (path, age in seconds), what failed, and how many
    ``tmp/`` directories were looked at."""

    removed: list[tuple[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    maildirs: int = 0


def _directories(fd: int) -> list[str]:
    """The names of the real directories (not links) in the directory *fd*."""
    with os.scandir(fd) as entries:
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))


def clean_tmp(
    root: os.PathLike[str] | str,
    now: float,
    max_age: float = MAX_AGE,
    stop: Callable[[], bool] = lambda: False,
) -> Cleaned:
    """Remove the regular files in every ``<root>/<domain>/<user>/tmp`` whose modification
    time is more than *max_age* seconds before *now* (blocking: run it in a thread).

    Never raises for the store's content: what cannot be read or removed is reported in
    ``errors`` and the walk goes on. *stop* is asked between maildirs, so that a server
    shutting down does not wait for the whole walk.
    """
    cleaned = Cleaned()
    root = Path(root)
    try:
        root_fd = os.open(root, dirfd.FOLLOWED_DIR_FLAGS)  # may be a link
    except OSError as e:
        cleaned.errors.append(f"cannot open directory {root}: {e.strerror}")
        return cleaned
    try:
        for domain in _directories(root_fd):
            _clean_domain(root_fd, root / domain, now - max_age, now, stop, cleaned)
            if stop():
                break
    except OSError as e:
        cleaned.errors.append(f"cannot read directory {root}: {e.strerror}")
    finally:
        os.close(root_fd)
    return cleaned


def _clean_domain(
    root_fd: int, domain: Path, before: float, now: float, stop: Callable[[], bool],
    cleaned: Cleaned,
) -> None:
    try:
        domain_fd, _ = dirfd.open_dir(root_fd, domain.name, str(domain), create=False)
    except OSError as e:
        cleaned.errors.append(f"cannot open directory {domain}: {e.strerror}")
        return
    try:
        users = _directories(domain_fd)
    except OSError as e:
        cleaned.errors.append(f"cannot read directory {domain}: {e.strerror}")
        users = []
    try:
        for user in users:
            if stop():
                return
            tmp = domain / user / "tmp"
            try:
                user_fd, _ = dirfd.open_dir(domain_fd, user, str(domain / user), create=False)
                try:
                    tmp_fd, _ = dirfd.open_dir(user_fd, "tmp", str(tmp), create=False)
                finally:
                    os.close(user_fd)
            except FileNotFoundError:
                continue  # not a Maildir (yet)
            except OSError as e:
                cleaned.errors.append(f"cannot open directory {e.filename}: {e.strerror}")
                continue
            cleaned.maildirs += 1
            try:
                _clean_one(tmp_fd, tmp, before, now, cleaned)
            finally:
                os.close(tmp_fd)
    finally:
        os.close(domain_fd)


def _clean_one(tmp_fd: int, tmp: Path, before: float, now: float, cleaned: Cleaned) -> None:
    """Remove the old regular files of one ``tmp/`` (its descriptor *tmp_fd*)."""
    try:
        with os.scandir(tmp_fd) as entries:
            old = []
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mtime < before:
                    old.append((entry.name, now - st.st_mtime))
    except OSError as e:
        cleaned.errors.append(f"cannot read directory {tmp}: {e.strerror}")
        return
    for name, age in old:
        try:
            os.unlink(name, dir_fd=tmp_fd)
        except FileNotFoundError:
            continue  # removed meanwhile
        except OSError as e:
            cleaned.errors.append(f"cannot remove {tmp / name}: {e.strerror}")
            continue
        cleaned.removed.append((str(tmp / name), age))


class TmpCleaner(internet.TimerService):
    """Runs ``clean_tmp`` at start-up and every ``interval`` seconds, never two at once, in a
    thread of the reactor's pool (not a delivery thread: a long walk must not hold one), and
    logs each removal and a summary line."""

    def __init__(
        self,
        root: os.PathLike[str] | str,
        reactor: Any,
        *,
        max_age: float = MAX_AGE,
        interval: float = INTERVAL,
        in_thread: Callable[..., Any] | None = None,
    ) -> None:
        internet.TimerService.__init__(self, interval, self.run_once)
        self.clock = reactor
        self.reactor = reactor
        self.root = Path(root)
        self.max_age = max_age
        self._in_thread = in_thread
        self._stopping = False

    def startService(self) -> None:
        self._stopping = False
        internet.TimerService.startService(self)

    def stopService(self) -> Any:
        self._stopping = True  # a walk under way ends after its current maildir
        return internet.TimerService.stopService(self)

    def run_once(self) -> Any:
        """One walk; its Deferred fires when it is done and logged (never with a failure)."""
        args = (clean_tmp, self.root, self.reactor.seconds(), self.max_age, self._stopped)
        if self._in_thread is not None:
            d = self._in_thread(*args)
        else:
            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), *args)
        return d.addCallbacks(self._report, self._failed)

    def _stopped(self) -> bool:
        return self._stopping

    def _report(self, cleaned: Cleaned) -> None:
        for path, age in cleaned.removed[:LOGGED_REMOVALS]:
            log.info(
                "tmp cleanup: removed {path}, unchanged for {hours:.1f} hours (left by a crash)",
                path=path, hours=age / 3600,
            )
        for error in cleaned.errors:
            log.warn("tmp cleanup: {error}", error=error)
        if cleaned.removed or cleaned.errors:
            log.info(
                "tmp cleanup: removed {n} file(s) older than {hours:g} hours from {maildirs} "
                "maildir(s) in {root} ({unlogged} not logged), {errors} error(s)",
                n=len(cleaned.removed), hours=self.max_age / 3600, maildirs=cleaned.maildirs,
                root=self.root, unlogged=max(0, len(cleaned.removed) - LOGGED_REMOVALS),
                errors=len(cleaned.errors),
            )

    def _failed(self, failure: Any) -> None:
        # A bug rather than the store's state (clean_tmp reports those): log it, keep the timer.
        log.failure("tmp cleanup failed", failure)
