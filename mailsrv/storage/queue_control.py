"""Who may change the queue: the lock a running server holds, and the requests ``mailsrv queue``
leaves for it (blocking I/O; the server calls these from the thread pool).

A running server keeps the queue's envelopes in memory and writes their state, so another
process must not change the files under it.  The lock tells the admin command which case it
is in: locked, it leaves a request in ``<queue>/control/`` and waits for the answer file;
free, it takes the lock itself and changes the files (``mailsrv.storage.queue``) directly.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mailsrv.storage import durable
from mailsrv.storage.durable import doing
from mailsrv.storage.queue import check_queue_id

__all__ = [
    "QueueLocked",
    "lock_queue",
    "control_request",
    "control_requests",
    "control_answer",
    "ControlRequest",
    "CONTROL_ACTIONS",
]


# --------------------------------------------------------------------------- the queue lock


class QueueLocked(Exception):
    """Another process (a running mailsrv) holds the queue lock."""


def lock_queue(qdir: Path) -> IO[bytes]:
    """Take the queue's exclusive lock, for as long as the returned file stays open.

    A running server holds it for its whole life, so two servers never deliver the
    same queue, and ``mailsrv queue`` knows whether to ask the server (locked) or to
    work on the files itself (it then holds the lock, so no server starts meanwhile).
    Raises QueueLocked when it is held; the lock vanishes with the process, even
    after SIGKILL.
    """
    path = Path(qdir) / "lock"
    handle = open(path, "a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise QueueLocked(f"{path} is locked by a running mailsrv") from None
        raise
    os.set_inheritable(handle.fileno(), False)
    return handle


# --------------------------------------------------------------------------- control requests

#: What ``mailsrv queue`` may ask a running server to do to one message, or to all ("*").
CONTROL_ACTIONS = ("flush", "delete", "bounce")
#: What other commands may ask of it (``tlsreport``: mailsrv tls-report --send-now).
EXTRA_ACTIONS = ("tlsreport",)
_REQUEST_RE = re.compile(r"(flush|delete|bounce|tlsreport)\.([A-Za-z0-9]{1,64}|ALL)\.([0-9a-f]{16})\.req")


@dataclass(frozen=True)
class ControlRequest:
    name: str
    action: str
    queue_id: str | None  # None: every message (flush only)


def control_request(qdir: Path, action: str, queue_id: str | None) -> Path:
    """Leave a request for the running server in ``control/``; return the answer's path.

    The request appears atomically (written to a dot-file, then renamed), so the server
    never reads half of one.  The server answers by writing ``<name>.ans`` and removing
    the request.
    """
    if action not in CONTROL_ACTIONS + EXTRA_ACTIONS:
        raise ValueError(f"unknown queue action {action!r}")
    if queue_id is not None:
        check_queue_id(queue_id)
    control = Path(qdir) / "control"
    name = f"{action}.{queue_id or 'ALL'}.{secrets.token_hex(8)}.req"
    tmp = control / f".{name}"
    durable.write_new(tmp, b"", named=doing)
    os.rename(tmp, control / name)
    return control / f"{name[:-4]}.ans"


def control_requests(qdir: Path) -> list[ControlRequest]:
    """The pending requests, oldest name first; anything else in ``control/`` is ignored."""
    found = []
    try:
        names = sorted(os.listdir(Path(qdir) / "control"))
    except FileNotFoundError:
        return []
    for name in names:
        match = _REQUEST_RE.fullmatch(name)
        if match:
            action, target, _ = match.groups()
            found.append(ControlRequest(name, action, None if target == "ALL" else target))
    return found


def control_answer(qdir: Path, request: ControlRequest, text: str) -> None:
    """Answer a request: the text goes to ``<name>.ans`` (atomically), the request goes."""
    control = Path(qdir) / "control"
    answer = control / f"{request.name[:-4]}.ans"
    tmp = control / f".{answer.name}"
    with suppress(FileNotFoundError):
        os.unlink(tmp)
    durable.write_new(tmp, text.encode("utf-8"), named=doing)
    os.rename(tmp, answer)
    with suppress(FileNotFoundError):
        os.unlink(control / request.name)
