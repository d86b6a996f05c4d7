"""
Storing one message for all its targets, all or nothing (blocking; run it in the thread pool).

Both ways mail enters the system end here: a message received over SMTP and a bounce the
relayer writes.  Local copies go into the Maildirs first, remote recipients into the queue;
if the queue refuses, the local copies are taken back out, so that the caller can answer (or
retry) without leaving half a delivery behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mailsrv.config import Config
from mailsrv.message import headers
from mailsrv.routing.dsn_params import MailDSN, RecipientDSN
from mailsrv.routing.router import LocalTarget, RemoteTarget, Target
from mailsrv.storage import maildir, queue
from mailsrv.storage.durable import DeliveryError
from mailsrv.storage.envelope import QueuedMessage

__all__ = ["Stored", "store"]


@dataclass
class Stored:
    """Where the copies went: (target, Maildir path or "queue"), and the queue entry if any."""

    places: list[tuple[Target, str]] = field(default_factory=list)
    queued: QueuedMessage | None = None
    #: With LMTP delivery, the local targets' entry in the queue (their own sender, without
    #: SRS, and their own trace): the relayer hands it to Dovecot's LMTP and retries it.
    for_lmtp: QueuedMessage | None = None

    @property
    def entries(self) -> list[QueuedMessage]:
        """Every queue entry made, for the relayer."""
        return [q for q in (self.queued, self.for_lmtp) if q is not None]


def store(
    config: Config,
    queue_id: str,
    *,
    sender: str | None,
    queue_sender: str | None = None,
    queue_prefix: bytes = b"",
    targets: list[Target],
    trace: bytes,
    body_path: Path,
    received_from: str,
    double_bounce: bool = False,
    folders: Mapping[Target, str] | None = None,
    no_bounce: str | None = None,
    dsn: MailDSN | None = None,
    recipient_dsn: Mapping[str, RecipientDSN] | None = None,
    smtputf8: bool = False,
    tls_required: str | None = None,
    body: bytes | None = None,
) -> Stored:
    """Deliver local targets and queue remote ones; raise DeliveryError on failure.

    ``trace`` is the header lines to put before the body (``Received:``, maybe
    ``Message-ID:``, maybe the blank separator line).  Local copies also get
    ``Return-Path:`` (``sender``; the queued copy is sent from ``queue_sender`` when given,
    the SRS address of a forwarded message; and ``queue_prefix`` before ``trace``, its ARC
    set) and ``Delivered-To:`` (the mailbox the copy lands in, as Postfix's
    local and virtual write it; what Sieve and loop detection read): they belong to the
    final delivery only, so the queued copy, which is relayed onwards, does not carry them.
    ``Delivered-To:`` is written only when the local copies go to one mailbox; for several,
    one file is linked into every mailbox and names none of them (see ``_local_prefix``).
    ``double_bounce`` marks a queued postmaster notice about a failed bounce, ``no_bounce``
    a queued copy whose failures are only logged (see mailsrv.storage.envelope).
    ``folders`` names the Maildir++ folder a check filed a local target's copy into
    (``Junk``: ``<mailbox>/.Junk/``, created as needed); the others go to the INBOX.
    ``dsn`` and ``recipient_dsn`` (by target address) are the client's DSN parameters,
    kept with the queued copy.  ``smtputf8``: the message came
    with SMTPUTF8, so its queued copy is marked so, and the local copies' Return-Path: and
    Delivered-To: may be UTF-8 (RFC 6532).  ``tls_required`` (RFC 8689, mailsrv.storage.envelope)
    goes with the queued copy.  The body file is consumed: moved into the queue
    or left for the caller to remove.  ``body``, when the caller holds it, is the body
    file's content: the Maildir copy is written from it (maildir.deliver).
    """
    local = [t for t in targets if isinstance(t, LocalTarget)]
    remote = [t for t in targets if isinstance(t, RemoteTarget)]
    stored = Stored()
    delivered: list[str] = []
    if local and config.mailboxes.delivery is not None:
        return _store_for_lmtp(config, queue_id, stored, local, remote, sender=sender,
                               queue_sender=queue_sender, queue_prefix=queue_prefix, trace=trace,
                               body_path=body_path, received_from=received_from,
                               double_bounce=double_bounce, no_bounce=no_bounce, dsn=dsn,
                               recipient_dsn=recipient_dsn, smtputf8=smtputf8,
                               tls_required=tls_required)
    try:
        if local:
            return_path = headers.return_path(sender, utf8=smtputf8)
            folders = folders or {}
            delivered = maildir.deliver(
                config.mailboxes.root, [_maildir(t, folders.get(t)) for t in local],
                _local_prefix(local, return_path, trace, smtputf8),
                body_path, hostname=config.hostname, body=body,
            )
            stored.places += zip(local, delivered)
        if remote:
            stored.queued = queue.enqueue(
                Path(config.queue.path), queue_id,
                sender=queue_sender if queue_sender is not None else sender,
                recipients=[t.address for t in remote], prefix=queue_prefix + trace,
                body_path=body_path,
                created=time.time(), received_from=received_from, double_bounce=double_bounce,
                no_bounce=no_bounce, dsn=dsn, recipient_dsn=recipient_dsn, smtputf8=smtputf8,
                tls_required=tls_required,
            )
            stored.places += [(t, "queue") for t in remote]
    except DeliveryError:
        maildir.remove_delivered(config.mailboxes.root, delivered)
        raise
    return stored


def _store_for_lmtp(
    config: Config, queue_id: str, stored: Stored, local: list[LocalTarget],
    remote: list[RemoteTarget], *, sender: str | None, queue_sender: str | None,
    queue_prefix: bytes, trace: bytes, body_path: Path, received_from: str,
    double_bounce: bool, no_bounce: str | None, dsn: MailDSN | None = None,
    recipient_dsn: Mapping[str, RecipientDSN] | None = None, smtputf8: bool = False,
    tls_required: str | None = None,
) -> Stored:
    """LMTP delivery: the local targets become a queue entry of their own (``<id>L`` when
    remote targets take ``<id>``), which the relayer hands to Dovecot; Dovecot writes
    Return-Path: and Received: itself.  Both entries or neither; ``no_bounce`` (a forged
    sender's mail) holds for both: Dovecot's refusal of it is only logged, no backscatter."""
    qdir = Path(config.queue.path)
    local_id = f"{queue_id}L" if remote else queue_id
    local_body = body_path
    if remote:
        local_body = body_path.with_name(f"{body_path.name}.lmtp")
        try:
            os.link(body_path, local_body)
        except OSError as e:
            raise DeliveryError(f"cannot link {body_path}: {e.strerror}",
                                disk_full=e.errno in (errno.ENOSPC, errno.EDQUOT)) from None
    try:
        stored.for_lmtp = queue.enqueue(
            qdir, local_id, sender=sender, recipients=[t.address for t in local],
            prefix=trace, body_path=local_body, created=time.time(),
            received_from=received_from, double_bounce=double_bounce, no_bounce=no_bounce,
        )
    except DeliveryError:
        if local_body != body_path:
            with contextlib.suppress(OSError):
                os.unlink(local_body)
        raise
    stored.places += [(t, "queue") for t in local]
    if remote:
        try:
            stored.queued = queue.enqueue(
                qdir, queue_id, sender=queue_sender if queue_sender is not None else sender,
                recipients=[t.address for t in remote], prefix=queue_prefix + trace,
                body_path=body_path, created=time.time(), received_from=received_from,
                double_bounce=double_bounce, no_bounce=no_bounce, dsn=dsn,
                recipient_dsn=recipient_dsn, smtputf8=smtputf8, tls_required=tls_required,
            )
        except DeliveryError:
            queue.remove(qdir, local_id)
            raise
        stored.places += [(t, "queue") for t in remote]
    return stored


def _local_prefix(local: list[LocalTarget], return_path: bytes, trace: bytes,
                  smtputf8: bool) -> bytes:
    """The trace lines above the body of the local copies: one file for every mailbox.

    ``Delivered-To:`` names the mailbox only when there is one, as Dovecot's LMTP does (and
    our ``Received:`` has ``for`` only with one recipient): a message for several mailboxes
    is then written and fsync'd once and hard-linked into each ``new/``, where a
    ``Delivered-To:`` per copy would make a file, a block allocation and an fsync per mailbox
    (ten mailboxes cost four times one; one file and ten links, a third of that). A shared
    copy naming one recipient would also show a Bcc'd recipient's address to the others, so
    a shared copy names none."""
    mailboxes = {t.address for t in local}
    if len(mailboxes) == 1:
        return return_path + headers.delivered_to(local[0].address, utf8=smtputf8) + trace
    return return_path + trace


def _maildir(target: LocalTarget, folder: str | None) -> str:
    """The Maildir of ``target`` relative to the mail root: its INBOX, or the Maildir++
    folder ``.<folder>`` in it (the name is checked by mailsrv.checks.pipeline.FileInto)."""
    inbox = target.maildir_name
    return f"{inbox}/.{folder}" if folder else inbox
