"""
The ESMTP server protocol and its factory: parsing, sequencing, limits and replies, nothing else.

``MailsrvESMTP`` subclasses Twisted's ``ESMTP`` but takes over the byte framing, because the
inherited ``LineOnlyReceiver`` framing is unsafe for mail (see docs/design.md):

- a line ends only at CRLF; a bare CR or LF in a command closes the connection (``421``);
- a command line is at most 512 octets; the rest of a longer line is discarded, never executed;
- commands run strictly one at a time, in order: a command whose answer is asynchronous holds
  back the ones pipelined behind it (RFC 2920 needs that, Twisted's base class does not do it);
- DATA is received in raw mode by ``spool.DataScanner`` and streamed to a spool file;
- STARTTLS throws away whatever the client pipelined behind it and starts the session afresh;
  AUTH (PLAIN, LOGIN) is offered only over TLS, and a submission listener requires it.

Policy decisions (who may send what to whom) live in ``delivery.SessionDelivery``, which
implements Twisted's ``IMessageDelivery``; the message body goes to a ``delivery.Transaction``,
which implements ``IMessage``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Callable

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, task
from twisted.logger import Logger
from twisted.mail.smtp import ESMTP
from twisted.python.failure import Failure

from mailsrv import replies, sasl
from mailsrv.address import AddressError, parse_mail_from, parse_rcpt_to
from mailsrv.auth import login_name
from mailsrv.replies import Reply, SMTPReplyError
from mailsrv.spool import DataError, DataScanner
from mailsrv.tls import describe_connection

if TYPE_CHECKING:
    from mailsrv.delivery import Runtime, SessionDelivery, Transaction

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including its CRLF.
MAX_COMMAND_LINE = 512
#: Errors a client may make before it is disconnected (Postfix's smtpd_hard_error_limit).
MAX_ERRORS = 20
#: Pipelined input held back while a command is in progress before we stop reading the socket.
MAX_HELD_INPUT = 64 * 1024
#: Seconds a connection we closed may take to go away (flushing, TLS close) before it is cut.
CLOSE_GRACE = 5.0
#: Seconds the banner may wait for the client's forward-confirmed reverse DNS name.
GREETING_DNS_WAIT = 5.0

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
        "_recipient_count", "_scanner", "_data_deadline", "_force_close", "submission",
        "_tls_active", "_sasl",
    )

    def __init__(
        self,
        runtime: "Runtime",
        refusal: Reply | None = None,
        submission: bool = False,
        implicit_tls: bool = False,
    ) -> None:
        ESMTP.__init__(self)
        self.runtime = runtime
        #: A submission listener: AUTH is required before MAIL.
        self.submission = submission
        #: TLS is (or is being) negotiated on this connection.
        self._tls_active = implicit_tls
        #: An AUTH exchange waiting for the client's next response line.
        self._sasl: sasl.Exchange | None = None
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
        self._force_close = None

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
        self.session = self.runtime.new_session(self._client_ip, self.submission)
        self.log.info(
            "connect client={client} listener={kind}", client=self._client_ip,
            kind=("submission" if self.submission else "smtp")
            + (" tls" if self._tls_active else ""),
        )
        # The banner waits for the client's reverse name (briefly): from then on every log
        # line and the Received: field name the client alike.  A client that talks before
        # the banner has its words held back, like any pipelined input.
        greeted = self.session.reverse_name_known(GREETING_DNS_WAIT)
        greeted.addCallback(lambda _: self._send(
            Reply(220, "", f"{self.runtime.config.hostname} ESMTP mailsrv")
        ))
        if greeted.called:
            self.setTimeout(self.timeout)
        else:
            self._hold_input_until(greeted)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)
        if self._force_close is not None and self._force_close.active():
            self._force_close.cancel()
        self._force_close = None
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
        # A TLS connection closes cleanly only once its handshake is done: a client that
        # never sends a ClientHello (a slowloris on port 465) would keep the socket, and its
        # place under the connection limits, for ever.  Give it a moment, then cut it.
        self._force_close = self.runtime.reactor.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._force_close = None
        self.transport.abortConnection()

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
            if len(self._input) > self._line_limit(self._input):
                self._input = b""
                self._skipping_line = True
                self._sasl = None  # as below: an over-long response ends the exchange
                self._error(replies.LINE_TOO_LONG)
            elif b"\r" in self._input[:-1]:
                self._refuse_bare_line_end()
            return False
        line, self._input = self._input[:newline], self._input[newline + 1 :]
        if not line.endswith(b"\r") or b"\r" in line[:-1]:
            self._refuse_bare_line_end()
        elif len(line) + 1 > self._line_limit(line):
            self._sasl = None  # an over-long response ends the exchange
            self._error(replies.LINE_TOO_LONG)
        else:
            # Only a whole command counts as activity: a trickle of bytes does not.
            self.resetTimeout()
            if self._sasl is not None:
                self._sasl_response(line[:-1])
            else:
                self._dispatch(line[:-1])
        return True

    def _line_limit(self, line: bytes) -> int:
        """512 octets for a command; RFC 4954's 12288 for AUTH and its response lines."""
        if self._sasl is not None or line[:5].upper() == b"AUTH ":
            return sasl.MAX_RESPONSE_LINE
        return MAX_COMMAND_LINE

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
        self._note_tls()
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
        """The extensions we implement, and only those (STARTTLS and AUTH where they apply)."""
        lines = [
            "PIPELINING",
            f"SIZE {self.runtime.config.smtp.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self.runtime.tls is not None and not self._tls_active:
            lines.append("STARTTLS")
        if self._auth_offered and self._tls_active:
            lines.append("AUTH " + " ".join(sasl.MECHANISMS))
        return lines

    @property
    def _auth_offered(self) -> bool:
        return self.submission or self.runtime.config.smtp.auth

    # -- TLS ------------------------------------------------------------------------------

    def do_STARTTLS(self, rest: bytes) -> None:
        if self.runtime.tls is None:
            self._error(replies.TLS_NOT_AVAILABLE)
            return
        if rest:
            self._error(replies.NO_ARGUMENTS_ALLOWED, verb="STARTTLS")
            return
        if self._tls_active:
            self._error(replies.TLS_ALREADY_ACTIVE)
            return
        if self._helo_name is None:
            self._error(replies.NEED_HELO)
            return
        self._send(replies.READY_FOR_TLS)
        # RFC 3207 §4.2: everything the client said before TLS is forgotten.  Above all,
        # what it pipelined behind STARTTLS in plain text is thrown away, never executed
        # inside the TLS session (CVE-2011-0411), and a new EHLO is required.
        self._input = b""
        self._skipping_line = False
        self._reset_transaction()
        self._helo_name = None
        self._esmtp = False
        self._tls_active = True
        self.transport.startTLS(self.runtime.tls)
        self.log.info("starttls client={client}", client=self._client_ip)

    def _note_tls(self) -> None:
        """Record the negotiated version and cipher (known once the handshake is done)."""
        assert self.session is not None
        if self._tls_active and self.session.tls is None:
            handle = getattr(self.transport, "getHandle", lambda: None)()
            self.session.tls = describe_connection(handle)
            if self.session.tls:
                self.log.info(
                    "tls client={client} tls=\"{tls}\"", client=self._client_ip,
                    tls=self.session.tls,
                )

    # -- AUTH -----------------------------------------------------------------------------

    def do_AUTH(self, rest: bytes) -> None:
        assert self.session is not None
        if not self._auth_offered:
            self._error(replies.AUTH_NOT_ENABLED)
            return
        if self._helo_name is None or not self._esmtp:
            self._error(replies.AUTH_NEEDS_EHLO)
            return
        if not self._tls_active:
            self._error(replies.AUTH_NEEDS_TLS)
            return
        if self.session.authenticated_as is not None:
            self._error(replies.AUTH_ALREADY_DONE)
            return
        if self._transaction is not None:
            self._error(replies.AUTH_IN_TRANSACTION)
            return
        failures = self.runtime.auth_failures
        if failures is not None and failures.locked(self._client_ip):
            self.log.info(
                "auth refused client={client}: locked out after too many failures",
                client=self.session.client,
            )
            self._error(replies.AUTH_LOCKED_OUT)
            return
        words = rest.split()
        if not words or len(words) > 2:
            self._error(replies.AUTH_SYNTAX)
            return
        mechanism = words[0].upper().decode("ascii")
        if mechanism not in sasl.MECHANISMS:
            self._error(replies.AUTH_MECHANISM_UNKNOWN)
            return
        self._sasl = sasl.Exchange(mechanism)
        if len(words) == 2:
            self._sasl_response(words[1])  # the initial response (RFC 4954 §4)
        else:
            self._send(replies.AUTH_CHALLENGE, challenge=self._sasl.first_challenge())

    def _sasl_response(self, line: bytes) -> None:
        """One response of the exchange in progress: the next challenge, or the check."""
        exchange = self._sasl
        assert exchange is not None
        try:
            challenge = exchange.step(sasl.decode_response(line.strip()))
        except sasl.SASLCancelled:
            self._sasl = None
            self._error(replies.AUTH_CANCELLED)
            return
        except sasl.SASLError as e:
            self._sasl = None
            self.log.info(
                "auth malformed client={client} mechanism={mechanism}: {why}",
                client=self.session.client if self.session else self._client_ip,
                mechanism=exchange.mechanism, why=str(e),
            )
            self._error(replies.AUTH_BAD_RESPONSE)
            return
        if challenge is not None:
            self._send(replies.AUTH_CHALLENGE, challenge=challenge)
            return
        self._sasl = None
        self._hold_input_until(self._check_credentials(exchange))

    def _check_credentials(self, exchange: sasl.Exchange) -> defer.Deferred:
        """Verify in the thread pool; answer 235, or 535 after the growing delay."""
        assert exchange.username is not None and exchange.password is not None
        assert self.session is not None
        session, runtime = self.session, self.runtime
        address = login_name(exchange.username)
        # Only a known account name is logged: a mistyped password in the user field is not.
        shown = address if address in runtime.passwords else "unknown"
        tracker = runtime.auth_failures
        # The check counts as a failure until it succeeds: parallel connections from one
        # address get no more than max_failures checks between them.
        if tracker is not None and not tracker.begin(self._client_ip):
            self.log.info(
                "auth refused client={client}: too many failures (failed or being checked)",
                client=session.client,
            )
            self._error(replies.AUTH_LOCKED_OUT)
            return defer.succeed(None)
        credentials = UsernamePassword(exchange.username.encode(), exchange.password.encode())
        # maybeDeferred: whatever happens, the reservation ends in one of the callbacks.
        d = defer.maybeDeferred(runtime.checker.requestAvatarId, credentials)

        def succeeded(avatar: str) -> None:
            if tracker is not None:
                tracker.succeeded(self._client_ip)
            session.authenticated_as = avatar
            self.log.info(
                "auth ok client={client} user={user} mechanism={mechanism}",
                client=session.client, user=avatar, mechanism=exchange.mechanism,
            )
            self._send(replies.AUTH_OK)

        def failed(failure: Failure) -> defer.Deferred | None:
            if not failure.check(UnauthorizedLogin):
                if tracker is not None:
                    tracker.abandoned(self._client_ip)
                self.log.failure("password check failed", failure)
                self._send(replies.AUTH_TEMPORARY)
                return None
            count = tracker.failed(self._client_ip) if tracker is not None else 1
            # fail2ban: failregex = auth failed client=\S*\[<HOST>\]
            self.log.info(
                "auth failed client={client} user={user} mechanism={mechanism} "
                "failures={count}",
                client=session.client, user=shown, mechanism=exchange.mechanism, count=count,
            )
            if tracker is not None and tracker.locked(self._client_ip):
                self.log.info(
                    "auth lockout client={client} seconds={seconds:g}",
                    client=session.client, seconds=tracker.lockout,
                )
            delay = tracker.delay(count) if tracker is not None else 0.0
            return task.deferLater(runtime.reactor, delay, self._error, replies.AUTH_FAILED)

        d.addCallbacks(succeeded, failed)
        return d

    def do_MAIL(self, rest: bytes) -> None:
        if self._helo_name is None:
            self._error(replies.NEED_HELO)
            return
        assert self.session is not None
        if self.submission and self.session.authenticated_as is None:
            self._error(replies.AUTH_REQUIRED)
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
        b"STARTTLS": do_STARTTLS,
        b"AUTH": do_AUTH,
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


class ConnectionCounter:
    """The connection limits (in total and per client address), shared by all listeners."""

    def __init__(self, max_connections: int, max_per_ip: int) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.connections = 0
        self.connections_by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> Reply | None:
        """Count one more connection from ``ip``; the refusal to give instead, if over a limit."""
        if self.connections >= self.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if self.connections_by_ip.get(ip, 0) >= self.max_per_ip:
            return replies.TOO_MANY_CONNECTIONS_FROM_IP
        self.connections += 1
        self.connections_by_ip[ip] = self.connections_by_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.connections -= 1
        remaining = self.connections_by_ip.get(ip, 1) - 1
        if remaining:
            self.connections_by_ip[ip] = remaining
        else:
            self.connections_by_ip.pop(ip, None)


class SMTPServerFactory(protocol.ServerFactory):
    """Builds the sessions of one kind of listener (port 25 or submission, plain or TLS)."""

    log = Logger()

    def __init__(
        self,
        runtime: "Runtime",
        counter: ConnectionCounter,
        submission: bool = False,
        implicit_tls: bool = False,
    ) -> None:
        self.runtime = runtime
        self.counter = counter
        self.submission = submission
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr) -> MailsrvESMTP:
        ip = _plain_ip(getattr(addr, "host", ""))
        refusal = self.counter.admit(ip)
        p = MailsrvESMTP(self.runtime, refusal, self.submission, self.implicit_tls)
        p.factory = self
        return p

    def connection_closed(self, ip: str, counted: bool) -> None:
        if counted:
            self.counter.release(ip)
