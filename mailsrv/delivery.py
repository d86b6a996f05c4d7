"""
The glue between the SMTP protocol, the routing rules and the storage.

``SessionDelivery`` is Twisted's ``IMessageDelivery`` for one connection: it knows the client
(address, verified reverse name, whether it may relay) and decides MAIL and RCPT. A
``Transaction`` is Twisted's ``IMessage`` for one message: it spools the body while it arrives
and, at the end of DATA, delivers it in the thread pool: local copies into Maildirs, remote
recipients into the queue, all or nothing, before the protocol may answer ``250``.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.mail.smtp import IMessage, IMessageDelivery
from zope.interface import implementer

from mailsrv import headers, headsection, maildir, queue, replies
from mailsrv.address import AddressError, Mailbox, parse_mail_from
from mailsrv.auth import FailureTracker
from mailsrv.config import Config
from mailsrv.dnsutil import verified_reverse_name
from mailsrv.policy import Refusal, owns_address, recipient_targets
from mailsrv.replies import SMTPReplyError
from mailsrv.router import Directory, LocalTarget, Target
from mailsrv.store import Stored, store

log = Logger(namespace="mailsrv")


@dataclass
class Runtime:
    """What every session shares: configuration, the mail directory, the reactor, DNS."""

    config: Config
    directory: Directory
    reactor: Any
    resolver: Any = None
    #: The relayer (mailsrv.relayer.Relayer) that learns of each newly queued message.
    relayer: Any = None
    #: The server TLS context factory (mailsrv.tls.ServerTLS), None without [tls].
    tls: Any = None
    #: Failed AUTH per client address (the delay and the lockout), shared by all listeners.
    auth_failures: FailureTracker | None = None
    #: Twisted's ICredentialsChecker for AUTH (mailsrv.auth.PasswordChecker).
    checker: Any = None

    @property
    def passwords(self) -> Mapping[str, str | None]:
        """Lower-case address -> bcrypt hash (None: no login), from the current users file."""
        return self.directory.passwords
    #: Spool files created ahead in the thread pool (mailsrv.spoolfiles), or None.
    spool_files: Any = None
    #: The delivery threads (mailsrv.workers.Workers); None: Twisted's thread pool.
    workers: Any = None

    @property
    def incoming_dir(self) -> Path:
        return Path(self.config.queue.path) / "incoming"

    def new_session(self, client_ip: str, submission: bool = False) -> "SessionDelivery":
        return SessionDelivery(self, client_ip, submission)

    def may_relay(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(address in network for network in self.config.relay.trusted_networks)

    def in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run blocking disk work in a worker thread, never on the reactor thread."""
        if self.workers is not None:
            return self.workers.run(f, *args)
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)


def _fire(d: defer.Deferred) -> None:
    if not d.called:
        d.callback(None)


def _addr(mailbox: Mailbox | None) -> str:
    return f"<{mailbox}>" if mailbox is not None else "<>"


