"""
The intake of one message: its envelope, its spool file, and its storage.

A ``Transaction`` (``IMessageIntake``) is started by the connection's SessionDelivery at MAIL
and given each accepted recipient. It spools the body while it arrives and, at its end, in a
delivery thread (a binary MIME body made text first), runs the header and message checks
(mailsrv.checks.pipeline) and the modifiers, then stores it: local copies into Maildirs (or the
folder a check filed them into), remote recipients into the queue, all or nothing, before the
protocol may answer ``250``.
"""

from __future__ import annotations

import errno
import io
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv import replies
from mailsrv.checks.auth.evaluate import is_checked
from mailsrv.checks.auth.results import (
    FIELD_NAME,
    RENAMED_FIELD_NAME,
    AuthResults,
    authserv_id,
    rename_fields,
)
from mailsrv.checks.backscatter import forged_sender
from mailsrv.checks.pipeline import ACCEPTED, Client, Draft, Facts, Outcome, Stage
from mailsrv.checks.rspamd.intake import scan_message
from mailsrv.inbound.binarybody import make_text
from mailsrv.inbound.placelog import log_places
from mailsrv.interfaces import IMessageIntake
from mailsrv.message import headers, headsection
from mailsrv.outbound import delivered
from mailsrv.outbound.requiretls import tls_required
from mailsrv.replies import Refusal
from mailsrv.routing.address import Mailbox
from mailsrv.routing.dsn_params import MailDSN, RecipientDSN
from mailsrv.routing.router import LocalTarget, RemoteTarget, Target
from mailsrv.storage import maildir, queue
from mailsrv.storage.fdio import write_all
from mailsrv.storage.store import Stored, store

if TYPE_CHECKING:
    from mailsrv.checks.auth.spfcheck import SPFResult
    from mailsrv.inbound.session_intake import SessionDelivery

__all__ = ["Transaction", "bracketed", "SPOOL_HELD"]

#: Octets of a message kept in memory before they are written to its spool file.
SPOOL_HELD = 256 * 1024

log = Logger(namespace="mailsrv")


def bracketed(mailbox: Mailbox | None) -> str:
    """A sender as the log lines write it: ``<address>``, or ``<>`` for the null sender."""
    return f"<{mailbox}>" if mailbox is not None else "<>"


