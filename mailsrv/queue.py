"""The durable outbound queue on the spool: the enqueue half (blocking I/O).

Layout under the queue directory ``qdir``::

    incoming/<id>        bodies being received (written by the server, wiped at start-up)
    messages/<id>.body   the message body, spool format (dot-unstuffed, LF line ends)
    messages/<id>.json   the envelope and per-recipient state (format below)

The ``.json`` file is the commit point.  The body is moved in first (a rename on
the same file system: no copy, and atomic), then the envelope is written to a
dot-file, fsync'd and renamed into place, then ``messages/`` is fsync'd.  A
``.body`` without its ``.json`` is an unfinished enqueue and is never sent; a
``.json`` always has its ``.body``.  The server answers ``250`` only after
``enqueue`` returns, so the message cannot be lost after that.

Envelope, version 1 (``indent=1`` JSON, so that an administrator can read it)::

    {"version": 1, "id": "...", "created": 1795381621.5, "sender": "a@b" or "",
     "received_from": "client.example[192.0.2.7]", "prefix": "Return-Path: ...\\n...",
     "recipients": [{"address": "...", "status": "queued", "attempts": 0,
                     "last_error": null, "next_attempt": 1795381621.5}]}

``prefix`` holds the trace headers to send before the body (always ASCII).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from mailsrv.maildir import DeliveryError, _doing, _write_all, ensure_dir, fsync_dir

__all__ = [
    "ENVELOPE_VERSION",
    "new_queue_id",
    "queue_dirs",
    "enqueue",
    "read_envelope",
]

ENVELOPE_VERSION = 1

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
    return _base62(int(time.time()), 6) + "".join(secrets.choice(_ALPHABET) for _ in range(8))


def _check_id(queue_id: str) -> None:
    if not isinstance(queue_id, str) or not _QUEUE_ID_RE.fullmatch(queue_id):
        raise ValueError(f"invalid queue id {queue_id!r}: expected 1 to 64 letters or digits")


def queue_dirs(qdir: Path) -> None:
    """Create ``incoming/`` and ``messages/`` (0700, with missing parents), durably.

    Raises DeliveryError when the directories cannot be made.
    """
    ensure_dir(Path(qdir) / "incoming")
    ensure_dir(Path(qdir) / "messages")


def _envelope_bytes(
    queue_id: str,
    *,
    sender: str | None,
    recipients: Sequence[str],
    prefix: bytes,
    created: float,
    received_from: str,
) -> bytes:
    """The envelope file's content; raises ValueError for anything unstorable."""
    try:
        prefix_text = prefix.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"queue {queue_id}: the prefix is not ASCII ({exc})") from None
    if isinstance(recipients, str) or not recipients:
        raise ValueError(f"queue {queue_id}: at least one recipient address is required")
    for address in recipients:
        if not isinstance(address, str) or not address:
            raise ValueError(f"queue {queue_id}: bad recipient address {address!r}")
    created = float(created)
    envelope = {
        "version": ENVELOPE_VERSION,
        "id": queue_id,
        "created": created,
        "sender": sender or "",
        "received_from": received_from,
        "prefix": prefix_text,
        "recipients": [
            {
                "address": address,
                "status": "queued",
                "attempts": 0,
                "last_error": None,
                "next_attempt": created,
            }
            for address in recipients
        ],
    }
    try:
        # Non-ASCII addresses stay readable; a lone surrogate fails here, before any I/O.
        return (json.dumps(envelope, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"queue {queue_id}: envelope is not valid text ({exc})") from None


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
) -> Path:
    """Put a message in the outbound queue, durably; return its ``.json`` path.

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
    _check_id(queue_id)
    data = _envelope_bytes(
        queue_id,
        sender=sender,
        recipients=recipients,
        prefix=prefix,
        created=created,
        received_from=received_from,
    )
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

        with _doing("open", source):
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with _doing("fsync", source):
                os.fchmod(fd, 0o600)
                os.fsync(fd)
        finally:
            os.close(fd)
        with _doing("move into the queue", source):
            os.rename(source, body_dest)
        body_moved = True
        # The body's new name must be durable before the envelope that points at it.
        with _doing("fsync directory", messages):
            fsync_dir(messages)

        with _doing("create", json_tmp):
            fd = os.open(
                json_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        tmp_created = True
        try:
            with _doing("write", json_tmp):
                os.fchmod(fd, 0o600)
                _write_all(fd, data)
            with _doing("fsync", json_tmp):
                os.fsync(fd)
        finally:
            os.close(fd)
        with _doing("commit", json_dest):
            os.rename(json_tmp, json_dest)
        tmp_created = False
        committed = True
        with _doing("fsync directory", messages):
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
    return json_dest


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


def read_envelope(path: Path) -> dict[str, Any]:
    """Load an envelope file; ValueError (naming the file) when it is corrupt.

    OSError (a missing file, say) passes through unchanged: that is not
    corruption, and the caller may want to tell the two apart.
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        envelope = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt queue envelope: {exc}") from None
    if not isinstance(envelope, dict):
        raise ValueError(f"{path}: corrupt queue envelope: not a JSON object")
    if envelope.get("version") != ENVELOPE_VERSION:
        raise ValueError(
            f"{path}: unsupported queue envelope version {envelope.get('version')!r}"
            f" (expected {ENVELOPE_VERSION})"
        )
    for key in ("id", "created", "sender", "prefix", "recipients"):
        if key not in envelope:
            raise ValueError(f"{path}: corrupt queue envelope: no {key!r}")
    if not isinstance(envelope["recipients"], list) or not all(
        isinstance(r, dict) and isinstance(r.get("address"), str) for r in envelope["recipients"]
    ):
        raise ValueError(f"{path}: corrupt queue envelope: bad 'recipients'")
    return envelope
