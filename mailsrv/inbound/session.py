"""
The SMTP session core: the state machine of one server session, without I/O.

Bytes go in (``receive``); ``step`` takes one command line (or all DATA held) and returns
its reply: a ``Reply``, a Deferred of one (the end of DATA waits for fsync, AUTH for bcrypt,
the banner for the reverse name), ``None`` while DATA or a BDAT chunk goes on, or
``Framing.NEED_MORE``. Each handler (``do_MAIL`` ...) takes the command's argument and returns
its reply the same way. STARTTLS and AUTH (tlsauth.py), DATA (dataphase.py) and BDAT
(chunking.py) are parts of this class kept in modules of their own.
Besides the reply, ``mode`` is ``CLOSING`` once the session is over (the reply is the last)
and ``starting_tls`` says STARTTLS was accepted. The Twisted protocol in ``smtp.py`` does the
rest (writing, timers, flow control, TLS): every rule here is tested with no socket.

The session state lives here once: the transaction (its recipients are what
``max_recipients`` counts), the greeting, the error and junk counts, the AUTH exchange. What
``session_intake.SessionDelivery`` knows of the client (reverse name, TLS, user) is read from it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Union

from twisted.internet import defer
from twisted.logger import Logger

from mailsrv import replies
from mailsrv.inbound import sasl
from mailsrv.inbound.chunking import CHUNK, Chunking, ChunkState
from mailsrv.inbound.dataphase import COMMAND, DATA, MessageData
from mailsrv.inbound.datascan import DataScanner
from mailsrv.inbound.framing import CommandFramer, Framing
from mailsrv.inbound.parameters import parse_mail, parse_rcpt
from mailsrv.inbound.tlsauth import TLSAndAuth
from mailsrv.replies import Refusal, Reply

if TYPE_CHECKING:
    from mailsrv.inbound.message_intake import Transaction
    from mailsrv.inbound.session_intake import SessionDelivery
    from mailsrv.runtime import Runtime

#: What a handler returns: the reply, one to come, or nothing to say (yet).
Result = Union[Reply, "defer.Deferred[Reply]", None]

#: Errors a client may make before it is disconnected (Postfix's smtpd_hard_error_limit).
MAX_ERRORS = 20
#: RCPTs past max_recipients answered 452 before each further one counts as an error
#: (Postfix's smtpd_recipient_overshoot_limit): a pipelining client that sends too many
#: gets its transaction through with the first max_recipients.
RECIPIENT_OVERSHOOT_LIMIT = 1000
#: Seconds the banner may wait for the client's forward-confirmed reverse DNS name.
GREETING_DNS_WAIT = 5.0

CLOSING = "CLOSING"  # the session's last mode (COMMAND, DATA: dataphase.py; CHUNK: chunking.py)

# A HELO/EHLO argument: a domain name or an address literal; anything else cannot be a host name
# and might smuggle text into our Received: header.
_HELO_ARGUMENT = re.compile(rb"^(\[[A-Za-z0-9.:]+\]|[A-Za-z0-9._-]+)$")
_PRINTABLE_COMMAND = re.compile(rb"^[\x20-\x7e\t]*$|^(?i:MAIL|RCPT) [\x20-\x7e\x80-\xff]*$")


# The namespace these log lines have always had (the protocol was smtp.MailsrvESMTP).
log = Logger(namespace="mailsrv.smtp.MailsrvESMTP")


class SMTPSession(TLSAndAuth, MessageData, Chunking):
    """The state machine of one SMTP session (see the module's docstring)."""

    # Thousands of idle sessions must stay cheap (issue 6): slots, no instance dict.
    __slots__ = (
        "runtime", "delivery", "client_ip", "submission", "tls_active", "mode",
        "starting_tls", "client_quit", "errors", "junk_commands", "_framer", "_describe_tls",
        "_on_activity", "_helo_name", "_esmtp", "_transaction", "_overshoot", "_scanner",
        "_sasl", "_chunks", "_bdat_failed",
    )

    def __init__(
        self, runtime: "Runtime", delivery: "SessionDelivery", client_ip: str,
        submission: bool = False, tls_active: bool = False,
        describe_tls: Callable[[], str | None] = lambda: None,
        on_activity: Callable[[], None] = lambda: None,
    ) -> None:
        self.runtime = runtime
        #: The policy and the facts about the client (reverse name, TLS, user).
        self.delivery = delivery
        self.client_ip = client_ip
        #: A submission listener: AUTH is required before MAIL.
        self.submission = submission
        #: TLS is (or is being) negotiated on this connection.
        self.tls_active = tls_active
        self.mode = COMMAND
        #: STARTTLS was accepted: the connection starts TLS once its reply is written.
        self.starting_tls = False
        #: The session ended with QUIT (the connection closes without a grace timer).
        self.client_quit = False
        self.errors = 0
        self.junk_commands = 0  # NOOP, RSET, VRFY, HELP, HELO, EHLO since the last message
        self._framer = CommandFramer()
        #: The negotiated TLS version and cipher, from the connection (None before).
        self._describe_tls = describe_tls
        #: Called for each whole command and each chunk of DATA (the idle timer's reset).
        self._on_activity = on_activity
        self._helo_name: str | None = None
        self._esmtp = False
        self._transaction: "Transaction | None" = None
        self._overshoot = 0  # RCPTs of this transaction past max_recipients
        self._scanner: DataScanner | None = None
        #: An AUTH exchange waiting for the client's next response line.
        self._sasl: sasl.Exchange | None = None
        #: BDAT (mailsrv.inbound.chunking): the transaction's chunks; an earlier one failed.
        self._chunks: ChunkState | None = None
        self._bdat_failed = False

    # -- what the connection calls --------------------------------------------------------

    def greeting(self) -> "defer.Deferred[Reply]":
        """The banner, once the client's reverse name is known (or after a short wait), so
        that every log line and the Received: field name the client alike.

        A client that talked before it (an SMTP client must wait for it, RFC 5321 §3.1; spam
        software often does not) is refused instead, as Postfix's postscreen pregreet test
        does. (Trusted networks and loopback are not looked up: their banner comes at once.)"""
        banner = replies.BANNER.format(hostname=self.runtime.config.hostname)

        def greet(_: object) -> Reply:
            if not self.held:
                return banner
            log.info('refused client={client} check={check} reason="talked before the greeting: '
                     '{n} octets"', client=self.delivery.client, check="early_talker", n=self.held)
            self.runtime.metrics.connection_refused("early_talker")
            return self._close_with(replies.EARLY_TALKER)

        return self.delivery.client_known(GREETING_DNS_WAIT).addCallback(greet)

    def receive(self, data: bytes) -> None:
        """Bytes from the client, held until ``step`` takes them."""
        if self.mode != CLOSING:
            self._framer.buffer += data

    @property
    def held(self) -> int:
        """Octets received and not yet taken (what flow control bounds)."""
        return len(self._framer.buffer)

    def step(self) -> Result | Framing:
        """Take one command (or all DATA held) and answer it; NEED_MORE: no whole line."""
        if self.mode == DATA:
            return self._feed_data()
        if self.mode == CHUNK:
            return self.feed_chunk()
        if self.mode == CLOSING:
            return Framing.NEED_MORE
        line = self._framer.next_line(self._sasl is not None)
        if isinstance(line, bytes):
            # Only a whole command counts as activity: a trickle of bytes does not.
            self._on_activity()
            if self._sasl is not None:
                return self._sasl_response(line)
            return self.execute(line)
        if line is Framing.TOO_LONG:
            self._sasl = None  # an over-long response ends the exchange
            return self._error(replies.LINE_TOO_LONG)
        if line is Framing.BARE_LINE_END:
            log.info("bare CR/LF in command client={client}", client=self.client_ip)
            return self._close_with(replies.BARE_LINE_END_COMMAND)
        return None if line is Framing.SKIPPED else line

    def execute(self, line: bytes) -> Result:
        """One command line (without its CRLF): its handler's reply."""
        if not _PRINTABLE_COMMAND.match(line):
            return self._error(replies.BAD_CHARACTERS)
        words = line.split(None, 1)
        handler = self._COMMANDS.get(words[0].upper()) if words else None
        if handler is None:
            return self._error(replies.COMMAND_UNRECOGNIZED)
        return handler(self, words[1].strip() if len(words) > 1 else b"")

    def timed_out(self) -> Reply:
        """The idle timer or the DATA deadline ran out: the last reply."""
        log.info("timeout client={client} state={state}", client=self.client_ip, state=self.mode)
        return self._close_with(replies.TIMEOUT)

    def connection_lost(self) -> None:
        """The connection is gone: nothing of an unfinished message is kept."""
        self._abort_transaction()
        self.delivery.close()
        self.mode = CLOSING

    # -- errors ---------------------------------------------------------------------------

    def _close_with(self, reply: Reply) -> Reply:
        self.mode = CLOSING
        self._abort_transaction()
        return reply

    def _error(self, reply: Reply) -> Reply:
        """A client error: its reply, or the 421 that drops a client making only errors."""
        return reply if self._count_error() else replies.TOO_MANY_ERRORS

    def _count_error(self) -> bool:
        """One more error; False when that was one too many and the session is closing."""
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            log.info("too many errors client={client}", client=self.client_ip)
            self._close_with(replies.TOO_MANY_ERRORS)
            return False
        return True

    def _junk(self) -> Reply | None:
        """A command that moves no mail on (NOOP, RSET, VRFY, HELP, HELO, EHLO): past
        smtp.junk_command_limit of them each counts as an error too (Postfix's
        smtpd_junk_command_limit), so that no client can talk for ever without sending mail.
        The closing reply when that was one error too many, else None."""
        self.junk_commands += 1
        if self.junk_commands > self.runtime.config.smtp.junk_command_limit:
            return None if self._count_error() else replies.TOO_MANY_ERRORS
        return None

    def _abort_transaction(self) -> None:
        self._chunks = None
        if self._transaction is not None:
            self._transaction.connectionLost()
            self._transaction = None

    # -- greeting -------------------------------------------------------------------------

    def do_HELO(self, rest: bytes, verb: str = "HELO") -> Reply:
        refused = self._junk()
        if refused is not None:
            return refused
        if not rest:
            return self._error(replies.HELO_NEEDS_DOMAIN.format(verb=verb))
        argument = rest.split()[0]
        if len(argument) > 255 or not _HELO_ARGUMENT.match(argument):
            return self._error(replies.HELO_BAD_DOMAIN.format(verb=verb))
        self._abort_transaction()
        self.reset_chunks()
        self._note_tls()
        self._helo_name = argument.decode("ascii")
        self._esmtp = verb == "EHLO"
        self.delivery.greeted(self._helo_name, self._esmtp)
        hello = replies.HELLO.format(
            hostname=self.runtime.config.hostname, helo=self._helo_name, ip=self.client_ip
        )
        if self._esmtp:
            hello = hello._replace(text="\n".join([hello.text, *self._extension_lines()]))
        return hello

    def do_EHLO(self, rest: bytes) -> Reply:
        return self.do_HELO(rest, verb="EHLO")

    def _extension_lines(self) -> list[str]:
        """The extensions we implement, and only those (STARTTLS and AUTH where they apply)."""
        lines = ["PIPELINING", f"SIZE {self.runtime.config.smtp.max_message_size}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "CHUNKING", "BINARYMIME"]
        if self.runtime.tls is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self._auth_offered and self.tls_active:
            lines.append("AUTH " + " ".join(sasl.MECHANISMS))
        if self.tls_active:
            lines.append("REQUIRETLS")  # RFC 8689: over TLS only
        return lines

    # -- the mail transaction -------------------------------------------------------------

    def do_MAIL(self, rest: bytes) -> Reply:
        if self._helo_name is None:
            return self._error(replies.NEED_HELO)
        if self.submission and self.delivery.authenticated_as is None:
            return self._error(replies.AUTH_REQUIRED)
        if self._transaction is not None:
            return self._error(replies.NESTED_MAIL)
        helo = (self._helo_name.encode("ascii"), self.client_ip.encode("ascii"))
        try:
            mail = parse_mail(
                rest, self._esmtp, self.runtime.config.smtp.max_message_size, self.tls_active)
            self._transaction = transaction = self.delivery.validateFrom(helo, mail.sender)
            transaction.dsn, transaction.smtputf8 = mail.dsn, mail.smtputf8  # RFC 3461, 6531
            transaction.requiretls, transaction.binary = mail.requiretls, mail.binary  # 8689, 3030
        except Refusal as e:
            return self._error(e.reply)
        self._overshoot = 0
        self.reset_chunks()
        checked = self.delivery.sender_checked()  # (RCPT, pipelined or not, waits for it)
        return replies.SENDER_OK if checked is None else checked.addCallback(
            lambda _: replies.SENDER_OK)

    def do_RCPT(self, rest: bytes) -> Reply:
        transaction = self._transaction
        if transaction is None:
            return self._error(replies.NEED_MAIL)
        if len(transaction.recipients) >= self.runtime.config.smtp.max_recipients:
            # Not a client error (RFC 5321 §4.5.3.1.8): the client sends the rest later.
            self._overshoot += 1
            if self._overshoot <= RECIPIENT_OVERSHOOT_LIMIT or self._count_error():
                return replies.TOO_MANY_RECIPIENTS
            return replies.TOO_MANY_ERRORS
        try:
            recipient, dsn = parse_rcpt(rest, transaction.smtputf8, self._esmtp)
            self.delivery.validateTo(recipient)
            transaction.recipient_dsn.setdefault(recipient, dsn)  # (the first RCPT stands)
        except Refusal as e:
            return self._error(e.reply)
        probe = getattr(self.delivery, "probe_recipient", None)  # LMTP: a full mailbox?
        asked = probe(recipient) if probe is not None else None
        if asked is None:
            return replies.RECIPIENT_OK
        return asked.addCallback(
            lambda refusal: replies.RECIPIENT_OK if refusal is None else self._error(refusal))

    # -- the rest -------------------------------------------------------------------------

    def do_RSET(self, rest: bytes) -> Reply:
        refused = self._junk()
        if refused is not None:
            return refused
        self._abort_transaction()
        self.reset_chunks()
        return replies.OK

    def do_NOOP(self, rest: bytes) -> Reply:
        return self._junk() or replies.OK

    def do_VRFY(self, rest: bytes) -> Reply:
        refused = self._junk()
        if refused is not None:
            return refused
        # Answering truthfully would let anyone harvest our users.
        if not rest:
            return self._error(replies.VRFY_SYNTAX)
        return replies.CANNOT_VRFY

    def do_EXPN(self, rest: bytes) -> Reply:
        return self._error(replies.NOT_IMPLEMENTED)

    def do_HELP(self, rest: bytes) -> Reply:
        return self._junk() or replies.HELP

    def do_QUIT(self, rest: bytes) -> Reply:
        self.client_quit = True
        return self._close_with(replies.BYE)

    _COMMANDS: dict[bytes, Callable[["SMTPSession", bytes], Result]] = {
        b"HELO": do_HELO,
        b"EHLO": do_EHLO,
        b"STARTTLS": TLSAndAuth.do_STARTTLS,
        b"AUTH": TLSAndAuth.do_AUTH,
        b"MAIL": do_MAIL,
        b"RCPT": do_RCPT,
        b"DATA": MessageData.do_DATA,
        b"BDAT": Chunking.do_BDAT,
        b"RSET": do_RSET,
        b"NOOP": do_NOOP,
        b"VRFY": do_VRFY,
        b"EXPN": do_EXPN,
        b"HELP": do_HELP,
        b"QUIT": do_QUIT,
    }