@implementer(IMessageDelivery)
class SessionDelivery:
    """Decides MAIL and RCPT for one connection and remembers the client's facts."""

    def __init__(self, runtime: Runtime, client_ip: str, submission: bool = False) -> None:
        self.runtime = runtime
        self.client_ip = client_ip
        #: On a submission listener: AUTH is required before MAIL.
        self.submission = submission
        self.trusted_network = runtime.may_relay(client_ip)
        #: The users-file address of the authenticated user, once AUTH succeeded.
        self.authenticated_as: str | None = None
        #: "TLSv1.3 TLS_AES_256_GCM_SHA384" once the session runs over TLS.
        self.tls: str | None = None
        self.helo = ""
        self.esmtp = False
        #: The forward-confirmed reverse DNS name of the client, once known.
        self.reverse_name: str | None = None
        self._lookup: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        #: The transaction MAIL started, which RCPT adds to.
        self.transaction: Transaction | None = None
        if runtime.config.smtp.reverse_dns and runtime.resolver is not None:
            self._lookup = verified_reverse_name(runtime.resolver, client_ip)
            self._lookup.addErrback(lambda failure: None)  # no answer: no name
            self._lookup.addCallback(self._got_reverse_name)

    def _got_reverse_name(self, name: str | None) -> None:
        self.reverse_name = name
        self._lookup = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            _fire(d)

    def reverse_name_known(self, timeout: float) -> defer.Deferred:
        """Fires once the reverse lookup has ended, or after ``timeout`` seconds at most.

        The greeting waits for it (as Postfix's does), so that every log line and the
        Received: field name the client the same way; a slow DNS delays only the banner.
        """
        if self._lookup is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        timer = self.runtime.reactor.callLater(timeout, _fire, d)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(stop_timer)

    def close(self) -> None:
        if self._lookup is not None:
            self._lookup.cancel()
            self._lookup = None

    @property
    def client(self) -> str:
        return f"{self.reverse_name or 'unknown'}[{self.client_ip}]"

    @property
    def may_relay(self) -> bool:
        """A trusted network, or an authenticated user, may send to any domain."""
        return self.trusted_network or self.authenticated_as is not None

    @property
    def protocol(self) -> str:
        """The Received: ``with`` keyword (RFC 3848): ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.authenticated_as else "")

    def owns(self, address: Mailbox | None) -> bool:
        """Whether the authenticated user may use ``address`` as a sender."""
        assert self.authenticated_as is not None
        return owns_address(self.authenticated_as, address, self.runtime.directory)

    def greeted(self, helo: str, esmtp: bool) -> None:
        self.helo, self.esmtp = helo, esmtp

    # IMessageDelivery

    def receivedHeader(
        self, helo: Any, origin: Mailbox | None, recipients: list[Mailbox], *, queue_id: str = ""
    ) -> bytes:
        """Our own Received: field (Twisted's default one is malformed and injectable)."""
        return headers.received_header(
            helo=self.helo,
            client_ip=self.client_ip,
            reverse_name=self.reverse_name,
            hostname=self.runtime.config.hostname,
            protocol=self.protocol,
            queue_id=queue_id,
            recipient=str(recipients[0]) if len(recipients) == 1 else None,
            when=datetime.datetime.now(datetime.timezone.utc),
            tls=self.tls,
        )

    def validateFrom(self, helo: Any, origin: Mailbox | None) -> "Transaction":
        """Start a transaction.

        Any syntactically valid sender is accepted from an unauthenticated client (port 25
        receives the world's mail); an authenticated user may only use an address they own,
        so that a stolen or shared password cannot forge someone else's mail.
        """
        if self.authenticated_as is not None and not self.owns(origin):
            log.info(
                "refused sender client={client} user={user} from={sender} "
                'reason="sender not owned"',
                client=self.client, user=self.authenticated_as, sender=_addr(origin),
            )
            raise SMTPReplyError(replies.SENDER_NOT_OWNED.format(
                sender=str(origin) if origin is not None else "", user=self.authenticated_as
            ))
        self.transaction = Transaction(self, origin)
        return self.transaction

    def validateTo(self, user: Mailbox) -> Callable[[], "Transaction"]:
        """Decide one recipient of the current transaction; raise the refusal's reply."""
        transaction = self.transaction
        assert transaction is not None, "RCPT before MAIL is refused by the protocol"
        try:
            targets = recipient_targets(user, self.runtime.directory, self.may_relay)
        except Refusal as refusal:
            log.info(
                "refused recipient id={id} client={client} from={sender} to=<{rcpt}> "
                'reason="{code} {status} {text}"',
                id=transaction.queue_id, client=self.client, sender=_addr(transaction.sender),
                rcpt=user, code=refusal.code, status=refusal.status, text=refusal.text,
            )
            raise SMTPReplyError(replies.Reply(refusal.code, refusal.status, refusal.text))
        transaction.add_recipient(user, targets)
        return lambda: transaction


@implementer(IMessage)
class Transaction:
    """
    One message: its envelope, its spool file, and its delivery.

    The body is streamed to ``<queue>/incoming/<id>`` while it arrives and read back once at
    the end of DATA for all recipients (one write, hard links for further Maildirs).
    """

    def __init__(self, session: SessionDelivery, sender: Mailbox | None) -> None:
        self.session = session
        self.runtime = session.runtime
        self.sender = sender
        self.queue_id = queue.new_queue_id()
        #: The recipients as the client named them (for Received: and the logs).
        self.recipients: list[Mailbox] = []
        #: Where copies go, each once, in the order first named.
        self.targets: dict[Target, Mailbox] = {}
        self.spool_path: Path | None = None
        self._spool: Any = None
        self._write_error: OSError | None = None
        self.size = 0

    def add_recipient(self, recipient: Mailbox, targets: tuple[Target, ...]) -> None:
        self.recipients.append(recipient)
        for target in targets:
            self.targets.setdefault(target, recipient)

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
                raise SMTPReplyError(_storage_reply(e))
        self.spool_path = path
        self._spool = os.fdopen(fd, "wb", buffering=256 * 1024)

    def write(self, data: bytes) -> None:
        """Append received, unstuffed, LF-terminated data to the spool."""
        if self._write_error is not None or self._spool is None:
            return
        try:
            self._spool.write(data)
            self.size += len(data)
        except OSError as e:
            # Keep reading the DATA to its end; the reply comes after the final dot.
            self._write_error = e
            log.error("cannot write spool file {path}: {error}", path=self.spool_path, error=e)

    def lineReceived(self, line: bytes) -> None:
        """IMessage: one line of the message, without its line end."""
        self.write(line + b"\n")

    def _close_spool(self) -> None:
        if self._spool is not None:
            spool, self._spool = self._spool, None
            try:
                spool.close()
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

    def connectionLost(self) -> None:
        """IMessage: the client went away (or reset) before the end of the message."""
        self._remove_spool()

    def refuse(self, reason: str, size: int) -> None:
        """The protocol refused the message while receiving it: log it, keep nothing."""
        log.info(
            "refused message id={id} client={client} from={sender} size={size} "
            "nrcpt={nrcpt} reason=\"{reason}\"",
            id=self.queue_id, client=self.session.client, sender=_addr(self.sender),
            size=size, nrcpt=len(self.recipients), reason=reason,
        )
        self._remove_spool()

    # delivery

    def eomReceived(self) -> defer.Deferred:
        """IMessage: the message is complete; deliver it, firing with the queue id."""
        self._close_spool()
        if self._write_error is not None:
            reply = _storage_reply(self._write_error)
            self._remove_spool()
            return defer.fail(SMTPReplyError(reply))
        trace = self.session.receivedHeader(
            None, self.sender, self.recipients, queue_id=self.queue_id
        )
        d = self.runtime.in_thread(self._deliver_blocking, trace)
        d.addCallbacks(self._delivered, self._failed)
        return d

    def _deliver_blocking(self, received: bytes) -> Stored:
        """In a worker thread: every copy durable, or none visible. Returns what went where."""
        assert self.spool_path is not None
        config = self.runtime.config
        try:
            with open(self.spool_path, "rb") as spool:
                head = headsection.read_head(spool)
            facts = headsection.inspect_head(head)
            if facts.received_count > config.smtp.max_received_headers:
                raise SMTPReplyError(replies.TOO_MANY_HOPS)
            user = self.session.authenticated_as
            if user is not None and config.submission.check_from_header:
                self._check_from_header(facts, user)
            trace = received
            if not facts.has_message_id:
                msgid = headers.make_message_id(self.queue_id, config.hostname)
                trace += headers.message_id_header(msgid)
            if user is not None and not facts.has_date:
                # RFC 6409 §8.2: a submission server may add the Date: a client forgot.
                trace += headers.date_header(datetime.datetime.now(datetime.timezone.utc))
            if headers.needs_separator(head):
                trace += b"\n"
            try:
                return store(
                    config, self.queue_id, sender=str(self.sender) if self.sender else None,
                    targets=list(self.targets), trace=trace, body_path=self.spool_path,
                    received_from=self.session.client,
                )
            except maildir.DeliveryError as e:
                log.error("delivery failed id={id}: {error}", id=self.queue_id, error=e)
                raise SMTPReplyError(replies.DISK_FULL if e.disk_full else replies.LOCAL_ERROR)
        finally:
            if self.runtime.spool_files is not None:
                self.runtime.spool_files.release(self.spool_path)  # reused, not removed
            else:
                try:
                    os.unlink(self.spool_path)
                except FileNotFoundError:
                    pass  # moved into the queue
            self.spool_path = None

    def _check_from_header(self, facts: headsection.HeaderFacts, user: str) -> None:
        """Every From:, Sender:, Resent-From: and Resent-Sender: address must be the user's own.

        Same rule as for the envelope sender.  The check holds only if no reader can see an
        originator field we did not check, so a header section that readers may read
        differently is refused (554 5.6.0), and so is one too long to read whole (552 5.3.4).
        """
        if facts.ambiguity is not None:
            raise SMTPReplyError(replies.HEADER_AMBIGUOUS.format(reason=facts.ambiguity))
        if facts.too_long:
            raise SMTPReplyError(replies.HEADER_TOO_LONG.format(
                limit=str(headsection.HEADER_SECTION_LIMIT)))
        for field, address in facts.originators:
            try:
                mailbox, _ = parse_mail_from(f"FROM:<{address}>".encode("utf-8"))
            except AddressError:
                mailbox = None
            if not self.session.owns(mailbox):
                raise SMTPReplyError(
                    replies.FROM_NOT_OWNED.format(field=field, address=address, user=user))

    def _delivered(self, stored: Stored) -> str:
        session = self.session
        extra = ""
        if session.tls:
            extra += f' tls="{session.tls}"'
        if session.authenticated_as:
            extra += f" user={session.authenticated_as}"
        log.info(
            "accepted id={id} client={client} helo={helo} from={sender} size={size} "
            "nrcpt={nrcpt}{extra}",
            id=self.queue_id, client=session.client, helo=session.helo,
            sender=_addr(self.sender), size=self.size, nrcpt=len(self.targets), extra=extra,
        )
        for target, where in stored.places:
            if isinstance(target, LocalTarget):
                log.info(
                    "delivered id={id} to=<{rcpt}> orig_to=<{orig}> mailbox={path} "
                    "status=sent",
                    id=self.queue_id, rcpt=target.address, orig=self.targets[target], path=where,
                )
            else:
                log.info(
                    "queued id={id} to=<{rcpt}> orig_to=<{orig}> status=queued",
                    id=self.queue_id, rcpt=target.address, orig=self.targets[target],
                )
        if stored.queued is not None and self.runtime.relayer is not None:
            self.runtime.relayer.add(stored.queued)
        return self.queue_id

    def _failed(self, failure: Any) -> Any:
        if failure.check(SMTPReplyError):
            reply = failure.value.reply
            log.info(
                "refused message id={id} client={client} from={sender} size={size} "
                'nrcpt={nrcpt} reason="{code} {status} {text}"',
                id=self.queue_id, client=self.session.client, sender=_addr(self.sender),
                size=self.size, nrcpt=len(self.targets), code=reply.code, status=reply.status,
                text=reply.text,
            )
        return failure


def _storage_reply(error: OSError) -> replies.Reply:
    """452 4.3.1 when the disk is full, 451 4.3.0 for any other storage failure."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return replies.DISK_FULL
    return replies.LOCAL_ERROR
