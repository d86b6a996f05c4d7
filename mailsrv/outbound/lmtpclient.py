"""
The LMTP client (RFC 2033): hands queued local mail to Dovecot, one reply per recipient.

LMTP is SMTP with ``LHLO`` for ``EHLO`` and, after the data, one reply for each recipient
``RCPT`` accepted, in order: Dovecot says per mailbox whether it stored the message (Sieve
ran, the quota allowed it).  The relayer queues what it hands over, so the results go
where SMTP's do (mailsrv.outbound.outcome): ``2xx`` delivered, ``4xx`` retried from the queue,
``5xx`` bounced.  Several messages go over one connection, each after ``RSET``.

Built on ``LineReceiver`` rather than Twisted's ESMTP client, whose mail transaction expects
one reply to the data.  The lines of the message are sent with CRLF and dot-stuffed, read from
the queue file by ``FileSender`` (a producer: the connection's buffer never holds a whole
large message).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols import basic, policies
from twisted.python.failure import Failure

from mailsrv import replies
from mailsrv.outbound.dotstuff import DotStuffer
from mailsrv.outbound.smtpclient import (
    RelayClientFactory,
    SessionOutcome,
)
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.replies import Reply

__all__ = ["LMTPClient", "LMTPClientFactory"]

log = Logger(namespace="mailsrv")


class LMTPClient(basic.LineReceiver, policies.TimeoutMixin):
    """Sends a list of transactions over one LMTP connection, one after the other."""

    delimiter = b"\r\n"
    MAX_LENGTH = 65536

    def __init__(self, transactions: list[OutboundTransaction], *, identity: str,
                 outcome: SessionOutcome, timeout: float = 300.0, probe: bool = False) -> None:
        self._transactions = iter(transactions)
        self.identity = identity.encode("ascii", "replace")
        self.outcome = outcome
        self.timeout = timeout
        self._lines: list[bytes] = []
        self._on_reply: Callable[[Reply], None] = self._greeted
        self._current: OutboundTransaction | None = None
        self._to_send: list[str] = []
        self._accepted: list[str] = []
        self._waiting: list[str] = []  # accepted recipients whose reply to the data is due
        self._file: IO[bytes] | None = None
        #: Ask RCPT only (what Dovecot would say now: a full mailbox), no data is sent.
        self._probe = probe

    # --- replies ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.setTimeout(self.timeout)

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        if len(line) < 3 or not line[:3].isdigit():
            self._fail(replies.SESSION_FAILED.format(reason=f"bad LMTP reply {line[:80]!r}"))
            return
        self._lines.append(line[4:])
        if line[3:4] == b"-":
            return
        reply = Reply.from_wire(int(line[:3]), b"\n".join(self._lines))
        self._lines = []
        self._on_reply(reply)

    def _send(self, command: bytes, then: Callable[[Reply], None]) -> None:
        self._on_reply = then
        self.sendLine(command)

    def _fail(self, reply: Reply) -> None:
        """Session-level trouble: never final for the messages (retried from the queue)."""
        if self.outcome.error is None:
            if reply.permanent:
                reply = replies.SESSION_FAILED.format(reason=str(reply))
            self.outcome.error = reply
        self.transport.loseConnection()

    def _greeted(self, reply: Reply) -> None:
        if reply.code != 220:
            self._fail(reply)
            return
        self.outcome.greeted = True
        self._send(b"LHLO " + self.identity, self._lhlo)

    def _lhlo(self, reply: Reply) -> None:
        if not reply.success:
            self._fail(reply)
            return
        self._next()

    # --- transactions -------------------------------------------------------------------

    def _next(self, reply: Reply | None = None) -> None:
        self._current = current = next(self._transactions, None)
        if current is None:
            self._send(b"QUIT", lambda _: self.transport.loseConnection())
            return
        current.attempted = True
        self._to_send, self._accepted = list(current.recipients), []
        self._send(b"MAIL FROM:<" + current.sender.encode("utf-8") + b">", self._mail)

    def _mail(self, reply: Reply) -> None:
        if not reply.success:
            self._finish(reply)
            return
        self._rcpt()

    def _rcpt(self, reply: Reply | None = None) -> None:
        if self._to_send:
            address = self._to_send[0]

            def answered(reply: Reply) -> None:
                self._to_send.pop(0)
                assert self._current is not None
                if reply.success:
                    self._accepted.append(address)
                else:
                    self._current.results[address] = reply
                self._rcpt()

            self._send(b"RCPT TO:<" + address.encode("utf-8") + b">", answered)
        elif self._accepted and not self._probe:
            self._send(b"DATA", self._data)
        else:
            self._finish(None)

    def _data(self, reply: Reply) -> None:
        if reply.code != 354:
            self._finish(reply)
            return
        assert self._current is not None
        current = self._current
        try:
            self._file = open(current.body_path, "rb")
        except OSError as e:
            # The queue lost the body: nothing is sent; the recipients wait (and the admin
            # sees the log line).  A lone "." would deliver an empty message: cut instead.
            log.error("lmtp id={id}: cannot read {path}: {error}", id=current.queue_id,
                      path=current.body_path, error=e.strerror)
            self.transport.abortConnection()
            return
        stuffer = DotStuffer()
        self.transport.write(stuffer(current.prefix))
        d = basic.FileSender().beginFileTransfer(self._file, self.transport, stuffer)
        d.addCallback(lambda _: self._sent(stuffer))
        d.addErrback(lambda f: None)  # the connection went: connectionLost says so

    def _sent(self, stuffer: DotStuffer) -> None:
        self._close_file()
        self.transport.write(b".\r\n" if stuffer.at_line_start else b"\r\n.\r\n")
        self._waiting = list(self._accepted)
        self._on_reply = self._delivered

    def _delivered(self, reply: Reply) -> None:
        """One reply per accepted recipient, in the order of their RCPT (RFC 2033 4.2)."""
        assert self._current is not None
        self._current.results[self._waiting.pop(0)] = reply
        if not self._waiting:
            self._finish(None)

    def _finish(self, verdict: Reply | None) -> None:
        """The transaction is decided: ``verdict`` for every recipient without a reply."""
        current, self._current = self._current, None
        assert current is not None
        for address in current.recipients:
            if verdict is not None:
                current.results.setdefault(address, verdict)
        self._send(b"RSET", self._reset)

    def _reset(self, reply: Reply) -> None:
        if not reply.success:
            self._fail(reply)
            return
        self._next()

    # --- the end ------------------------------------------------------------------------

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def timeoutConnection(self) -> None:
        self.outcome.reason = f"no reply within {self.timeout:g}s"
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)
        self._close_file()
        if self._current is not None and self.outcome.reason is None:
            self.outcome.reason = f"connection lost during the transaction: " \
                                  f"{reason.getErrorMessage()}"


class LMTPClientFactory(RelayClientFactory):
    """One LMTP connection attempt, as the relay's (``done`` fires with the outcome)."""

    client = LMTPClient
