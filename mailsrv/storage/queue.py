"""The durable outbound queue in its directory (blocking I/O; call it from the thread pool).

Layout under the queue directory ``qdir``::

    incoming/<id>        bodies being received (written by the server, wiped at start-up)
    messages/<id>.body   the message body, spool format (dot-unstuffed, LF line ends)
    messages/<id>.json   the envelope and per-recipient state (see mailsrv.storage.envelope)
    corrupt/             envelopes that did not decode, moved aside with their bodies
    control/             requests from ``mailsrv queue`` to the running server
    lock                 flock'd by the running server: one server per queue

The lock and the control requests are ``mailsrv.storage.queue_control``'s.

The ``.json`` file is the commit point.  The body is moved in first (a rename on
the same file system: no copy, and atomic), then the envelope is written to a
dot-file, fsync'd and renamed into place, then ``messages/`` is fsync'd.  A
``.body`` without its ``.json`` is an unfinished enqueue and is never sent; a
``.json`` always has its ``.body``.  The server answers ``250`` only after
``enqueue`` returns, so the message cannot be lost after that.  State changes
replace the ``.json`` the same way (write, fsync, rename, fsync the directory);
a finished message loses its ``.json`` first, then its ``.body``.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from mailsrv.routing.dsn_params import MailDSN, RecipientDSN
from mailsrv.storage import durable
from mailsrv.storage.dirfd import fsync_dir
from mailsrv.storage.durable import DeliveryError, doing, ensure_dir
from mailsrv.storage.envelope import QueuedMessage, decode, encode, new_message

__all__ = [
    "new_queue_id",
    "check_queue_id",
    "queue_dirs",
    "enqueue",
    "save",
    "remove",
    "read_message",
    "body_path",
    "load",
    "LoadReport",
]

# Queue ids are file names, log keys and part of Message-IDs: letters and
# digits only, and never starting with '.' (dot-files are our temporaries).
_QUEUE_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}")
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def new_queue_id() -> str:
    """A new queue id: 6 base-62 digits of the time in seconds, then 8 random ones.

    Time first so that ids (and ``ls messages/``) sort roughly by arrival;
    47 random bits make a collision practically impossible at any rate a
    single server sees (and a collision is refused, never overwritten).
    """
    # One call for the 8 random digits (62**8 < 2**48): ``secrets.choice`` per digit asked
    # the kernel for random bytes eight times, on the reactor thread, for every message.
    return _base62(int(time.time()), 6) + _base62(secrets.randbelow(62**8), 8)


def check_queue_id(queue_id: str) -> None:
    """ValueError unless *queue_id* is a queue id (file name, log key, part of Message-IDs)."""
    if not isinstance(queue_id, str) or not _QUEUE_ID_RE.fullmatch(queue_id):
        raise ValueError(f"invalid queue id {queue_id!r}: expected 1 to 64 letters or digits")


def queue_dirs(qdir: Path) -> None:
    """Create the queue's directories (0700, with missing parents), durably.

    Raises DeliveryError when the directories cannot be made.
    """
    # spare/: spool files made ahead (mailsrv.storage.spoolfiles).  Created here, with the others,
    # because this runs as the server's own user even under ``twistd --uid``.
    for name in ("incoming", "spare", "messages", "corrupt", "control"):
        ensure_dir(Path(qdir) / name)


def body_path(qdir: Path, queue_id: str) -> Path:
    return Path(qdir) / "messages" / f"{queue_id}.body"


def enqueue(
    qdir: Path,
    queue_id: str,
    *,
    sender: str | None,
    recipients: Sequence[str],
    prefix: bytes,
    body_path: Path,
    created: float,
    received_from: str,
    double_bounce: bool = False,
    no_bounce: str | None = None,
    dsn: MailDSN | None = None,
    recipient_dsn: Mapping[str, RecipientDSN] | None = None,
    smtputf8: bool = False,
    tls_required: str | None = None,
) -> QueuedMessage:
    """Put a message in the outbound queue, durably; return its envelope (with the DSN
    parameters ``dsn`` and, by address, ``recipient_dsn``).

    *body_path* (normally ``qdir/incoming/<id>``, same file system) is fsync'd
    and renamed to ``messages/<id>.body``; the envelope is written to
    ``messages/.<id>.json.tmp``, fsync'd and renamed to ``messages/<id>.json``;
    ``messages/`` is fsync'd.

    On failure nothing is committed: the temporary envelope is removed, the
    body is moved back to *body_path* (so the caller can still clean it up),
    and DeliveryError is raised (``disk_full`` for ENOSPC/EDQUOT).  Invalid
    arguments (bad id, non-ASCII prefix, no recipients) raise ValueError
    before anything is touched.
    """
    check_queue_id(queue_id)
    message = new_message(
        queue_id,
        sender=sender,
        recipients=recipients,
        prefix=prefix,
        created=created,
        received_from=received_from,
        double_bounce=double_bounce,
        no_bounce=no_bounce,
        dsn=dsn,
        recipient_dsn=recipient_dsn,
        smtputf8=smtputf8,
        tls_required=tls_required,
    )
    data = encode(message)
    qdir = Path(qdir)
    source = Path(body_path)
    messages = qdir / "messages"
    body_dest = messages / f"{queue_id}.body"
    json_dest = messages / f"{queue_id}.json"
    json_tmp = messages / f".{queue_id}.json.tmp"

    queue_dirs(qdir)

    body_moved = False
    tmp_created = False
    committed = False
    try:
        # An id already in use (committed, or being enqueued) is never overwritten.
        for existing in (json_dest, body_dest):
            if os.path.lexists(existing):
                raise DeliveryError(
                    f"cannot enqueue {existing}: queue id {queue_id} already in use"
                )

        with doing("open", source):
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with doing("fsync", source):
                os.fchmod(fd, 0o600)
                os.fsync(fd)
        finally:
            os.close(fd)
        with doing("move into the queue", source):
            os.rename(source, body_dest)
        body_moved = True
        # The body's new name must be durable before the envelope that points at it.
        with doing("fsync directory", messages):
            fsync_dir(messages)

        tmp_created = True
        durable.write_new(json_tmp, data, named=doing)
        with doing("commit", json_dest):
            os.rename(json_tmp, json_dest)
        tmp_created = False
        committed = True
        with doing("fsync directory", messages):
            fsync_dir(messages)
    except BaseException:
        _undo(
            source=source,
            body_dest=body_dest if body_moved else None,
            json_tmp=json_tmp if tmp_created else None,
            json_dest=json_dest if committed else None,
            messages=messages,
        )
        raise
    return message


def _undo(
    *,
    source: Path,
    body_dest: Path | None,
    json_tmp: Path | None,
    json_dest: Path | None,
    messages: Path,
) -> None:
    """Roll a failed enqueue back (best effort, never raises).

    The envelope goes first, so that the message is never committed without
    its body; then the body returns to where the caller expects it.
    """
    for path in (json_dest, json_tmp):
        if path is not None:
            with suppress(OSError):
                os.unlink(path)
    if body_dest is not None:
        with suppress(OSError):
            os.rename(body_dest, source)
    with suppress(OSError):
        fsync_dir(messages)


def save(qdir: Path, message: QueuedMessage) -> None:
    """Replace a queued message's envelope atomically and durably (new state after an attempt).

    The new content goes to a unique dot-file, is fsync'd and renamed over the old
    envelope, then ``messages/`` is fsync'd: after a crash the file holds either the
    old state or the new one, never a mixture.  DeliveryError on failure (the old
    state stays).
    """
    check_queue_id(message.id)
    data = encode(message)
    durable.replace(Path(qdir) / "messages" / f"{message.id}.json", data, named=doing)


def remove(qdir: Path, queue_id: str) -> bool:
    """Take a finished (or deleted) message out of the queue; False when it was not there.

    The envelope goes first: a crash in between leaves a bare body, which the loader
    recognises as unfinished and removes, never a envelope without its body.
    """
    check_queue_id(queue_id)
    messages = Path(qdir) / "messages"
    found = False
    for suffix in (".json", ".body"):
        try:
            os.unlink(messages / f"{queue_id}{suffix}")
            found = True
        except FileNotFoundError:
            pass
    with doing("fsync directory", messages):
        fsync_dir(messages)
    return found


def read_message(path: Path) -> QueuedMessage:
    """Load one envelope file; ValueError (naming the file) when it is corrupt.

    OSError (a missing file, say) passes through unchanged: that is not
    corruption, and the caller may want to tell the two apart.
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        message = decode(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if message.id != Path(path).name[: -len(".json")]:
        raise ValueError(f"{path}: corrupt queue envelope: it holds id {message.id!r}")
    return message


# --------------------------------------------------------------------------- start-up


@dataclass
class LoadReport:
    """What the start-up scan found: the messages to deliver, and what it cleaned up."""

    messages: list[QueuedMessage] = field(default_factory=list)
    #: (file name, reason) of envelopes moved to corrupt/.
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    #: Names of leftovers of interrupted writes that were removed (never sent).
    unfinished: list[str] = field(default_factory=list)


def load(qdir: Path) -> LoadReport:
    """Read the whole queue at start-up, recognising what a crash left behind.

    - ``.<id>.json…tmp`` dot-files are envelope writes that never reached their
      rename: removed (the previous state, if any, is still in ``<id>.json``).
    - ``<id>.body`` without ``<id>.json`` is an enqueue that never committed (no
      ``250`` was given for it) or a removal that was cut short: removed.
    - an envelope that does not decode, or whose body is missing, is moved with
      its body to ``corrupt/`` for the administrator, and reported.
    Only a server holding the queue lock may call this.
    """
    qdir = Path(qdir)
    messages_dir = qdir / "messages"
    corrupt_dir = qdir / "corrupt"
    report = LoadReport()
    names = set(os.listdir(messages_dir))
    for name in sorted(names):
        path = messages_dir / name
        if name.startswith("."):
            with suppress(FileNotFoundError):
                os.unlink(path)
            report.unfinished.append(name)
        elif name.endswith(".body") and f"{name[:-5]}.json" not in names:
            with suppress(FileNotFoundError):
                os.unlink(path)
            report.unfinished.append(name)
        elif name.endswith(".json"):
            try:
                message = read_message(path)
                if f"{message.id}.body" not in names:
                    raise ValueError(f"{path}: its body {message.id}.body is missing")
            except ValueError as exc:
                stem = name[:-5]
                for moved in (name, f"{stem}.body"):
                    if moved in names:
                        os.replace(messages_dir / moved, corrupt_dir / moved)
                report.corrupt.append((name, str(exc)))
            else:
                report.messages.append(message)
        elif not name.endswith(".body"):
            os.replace(path, corrupt_dir / name)
            report.corrupt.append((name, "not a queue file"))
    if report.unfinished or report.corrupt:
        fsync_dir(messages_dir)
        fsync_dir(corrupt_dir)
    return report
