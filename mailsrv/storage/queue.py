"""The durable outbound queue in its directory (blocking I/O; call it from the thread pool).

Layout under the queue directory ``qdir``::

    incoming/<id>        bodies being received (written by the server, wiped at start-up)
    recycle/             emptied files of finished entries, for reuse (mailsrv.storage.recycle)
    messages/<id>.body   the message body, spool format (dot-unstuffed, LF line ends)
    messages/<id>.json   the envelope and per-recipient state (see mailsrv.storage.envelope)
    corrupt/             envelopes that did not decode, moved aside with their bodies
    control/             requests from ``mailsrv queue`` to the running server
    lock                 flock'd by the running server: one server per queue

The lock and the control requests are ``mailsrv.storage.queue_control``'s.

An enqueue writes the envelope to a dot-file, writes it and the body (where it was
received) out to the disk (``fdio.write_out``, waited for), renames the body to
``<id>.body`` (same file system: no copy, atomic) and the envelope to ``<id>.json``, then
fsyncs the body, the envelope and ``messages/``; the server answers ``250`` only after all
three.  Cost: one journal commit, as for a Maildir delivery (``mailsrv.storage.maildir``):
with both contents on the disk before either name is made, a journaling file system commits
the names only with or after them, so the body's fsync commits everything and the two
fsyncs after it find nothing left; the fsync of ``messages/`` is a group commit besides
(``DirectorySync``): concurrent enqueues share one.  Where the contents cannot be written
out first, both are fsync'd before the renames, the order that needs no such file system.
A crash may leave either name without the other, or a dot-file; none of them ever got a
``250``, and the start-up scan removes them (never sends them).  A ``.json`` and a
``.body`` found together are whole.  A message that got ``250`` has both names durable.

Enqueues hold ``messages/`` locked shared (``flock``) and the start-up scan exclusively
while it lists and removes leftovers, so the scan never takes an enqueue in progress for
a leftover (the server accepts mail while its queue loads). The scan is
``mailsrv.storage.queue_scan``'s.

State changes replace the ``.json`` the same way (write, fsync, rename, fsync the
directory); a finished message loses its ``.json`` first, then its ``.body``: both are moved
to ``recycle/`` (or removed when its stock is full), emptied only after the fsync of
``messages/``, and reused by later enqueues for their envelopes and spool files.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path

from mailsrv.routing.dsn_params import MailDSN, RecipientDSN
from mailsrv.storage import durable, recycle
from mailsrv.storage.dirfd import FOLLOWED_DIR_FLAGS, DirectorySync, fsync_dir
from mailsrv.storage.durable import DeliveryError, doing, ensure_dir
from mailsrv.storage.envelope import QueuedMessage, decode, encode, new_message
from mailsrv.storage.fdio import read_file, write_out

__all__ = [
    "new_queue_id", "check_queue_id", "queue_dirs", "enqueue", "save", "remove", "read_message",
    "body_path", "remove_many",
]

# Queue ids are file names, log keys and part of Message-IDs: letters and
# digits only, and never starting with '.' (dot-files are our temporaries).
_QUEUE_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}")
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: Group commit of the fsyncs of messages/ that make new entries durable, shared by the
#: enqueues of this process (as Maildir deliveries share one fsync of a new/).
_messages_sync = DirectorySync()


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
    for name in ("incoming", "spare", "messages", "corrupt", "control", recycle.RECYCLE_DIR):
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

    The envelope is written to ``messages/.<id>.json.tmp``; *body_path* (normally a spool
    file under ``qdir``, same file system) is renamed to ``messages/<id>.body``, the envelope
    to ``messages/<id>.json``; both files and ``messages/`` are fsync'd, the last fsync
    shared with the enqueues running at the same time (group commit, ``DirectorySync``); the
    order: the module's docstring. All of it under a shared lock of ``messages/``,
    which the start-up scan takes exclusively: the scan never sees an enqueue half done.

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
    messages = qdir / "messages"
    dir_fd = _open_messages(qdir)
    try:
        with doing("lock", messages):
            fcntl.flock(dir_fd, fcntl.LOCK_SH)  # released by the close
        _commit(messages, dir_fd, queue_id, data, Path(body_path))
    finally:
        os.close(dir_fd)
    return message


def _open_messages(qdir: Path) -> int:
    """A descriptor of ``qdir/messages`` (made, with the other queue directories, if missing)."""
    try:
        return os.open(qdir / "messages", FOLLOWED_DIR_FLAGS)
    except FileNotFoundError:
        queue_dirs(qdir)
    with doing("open directory", qdir / "messages"):
        return os.open(qdir / "messages", FOLLOWED_DIR_FLAGS)


def _commit(messages: Path, dir_fd: int, queue_id: str, data: bytes, source: Path) -> None:
    """enqueue's writes, in the order the crash guarantee needs (module docstring)."""
    body_dest = messages / f"{queue_id}.body"
    json_dest = messages / f"{queue_id}.json"
    json_tmp = messages / f".{queue_id}.json.tmp"
    body_moved = tmp_created = committed = False
    envelope_fd = body_fd = None
    try:
        # An id already in use (committed, or being enqueued) is never overwritten.
        for existing in (json_dest, body_dest):
            if os.path.lexists(existing):
                raise DeliveryError(
                    f"cannot enqueue {existing}: queue id {queue_id} already in use"
                )
        tmp_created = True
        try:
            envelope_fd = durable.create(json_tmp, data, named=doing, take=functools.partial(
                recycle.take, messages.parent / recycle.RECYCLE_DIR))
        except DeliveryError as exc:
            tmp_created = exc.errno != errno.EEXIST  # another enqueue's dot-file: not ours
            raise
        with doing("open", source):
            body_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        with doing("write", source):
            os.fchmod(body_fd, 0o600)
        # Both contents on the disk before either name is durable: a name that survives a
        # crash never points at a short file. Written out, they are fsync'd after the names
        # (one journal commit for all); else before them.
        named_first = write_out(envelope_fd) and write_out(body_fd)
        if not named_first:
            _sync_contents(source, body_fd, json_tmp, envelope_fd)
        with doing("move into the queue", source):
            os.rename(source, body_dest)
        body_moved = True
        with doing("commit", json_dest):
            os.rename(json_tmp, json_dest)
        tmp_created, committed = False, True
        if named_first:
            _sync_contents(body_dest, body_fd, json_dest, envelope_fd)
        with doing("fsync directory", messages):
            _sync_messages(dir_fd)
    except BaseException:
        _undo(
            source=source,
            body_dest=body_dest if body_moved else None,
            json_tmp=json_tmp if tmp_created else None,
            json_dest=json_dest if committed else None,
            messages=messages,
        )
        raise
    finally:
        for fd in (envelope_fd, body_fd):
            if fd is not None:
                os.close(fd)