@implementer(IMessageIntake)
class Transaction:
    """
    One message: its envelope, its spool file, and its delivery.

    The body is streamed to ``<queue>/incoming/<id>`` while it arrives and read back once at
    the end of DATA for all recipients (one write, hard links for further Maildirs).
    """

    def __init__(
        self, session: SessionDelivery, sender: Mailbox | None, outcome: Outcome = ACCEPTED
    ) -> None:
        self.session = session
        self.runtime = session.runtime
        self.sender = sender
        self.queue_id = queue.new_queue_id()
        #: The recipients as the client named them (for Received: and the logs).
        self.recipients: list[Mailbox] = []
        #: Where copies go, each once, in the order first named.
        self.targets: dict[Target, Mailbox] = {}
        #: The checks' outcome so far: the fields they add, the folder they filed into.
        self.outcome = outcome
        #: Local targets a check filed into a Maildir++ folder.
        self.folders: dict[Target, str] = {}
        self.spool_path: Path | None = None
        self._spool_fd: int | None = None
        #: Data not written yet: up to SPOOL_HELD octets stay in memory, so that a small
        #: message costs the reactor thread no write; the delivery thread writes them.
        self._held: list[bytes] = []
        self._held_size = 0
        self._spilled = False  # some data was written while the message arrived
        self._write_error: OSError | None = None
        self.size = 0
        #: A check changed the spool file in place (spool_edited): what is held is stale.
        self.spool_changed = False
        #: "spf=... dkim=... dmarc=..." for the log lines, once the message was checked.
        self.auth_summary = ""
        #: The DKIM signatures made (``domain/selector``), for the log line.
        self.dkim: tuple[str, ...] = ()
        #: SPF's result for the sender when it was checked before MAIL's reply (greylisting).
        self.sender_spf: SPFResult | None = None
        #: The authenticated user's send quota this transaction is open against, until it ends.
        self._user = session.authenticated_as
        self._quota = self.runtime.send_quota if self._user is not None else None
        if self._quota is not None:
            self._quota.opened(self._user)
        #: "storage" when the store failed (for the metrics; a check's refusal names it).
        self.refused_by: str | None = None
        #: time.monotonic() at the end of DATA (the delivery latency's start).
        self._data_ended = 0.0
        self.dsn = MailDSN()  #: MAIL's DSN parameters; RCPT's by recipient as named (RFC 3461)
        self.recipient_dsn: dict[Mailbox, RecipientDSN] = {}
        #: MAIL had SMTPUTF8 (RFC 6531): UTF-8 addresses and header fields; relayed with it.
        self.smtputf8 = False
        self.requiretls = False  #: MAIL had REQUIRETLS (RFC 8689): relayed over verified TLS
        self.binary = False  #: MAIL had BODY=BINARYMIME (RFC 3030): made text before the checks

    def add_recipient(
        self, recipient: Mailbox, targets: tuple[Target, ...], outcome: Outcome = ACCEPTED
    ) -> None:
        """An accepted recipient and what its RCPT checks decided: the fields they add go
        to the message, the folder to its local targets (the first folder filed into stands)."""
        self._before_last = (len(self.recipients), dict(self.targets), dict(self.folders),
                             self.outcome)
        self.recipients.append(recipient)
        if self._quota is not None:
            self._quota.recipient_added(self._user)
        self.outcome = self.outcome.then(replace(outcome, folder=None))
        folder = self.outcome.folder or outcome.folder
        for target in targets:
            self.targets.setdefault(target, recipient)
            if folder is not None and isinstance(target, LocalTarget):
                self.folders.setdefault(target, folder)

    def withdraw_last_recipient(self) -> None:
        """Take back the recipient just added (refused after all: its mailbox is full)."""
        count, targets, folders, outcome = self._before_last
        del self.recipients[count:]
        self.targets, self.folders, self.outcome = targets, folders, outcome

    # spooling

    def open_spool(self) -> None:
        """Create the spool file; raise the reply to give when the disk refuses."""
        # A file made ahead by a worker thread: no file creation on the reactor thread.
        ready = self.runtime.spool_files.take() if self.runtime.spool_files else None
        if ready is not None:
            path, fd = ready
        else:
            path = self.runtime.incoming_dir / self.queue_id
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as e:
                log.error("cannot create spool file {path}: {error}", path=path, error=e)
                raise Refusal(_storage_reply(e))
        self.spool_path, self._spool_fd = path, fd

    def write(self, data: bytes) -> None:
        """Append received, unstuffed, LF-terminated data to the spool."""
        if self._write_error is not None or self._spool_fd is None:
            return
        self._held.append(data)
        self._held_size += len(data)
        self.size += len(data)
        if self._held_size >= SPOOL_HELD:
            self._spilled = True
            self._write_held()  # a big message: written as it comes, memory stays bounded

    def _write_held(self) -> bytes | None:
        """Write the data held (on the reactor thread while the message is big and arriving,
        else in the delivery thread). A failure is kept for the reply at the end. Returns the
        whole message when it was all held (its header section is then read from memory)."""
        held, self._held, self._held_size = self._held, [], 0
        if self._write_error is not None or self._spool_fd is None:
            return None
        data = b"".join(held)
        try:
            write_all(self._spool_fd, data)
        except OSError as e:
            # Keep reading the message to its end; the reply comes after it.
            self._write_error = e
            log.error("cannot write spool file {path}: {error}", path=self.spool_path, error=e)
            return None
        return None if self._spilled else data

    def _close_spool(self) -> None:
        self._held, self._held_size = [], 0
        if self._spool_fd is not None:
            fd, self._spool_fd = self._spool_fd, None
            try:
                os.close(fd)
            except OSError as e:
                self._write_error = self._write_error or e

    def _remove_spool(self) -> None:
        self._close_spool()
        if self.spool_path is not None:
            try:
                os.unlink(self.spool_path)
            except FileNotFoundError:
                pass
            self.spool_path = None

    def _ended(self, accepted: bool) -> None:
        """The transaction is over: its message counts against the send quota if it was
        accepted (mailsrv.inbound.sendquota); only the first call counts."""
        quota, self._quota = self._quota, None
        if quota is not None:
            assert self._user is not None
            quota.closed(self._user, len(self.recipients), accepted)

    def connectionLost(self) -> None:
        """The client went away (or reset) before the end of the message."""
        self._ended(accepted=False)
        self._remove_spool()

    def refuse(self, reason: str, size: int) -> None:
        """The protocol refused the message while receiving it: log it, keep nothing."""
        log.info(
            "refused message id={id} client={client} from={sender} size={size} "
            "nrcpt={nrcpt} check=smtp reason=\"{reason}\"",
            id=self.queue_id, client=self.session.client, sender=bracketed(self.sender),
            size=size, nrcpt=len(self.recipients), reason=reason,
        )
        self._ended(accepted=False)
        self.runtime.metrics.refused("data", reason.lower().replace(" ", "_"))
        self._remove_spool()

    # delivery

    def eomReceived(self) -> defer.Deferred:
        """The message is complete; deliver it, firing with the queue id."""
        self._data_ended = time.monotonic()
        trace = self.session.receivedHeader(
            None, self.sender, self.recipients, queue_id=self.queue_id, smtputf8=self.smtputf8)
        d = self.runtime.in_thread(self._deliver_blocking, trace, self.session.facts())
        d.addCallbacks(self._delivered, self._failed)
        return d

    def _deliver_blocking(self, received: bytes, client: Client) -> Stored:
        """In a delivery thread: the header and message checks, the modifiers, then every
        copy durable, or none visible. Returns what went where."""
        assert self.spool_path is not None
        config = self.runtime.config
        checks = self.session.checks
        queued = False
        try:
            whole = self._write_held()  # the spool file's end, written here, not on the reactor
            self._close_spool()
            if self._write_error is not None:
                self.refused_by = "storage"
                raise Refusal(_storage_reply(self._write_error))
            if self.binary:
                self.size, whole = make_text(self.spool_path), None
            if whole is not None:  # (no reading back what was just written)
                head = headsection.read_head(io.BytesIO(whole))
            else:
                with open(self.spool_path, "rb") as spool:
                    head = headsection.read_head(spool)
            facts = Facts(
                Stage.HEADER, client, self.runtime.directory, sender=self.sender,
                recipients=tuple(self.recipients), head=headsection.inspect_head(head),
            )
            outcome = self.outcome.then(checks.run(facts))
            auth = spam = None
            if outcome.refusal is None:
                auth = self._authenticate(client, facts)
                spam = scan_message(self, client, received, head)
                if self.spool_changed:
                    whole = None  # no longer the spool file's content
                outcome = outcome.then(checks.run(facts.at(
                    Stage.MESSAGE, body_path=self.spool_path, size=self.size, auth=auth,
                    spam=spam)))
            if outcome.refusal is not None:
                raise Refusal(outcome.refusal.reply, outcome.refused_by, outcome.refusal.reason)
            if outcome.folder is not None:
                for target in self.targets:
                    if isinstance(target, LocalTarget):
                        self.folders.setdefault(target, outcome.folder)
            assert facts.head is not None
            draft = checks.modify(Draft(
                queue_id=self.queue_id, hostname=config.hostname,
                sender=str(self.sender) if self.sender else None,
                prefix=received + b"".join(outcome.headers), head=facts.head,
                authenticated_as=client.authenticated_as, directory=self.runtime.directory,
                client=client, body_path=self.spool_path,
                queued=any(isinstance(t, RemoteTarget) for t in self.targets),
            ))
            self.dkim = draft.dkim
            # Mail from outside an alias forwards, or a success report answers: not to a forgery.
            no_bounce = forged_sender(auth, spam) if not client.may_relay else None
            trace = draft.prefix
            if headers.needs_separator(head):
                trace += b"\n"
            by_address = delivered.by_address(self.targets, self.recipient_dsn)
            try:
                stored = store(
                    config, self.queue_id, sender=draft.sender, queue_sender=draft.queue_sender,
                    queue_prefix=draft.queue_prefix, targets=list(self.targets),
                    trace=trace, body_path=self.spool_path, received_from=client.name,
                    folders=self.folders, no_bounce=no_bounce, dsn=self.dsn,
                    recipient_dsn=by_address, smtputf8=self.smtputf8,
                    tls_required=tls_required(self.requiretls, head), body=whole,
                )
            except maildir.DeliveryError as e:
                log.error("delivery failed id={id}: {error}", id=self.queue_id, error=e)
                self.refused_by = "storage"
                raise Refusal(replies.DISK_FULL if e.disk_full else replies.LOCAL_ERROR)
            queued = bool(stored.entries)
            delivered.report(self.runtime, self, stored, by_address, client.name, trace + head,
                             no_bounce)
            return stored
        finally:
            if not queued:  # else the file was moved into the queue: nothing left here
                if self.runtime.spool_files is not None:
                    self.runtime.spool_files.release(self.spool_path)  # reused, not removed
                else:
                    try:
                        os.unlink(self.spool_path)
                    except FileNotFoundError:
                        pass
            self.spool_path = None

    def _authenticate(self, client: Client, facts: Facts) -> AuthResults | None:
        """In the delivery thread: SPF, DKIM and DMARC for mail from another server, and
        its Authentication-Results: fields that claim to be ours renamed in the spool
        file (RFC 8601 §5)."""
        authenticator = self.runtime.authenticator
        if authenticator is None or not is_checked(client.trusted_network,
                                                   client.authenticated_as):
            return None
        assert self.spool_path is not None and facts.head is not None
        auth = authenticator.evaluate(
            client.ip, client.helo, str(self.sender) if self.sender else None, facts.head,
            self.spool_path, spf_known=self.sender_spf)
        self.auth_summary = auth.summary()
        claimed = [offset for offset, value in facts.head.auth_results
                   if authserv_id(value) == self.runtime.config.hostname.lower()]
        if claimed:
            rename_fields(self.spool_path, claimed, FIELD_NAME, RENAMED_FIELD_NAME)
            self.spool_edited()
            log.info("renamed {n} Authentication-Results: claiming to be ours id={id}",
                     n=len(claimed), id=self.queue_id)
        return auth

    def spool_edited(self) -> None:
        """Whoever changes the spool file in place (renaming header fields) says so: the
        message held in memory is then not written into the Maildir for it."""
        self.spool_changed = True

    def _delivered(self, stored: Stored) -> str:
        self._ended(accepted=True)
        session = self.session
        extra = ""
        if session.tls:
            extra += f' tls="{session.tls}"'
        if session.authenticated_as:
            extra += f" user={session.authenticated_as}"
        if self.auth_summary:
            extra += f" {self.auth_summary}"
        if self.dkim:
            extra += f" dkim={','.join(self.dkim)}"
        log.info(
            "accepted id={id} client={client} helo={helo} from={sender} size={size} "
            "nrcpt={nrcpt}{extra}",
            id=self.queue_id, client=session.client, helo=session.helo,
            sender=bracketed(self.sender), size=self.size, nrcpt=len(self.targets), extra=extra,
        )
        log_places(self.queue_id, stored, self.targets)
        local = sum(isinstance(target, LocalTarget) for target, _ in stored.places)
        self.runtime.metrics.accepted(
            "submission" if session.submission else "smtp", self.size, local,
            len(stored.places) - local, self._data_ended, sender=bracketed(self.sender),
            recipients=[f"<{r}>" for r in self.recipients])
        if self.runtime.relayer is not None:
            for entry in stored.entries:
                self.runtime.relayer.add(entry)
        return self.queue_id

    def _failed(self, failure: Any) -> Any:
        self._ended(accepted=False)
        if failure.check(Refusal):
            refusal = failure.value
            log.info(
                "refused message id={id} client={client} from={sender} size={size} "
                "nrcpt={nrcpt} {why}{auth}",
                id=self.queue_id, client=self.session.client, sender=bracketed(self.sender),
                size=self.size, nrcpt=len(self.targets), why=refusal.describe(),
                check=refusal.check, auth=f" {self.auth_summary}" if self.auth_summary else "",
            )
            self.runtime.metrics.refused(
                "data", refusal.check or self.refused_by or "local_error")
        return failure


def _storage_reply(error: OSError) -> replies.Reply:
    """452 4.3.1 when the disk is full, 451 4.3.0 for any other storage failure."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return replies.DISK_FULL
    return replies.LOCAL_ERROR
