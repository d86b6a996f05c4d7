"""
The ESMTP server protocol and its factory: parsing, sequencing, limits and replies, nothing else.

``MailsrvESMTP`` subclasses Twisted's ``ESMTP`` but takes over the byte framing, because the
inherited ``LineOnlyReceiver`` framing is unsafe for mail (see docs/design.md):

- a line ends only at CRLF; a bare CR or LF in a command closes the connection (``421``);
- a command line is at most 512 octets; the rest of a longer line is discarded, never executed;
- commands run strictly one at a time, in order: a command whose answer is asynchronous holds
  back the ones pipelined behind it (RFC 2920 needs that, Twisted's base class does not do it);
- DATA is received in raw mode by ``spool.DataScanner`` and streamed to a spool file.

Policy decisions (who may send what to whom) live in ``delivery.SessionDelivery``, which
implements Twisted's ``IMessageDelivery``; the message body goes to a ``delivery.Transaction``,
which implements ``IMessage``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP
from twisted.python.failure import Failure

from mailsrv import replies
from mailsrv.address import AddressError, parse_mail_from, parse_rcpt_to
from mailsrv.replies import Reply, SMTPReplyError
from mailsrv.spool import DataError, DataScanner

if TYPE_CHECKING:
    from mailsrv.delivery import Runtime, SessionDelivery, Transaction

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including its CRLF.
MAX_COMMAND_LINE = 512
#: Errors a client may make before it is disconnected (Postfix's smtpd_hard_error_limit).
MAX_ERRORS = 20
#: Pipelined input held back while a command is in progress before we stop reading the socket.
MAX_HELD_INPUT = 64 * 1024

# A HELO/EHLO argument: a domain name or an address literal; anything else cannot be a host name
# and might smuggle text into our Received: header.
_HELO_ARGUMENT = re.compile(rb"^(\[[A-Za-z0-9.:]+\]|[A-Za-z0-9._-]+)$")
_PRINTABLE_COMMAND = re.compile(rb"^[\x20-\x7e\t]*$")

_DATA_REPLIES = {
    DataError.BARE_LINE_END: replies.BARE_LINE_END,
    DataError.LINE_TOO_LONG: replies.DATA_LINE_TOO_LONG,
    DataError.TOO_BIG: replies.SIZE_EXCEEDS_LIMIT,
}

_COMMAND, _DATA, _CLOSING = "COMMAND", "DATA", "CLOSING"


class MailsrvESMTP(ESMTP):
    """One SMTP session."""

    log = Logger()
    factory: "SMTPServerFactory"

    # Our own attributes live in slots, not in the instance dict: with Twisted's attributes
    # the dict held 31 keys, one more than CPython shares between instances, so every
    # connection paid for a private 1.5 KiB dict (issue 6: memory per idle connection).
    # Attributes added later without a slot still work; they go to the dict.
    __slots__ = (
        "runtime", "_refusal", "_input", "_skipping_line", "_busy", "_reading_paused",
        "_errors", "_esmtp", "_helo_name", "_client_ip", "session", "_transaction",
        "_recipient_count", "_scanner", "_data_deadline",
    )

    def __init__(self, runtime: "Runtime", refusal: Reply | None = None) -> None:
        ESMTP.__init__(self)
        self.runtime = runtime
        self.host = runtime.config.hostname.encode("ascii")
        self.timeout = runtime.config.smtp.idle_timeout
        self._refusal = refusal
        self.mode = _COMMAND
        self._input = b""
        self._skipping_line = False
        self._busy = False
        self._reading_paused = False
        self._errors = 0
        self._esmtp = False
        self._helo_name: str | None = None
        self._client_ip = ""
        self.session: "SessionDelivery | None" = None
        self._transaction: "Transaction | None" = None
        self._recipient_count = 0
        self._scanner: DataScanner | None = None
        self._data_deadline = None

    # -- connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._client_ip = _plain_ip(getattr(peer, "host", str(peer)))
        self._helo = (None, self._client_ip.encode("ascii"))
        if self._refusal is not None:
            self.log.info(
                "refused connection client={client} reason={reason}",
                client=self._client_ip,
                reason=f"{self._refusal.code} {self._refusal.status}",
            )
            self._close_with(self._refusal)
            return
        self.session = self.runtime.new_session(self._client_ip)
        self.log.info("connect client={client}", client=self._client_ip)
        self._send(Reply(220, "", f"{self.runtime.config.hostname} ESMTP mailsrv"))
        self.setTimeout(self.timeout)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)
        self._cancel_data_deadline()
        self._abort_transaction()
        if self.session is not None:
            self.session.close()
            self.log.info("disconnect client={client}", client=self._client_ip)
        self.mode = _CLOSING
        self.factory.connection_closed(self._client_ip, counted=self._refusal is None)

    def timeoutConnection(self) -> None:
        self.log.info(
            "timeout client={client} state={state}", client=self._client_ip, state=self.mode
        )
        self._close_with(replies.TIMEOUT)

    def _close_with(self, reply: Reply) -> None:
        self._send(reply)
        self.mode = _CLOSING
        self._abort_transaction()
        self.transport.loseConnection()

    # -- replies --------------------------------------------------------------------------

    def _send(self, reply: Reply, **values: str) -> None:
        if self.mode != _CLOSING:
            self.transport.write(replies.format_reply(reply, **values) + b"\r\n")

    def _error(self, reply: Reply, **values: str) -> None:
        """A client error: answer it, and drop clients that make nothing but errors."""
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self.log.info("too many errors client={client}", client=self._client_ip)
            self._close_with(replies.TOO_MANY_ERRORS)
        else:
            self._send(reply, **values)

    # -- framing --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.mode == _CLOSING:
            return
        self._input += data
        self._process_input()

    def _process_input(self) -> None:
        while self._input and not self._busy and self.mode != _CLOSING:
            if self.mode == _DATA:
                self._feed_data()
            elif not self._next_command():
                break  # an unfinished line: wait for more bytes
        if self._busy and len(self._input) > MAX_HELD_INPUT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _next_command(self) -> bool:
        """Take one command line off the input; False when the line has not ended yet."""
        newline = self._input.find(b"\n")
        if self._skipping_line:
            # The tail of an over-long line: discarded up to and including its line end.
            if newline < 0:
                self._input = b""
                return False
            self._input = self._input[newline + 1 :]
            self._skipping_line = False
            return True
        if newline < 0:
            if len(self._input) > MAX_COMMAND_LINE:
                self._input = b""
                self._skipping_line = True
                self._error(replies.LINE_TOO_LONG)
            elif b"\r" in self._input[:-1]:
                self._refuse_bare_line_end()
            return False
        line, self._input = self._input[:newline], self._input[newline + 1 :]
        if not line.endswith(b"\r") or b"\r" in line[:-1]:
            self._refuse_bare_line_end()
        elif len(line) + 1 > MAX_COMMAND_LINE:
            self._error(replies.LINE_TOO_LONG)
        else:
            # Only a whole command counts as activity: a trickle of bytes does not.
            self.resetTimeout()
            self._dispatch(line[:-1])
        return True

    def _refuse_bare_line_end(self) -> None:
        self.log.info("bare CR/LF in command client={client}", client=self._client_ip)
        self._close_with(replies.BARE_LINE_END_COMMAND)

    def _dispatch(self, line: bytes) -> None:
        if not _PRINTABLE_COMMAND.match(line):
            self._error(replies.BAD_CHARACTERS)
            return
        words = line.split(None, 1)
        handler = self._COMMANDS.get(words[0].upper()) if words else None
        if handler is None:
            self._error(replies.COMMAND_UNRECOGNIZED)
            return
        result = handler(self, words[1].strip() if len(words) > 1 else b"")
        if isinstance(result, defer.Deferred):
            self._hold_input_until(result)

    def _hold_input_until(self, d: defer.Deferred) -> None:
        """Process no further pipelined input until ``d`` has fired."""
        self._busy = True
        self.setTimeout(None)

        def resume(_: object) -> None:
            self._busy = False
            if self.mode == _CLOSING:
                return
            self.setTimeout(self.timeout)
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resumeProducing()
            self._process_input()

        d.addBoth(resume)

    # -- commands -------------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._abort_transaction()
        self._recipient_count = 0

    def _abort_transaction(self) -> None:
        if self._transaction is not None:
            self._transaction.connectionLost()
            self._transaction = None

    def do_HELO(self, rest: bytes, verb: str = "HELO") -> None:
        if not rest:
            self._error(replies.HELO_NEEDS_DOMAIN, verb=verb)
            return
        argument = rest.split()[0]
        if len(argument) > 255 or not _HELO_ARGUMENT.match(argument):
            self._error(replies.HELO_BAD_DOMAIN, verb=verb)
            return
        self._reset_transaction()
        self._helo_name = argument.decode("ascii")
        self._helo = (argument, self._client_ip.encode("ascii"))
        self._esmtp = verb == "EHLO"
        assert self.session is not None
        self.session.greeted(self._helo_name, self._esmtp)
        greeting = f"{self.runtime.config.hostname} Hello {self._helo_name} [{self._client_ip}]"
        if self._esmtp:
            greeting = "\n".join([greeting, *self._extension_lines()])
        self._send(Reply(250, "", greeting))

    def do_EHLO(self, rest: bytes) -> None:
        self.do_HELO(rest, verb="EHLO")

    def _extension_lines(self) -> list[str]:
        """The extensions we implement, and only those."""
        return [
            "PIPELINING",
            f"SIZE {self.runtime.config.smtp.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]

    def do_MAIL(self, rest: bytes) -> None:
        if self._helo_name is None:
            self._error(replies.NEED_HELO)
            return
        if self._transaction is not None:
            self._error(replies.NESTED_MAIL)
            return
        try:
            sender, params = parse_mail_from(rest)
            self._check_mail_parameters(params)
            assert self.session is not None
            self._transaction = self.session.validateFrom(self._helo, sender)
        except (AddressError, SMTPReplyError) as e:
            self._error(_reply_for(e))
            return
        self._recipient_count = 0
        self._send(replies.SENDER_OK)

    def _check_mail_parameters(self, params: dict[str, str | None]) -> None:
        for name, value in params.items():
            if not self._esmtp:
                raise SMTPReplyError(replies.PARAMETER_NEEDS_EHLO.format(name=name))
            if name == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise SMTPReplyError(replies.BAD_PARAMETER_VALUE.format(name=name))
                if int(value) > self.runtime.config.smtp.max_message_size:
                    raise SMTPReplyError(replies.SIZE_EXCEEDS_LIMIT)
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPReplyError(replies.BAD_PARAMETER_VALUE.format(name=name))
            else:
                raise SMTPReplyError(replies.UNSUPPORTED_PARAMETER.format(name=name))

    def do_RCPT(self, rest: bytes) -> None:
        if self._transaction is None:
            self._error(replies.NEED_MAIL)
            return
        if self._recipient_count >= self.runtime.config.smtp.max_recipients:
            self._error(replies.TOO_MANY_RECIPIENTS)
            return
        try:
            recipient, params = parse_rcpt_to(rest)
            if params:
                name = next(iter(params))
                raise SMTPReplyError(replies.UNSUPPORTED_PARAMETER.format(name=name))
            assert self.session is not None
            self.session.validateTo(recipient)
        except (AddressError, SMTPReplyError) as e:
            self._error(_reply_for(e))
            return
        self._recipient_count += 1
        self._send(replies.RECIPIENT_OK)

    def do_DATA(self, rest: bytes) -> None:
        if rest:
            self._error(replies.NO_ARGUMENTS_ALLOWED, verb="DATA")
            return
        if self._transaction is None:
            self._error(replies.NEED_MAIL)
            return
        if not self._transaction.recipients:
            self._error(replies.NEED_RCPT)
            return
        try:
            self._transaction.open_spool()
        except SMTPReplyError as e:
            self._send(e.reply)
            self._reset_transaction()
            return
        self._scanner = DataScanner(
            self._transaction.write, self.runtime.config.smtp.max_message_size
        )
        self.mode = _DATA
        self._send(replies.START_DATA)
        self._data_deadline = self.runtime.reactor.callLater(
            self.runtime.config.smtp.data_timeout, self.timeoutConnection
        )

    def _feed_data(self) -> None:
        assert self._scanner is not None
        data, self._input = self._input, b""
        self.resetTimeout()
        after = self._scanner.feed(data)
        if after is None:
            return
        self._input = after
        self._cancel_data_deadline()
        self.mode = _COMMAND
        self._end_of_data()

    def _cancel_data_deadline(self) -> None:
        if self._data_deadline is not None and self._data_deadline.active():
            self._data_deadline.cancel()
        self._data_deadline = None

    def _end_of_data(self) -> None:
        assert self._scanner is not None and self._transaction is not None
        scanner, transaction = self._scanner, self._transaction
        self._scanner = None
        self._transaction = None
        self._recipient_count = 0
        if scanner.error is not None:
            transaction.refuse(scanner.error.value, scanner.size)
            self._error(_DATA_REPLIES[scanner.error])
            return
        d = transaction.eomReceived()

        def accepted(queue_id: str) -> None:
            self._send(replies.QUEUED, queue_id=queue_id)

        def failed(failure: Failure) -> None:
            if failure.check(SMTPReplyError):
                self._send(failure.value.reply)
            else:
                self.log.failure("delivery failed", failure)
                self._send(replies.LOCAL_ERROR)

        d.addCallbacks(accepted, failed)
        self._hold_input_until(d)

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self._send(replies.OK)

    def do_NOOP(self, rest: bytes) -> None:
        self._send(replies.OK)

    def do_VRFY(self, rest: bytes) -> None:
        # Answering truthfully would let anyone harvest our users.
        if not rest:
            self._error(replies.VRFY_SYNTAX)
        else:
            self._send(replies.CANNOT_VRFY)

    def do_EXPN(self, rest: bytes) -> None:
        self._error(replies.NOT_IMPLEMENTED)

    def do_HELP(self, rest: bytes) -> None:
        self._send(replies.HELP)

    def do_QUIT(self, rest: bytes) -> None:
        self._send(replies.BYE)
        self.mode = _CLOSING
        self._abort_transaction()
        self.transport.loseConnection()

    _COMMANDS: dict[bytes, Callable[["MailsrvESMTP", bytes], object]] = {
        b"HELO": do_HELO,
        b"EHLO": do_EHLO,
        b"MAIL": do_MAIL,
        b"RCPT": do_RCPT,
        b"DATA": do_DATA,
        b"RSET": do_RSET,
        b"NOOP": do_NOOP,
        b"VRFY": do_VRFY,
        b"EXPN": do_EXPN,
        b"HELP": do_HELP,
        b"QUIT": do_QUIT,
    }


def _reply_for(error: AddressError | SMTPReplyError) -> Reply:
    """The reply a refused MAIL or RCPT gets (address errors carry their own codes)."""
    if isinstance(error, AddressError):
        return Reply(error.code, error.status, error.text)
    return error.reply


def _plain_ip(host: str) -> str:
    """The client address as people write it (an IPv4-mapped IPv6 address as IPv4)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class SMTPServerFactory(protocol.ServerFactory):
    """Builds sessions and enforces the connection limits (in total and per client address)."""

    log = Logger()

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        self.connections = 0
        self.connections_by_ip: dict[str, int] = {}

    def buildProtocol(self, addr) -> MailsrvESMTP:
        limits = self.runtime.config.smtp
        ip = _plain_ip(getattr(addr, "host", ""))
        refusal = None
        if self.connections >= limits.max_connections:
            refusal = replies.TOO_MANY_CONNECTIONS
        elif self.connections_by_ip.get(ip, 0) >= limits.max_connections_per_ip:
            refusal = replies.TOO_MANY_CONNECTIONS_FROM_IP
        else:
            self.connections += 1
            self.connections_by_ip[ip] = self.connections_by_ip.get(ip, 0) + 1
        p = MailsrvESMTP(self.runtime, refusal)
        p.factory = self
        return p

    def connection_closed(self, ip: str, counted: bool) -> None:
        if not counted:
            return
        self.connections -= 1
        remaining = self.connections_by_ip.get(ip, 1) - 1
        if remaining:
            self.connections_by_ip[ip] = remaining
        else:
            self.connections_by_ip.pop(ip, None)
