"""
Pieces for in-process tests of the server's services: a Runtime on a task.Clock whose "worker
threads" run each job at once on the test's thread, over a temporary mail root and queue.
"""

from __future__ import annotations

import mailbox
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from mailsrv.config import prepare_directories
from mailsrv.routing.router import Directory
from mailsrv.runtime import Runtime
from mailsrv.storage import queue
from support.config import minimal_config


class SyncWorkers:
    """Runtime.workers (an IThreadRunner) running each job at once on the test's thread;
    ``hold()`` keeps the next jobs waiting until ``release()``, to see what waits for a write
    still under way."""

    name, size = "sync", 1

    def __init__(self) -> None:
        self.held: list[tuple[defer.Deferred, Any, tuple]] | None = None

    def run(self, f, *args) -> defer.Deferred:
        if self.held is None:
            return defer.maybeDeferred(f, *args)
        d: defer.Deferred = defer.Deferred()
        self.held.append((d, f, args))
        return d

    def hold(self) -> None:
        self.held = []

    def release_one(self) -> None:
        """Run the oldest job held (the ones it starts are held in turn)."""
        assert self.held
        d, f, args = self.held.pop(0)
        defer.maybeDeferred(f, *args).chainDeferred(d)

    def release(self) -> None:
        """Run the jobs held (and any they start), in order; stop holding."""
        while self.held:
            d, f, args = self.held.pop(0)
            defer.maybeDeferred(f, *args).chainDeferred(d)
        self.held = None

    def stop(self, timeout: float = 30.0) -> None:
        pass


def queue_runtime(tmp_path: Path, users=("alice@example.org",), **queue_keys) -> Runtime:
    """A Runtime for mx.example.org (local domain example.org, ``users`` its mailboxes, the
    postmaster an alias of the first), its queue and Maildirs under ``tmp_path``, time on a
    fresh task.Clock."""
    config = minimal_config(tmp_path, queue={"path": str(tmp_path / "queue"), **queue_keys})
    prepare_directories(config)
    queue.queue_dirs(config.queue.path)
    directory = Directory(["example.org"], frozenset(users), {"postmaster": (users[0],)})
    return Runtime(config=config, directory=directory, reactor=task.Clock(),
                   workers=SyncWorkers())


def maildir_of(tmp_path: Path, user: str = "alice", folder: str = "") -> mailbox.Maildir:
    """The Maildir (or ``folder`` in it) of user@example.org under a test runtime's mail root."""
    return mailbox.Maildir(tmp_path / "mail" / "example.org" / user / folder, create=False)


def enqueue(runtime: Runtime, queue_id: str, sender: str | None, recipients: list[str],
            created: float, double_bounce: bool = False) -> queue.QueuedMessage:
    """A message in the runtime's queue, as the SMTP side leaves it."""
    qdir = Path(runtime.config.queue.path)
    body = qdir / "incoming" / queue_id
    body.write_bytes(b"Subject: hello\r\n\r\nhello\r\n")
    return queue.enqueue(qdir, queue_id, sender=sender, recipients=recipients, prefix=b"",
                         body_path=body, created=created, received_from="local",
                         double_bounce=double_bounce)
