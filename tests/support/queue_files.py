"""
A queue directory on tmp_path with one spool file ready in ``spare/``, and an enqueue of it:
what the queue's crash tests (test_queue_crash, test_queue_recycle) trace and rebuild.
"""

from __future__ import annotations

from pathlib import Path

from mailsrv.storage.envelope import QueuedMessage
from mailsrv.storage.queue import enqueue, queue_dirs

BODY = b"Subject: hello\n\nHello Bob.\n" * 50
PREFIX = b"Received: from x (unknown [192.0.2.7])\n"


def spool_dir(tmp_path: Path) -> Path:
    """A fresh queue under tmp_path whose ``spare/s1`` holds BODY."""
    path = tmp_path / "spool"
    queue_dirs(path)
    (path / "spare" / "s1").write_bytes(BODY)
    return path


def enqueue_spare(qdir: Path, queue_id: str = "ID1", body: str = "s1") -> QueuedMessage:
    """Enqueue ``spare/<body>`` for bob@other.example as the server would after DATA."""
    return enqueue(qdir, queue_id, sender="a@example.org", recipients=["bob@other.example"],
                   prefix=PREFIX, body_path=qdir / "spare" / body, created=1795381621.25,
                   received_from="client.example[192.0.2.7]")