def _sync_contents(body: Path, body_fd: int, envelope: Path, envelope_fd: int) -> None:
    """fsync an enqueue's two files, the body first (the paths are for the errors)."""
    with doing("fsync", body):
        os.fsync(body_fd)
    with doing("fsync", envelope):
        os.fsync(envelope_fd)


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

    The envelope goes first: a crash in between leaves a bare body (or, where the
    file system wrote the second removal first, a bare envelope), which the loader
    recognises as unfinished and removes.  The fsync of ``messages/`` that makes the
    removal durable is shared with the enqueues and removals running meanwhile.  The files
    go to ``recycle/`` rather than away, and are emptied there after that fsync.
    """
    [result] = remove_many(qdir, [queue_id])
    if isinstance(result, DeliveryError):
        raise result
    return result


def remove_many(qdir: Path, queue_ids: Sequence[str]) -> list[bool | DeliveryError]:
    """``remove`` for several messages, with one fsync of ``messages/`` for all: for each,
    whether it was there, or the DeliveryError that kept it from being removed durably."""
    for queue_id in queue_ids:
        check_queue_id(queue_id)
    # Strings from here (Path objects were a tenth of a removal), spelled as the takers'
    # Paths spell the stock's directory: the same key for recycle's view of it.
    base = os.fspath(Path(qdir))
    messages = os.path.join(base, "messages")
    stock_dir = os.path.join(base, recycle.RECYCLE_DIR)
    results: list[bool | DeliveryError] = []
    moved: list[str] = []
    for queue_id in queue_ids:
        try:
            with doing("remove from the queue", f"{messages}/{queue_id}.json"):
                found, dots = recycle.retire(stock_dir, messages,
                                             (f"{queue_id}.json", f"{queue_id}.body"))
        except DeliveryError as e:
            results.append(e)
            continue
        results.append(found)
        moved += dots
    try:
        with doing("fsync directory", messages):
            dir_fd = os.open(messages, FOLLOWED_DIR_FLAGS)
            try:
                _sync_messages(dir_fd)
            finally:
                os.close(dir_fd)
    except DeliveryError as e:
        recycle.stock(moved, keep=False)  # not known durable: never emptied, removed
        return [e if isinstance(r, bool) else r for r in results]
    recycle.stock(moved)
    return results


def _sync_messages(dir_fd: int) -> None:
    """fsync ``messages/`` (*dir_fd*) for the entries changed so far, sharing the fsync with
    other threads (``DirectorySync``: one started after our change covers it)."""
    st = os.fstat(dir_fd)
    _messages_sync.sync((st.st_dev, st.st_ino), functools.partial(os.fsync, dir_fd))


def read_message(path: Path | str) -> QueuedMessage:
    """Load one envelope file; ValueError (naming the file) when it is corrupt.

    OSError (a missing file, say) passes through unchanged: that is not
    corruption, and the caller may want to tell the two apart.
    """
    raw = read_file(path)
    try:
        message = decode(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if message.id != os.path.basename(path)[: -len(".json")]:
        raise ValueError(f"{path}: corrupt queue envelope: it holds id {message.id!r}")
    return message
