"""
The outbound SMTP session: Twisted's ESMTP client, carrying several messages over one connection.

Twisted's ``ESMTPClient`` does the greeting, EHLO (HELO fallback), STARTTLS and AUTH; this
subclass takes over the mail transactions, because the defaults are not safe enough for a
relay that must never lose or duplicate a message:

- addresses are sent exactly as queued (Twisted runs them through ``email.utils.parseaddr``,
  which can rewrite unusual but valid local parts);
- dot-stuffing is correct across read chunks (Twisted's ``transformChunk`` misses a line that
  starts with "." at the start of a 16 KiB chunk, or on the first line of a message);
- results are recorded per recipient and per message, and a refused ``MAIL``, ``RSET`` or a
  dropped connection ends the session cleanly instead of looping or losing results;
- a greeting that names ourselves is a mail loop and is reported as such, not delivered to;
- a ``454`` to an opportunistic ``STARTTLS`` continues in plain text (as Postfix does);
- before each ``MAIL FROM`` the message is prepared in a worker thread (``prepare``, see
  mailsrv.outbound.outgoing): ``SIZE=`` goes out when the server offers SIZE, and a message over the
  server's announced limit is not sent at all (``552 5.3.4`` for its recipients, as Postfix
  does); an 8-bit message gets ``BODY=8BITMIME``, or a 7-bit copy when the server does not
  offer 8BITMIME (``554 5.6.3`` when it cannot be converted); a message that needs SMTPUTF8
  gets it, or, at a server without it, its recipients are bounced (mailsrv.outbound.utf8);
- the sender's DSN parameters (RFC 3461: ``RET``, ``ENVID`` on MAIL, ``NOTIFY``, ``ORCPT`` on
  RCPT) go out when the server offers DSN; the outcome says whether it did (without it, we
  owe the sender a ``relayed`` report for ``NOTIFY=SUCCESS``);
- a server that offers CHUNKING gets the message as BDAT chunks (RFC 3030; mailsrv.outbound.chunks),
  each sent once the one before was accepted, without dot-stuffing;
- TLS is judged before the first MAIL, and a REQUIRETLS message goes (with ``REQUIRETLS``)
  only over verified TLS to a server offering it, else to the next host (sessiontls);
- a server that offers PIPELINING gets MAIL, the RCPTs and DATA in one write (RFC 2920;
  mailsrv.outbound.pipelining);
- after the reply to a message's data (or to its last BDAT chunk) the next MAIL follows
  without RSET: that reply ended the transaction on both sides (RFC 5321 4.1.1.4). RSET is
  sent only after a transaction that ended before its data.

One :class:`OutboundTransaction` per message; the relayer reads the outcome from it after the
session.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailsrv import replies
from mailsrv.outbound.chunks import CHUNK_SIZE, MessageData, bdat_chunks
from mailsrv.outbound.dotstuff import DotStuffer
from mailsrv.outbound.pipelining import Pipelining
from mailsrv.outbound.session_outcome import SessionOutcome
from mailsrv.outbound.sessiontls import SessionTLS
from mailsrv.outbound.tlsrpt.results import handshake_failure
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.outbound.utf8 import utf8_verdicts
from mailsrv.replies import Reply

__all__ = ["SessionOutcome", "RelayClient", "RelayClientFactory"]

log = Logger(namespace="mailsrv")


class RelayClient(SessionTLS, Pipelining, smtp.ESMTPClient):
    """Sends a list of transactions over one connection, one after the other."""

    def __init__(
        self,
        transactions: list[OutboundTransaction],
        *,
        identity: str,
        own_names: Collection[str],
        outcome: SessionOutcome,
        prepare: Callable[[OutboundTransaction, bool], defer.Deferred],
        tls_context: Any = None,
        require_tls: bool = False,
        auth: tuple[str, str] | None = None,
        timeout: float = 300.0,
        tls_check: Any = None,
    ) -> None:
        secret = auth[1].encode("utf-8") if auth else None
        smtp.ESMTPClient.__init__(self, secret, tls_context, identity)
        self.timeout = timeout
        self.requireTransportSecurity = require_tls
        if auth is not None:
            user = auth[0].encode("utf-8")
            self.requireAuthentication = True
            self.registerAuthenticator(smtp.PLAINAuthenticator(user))
            self.registerAuthenticator(smtp.LOGINAuthenticator(user))
        self.outcome = outcome
        self._own_names = {n.lower().rstrip(".") for n in own_names}
        self._queue: Iterator[OutboundTransaction] = iter(transactions)
        self._remaining = len(transactions)
        self._current: OutboundTransaction | None = None
        self._data: MessageData | None = None
        self._chunks: Iterator[bytes] | None = None  # the BDAT chunks still to send
        self._stuffer = DotStuffer()
        self._transaction_ended = False  # the transaction ended with its data's reply: no RSET
        self._extensions: dict[bytes, Any] = {}
        #: (transaction, 8BITMIME offered) -> Deferred firing with an ``Outgoing`` or a Reply
        self._prepare = prepare
        self._outgoing: Any = None  # the mailsrv.outbound.outgoing.Outgoing being sent
        self._peer = "the server"
        self._lost = False
        self._tls_check, self._tls_judged = tls_check, tls_check is None  # a HostCheck

    # --- greeting, loop check, TLS ------------------------------------------------------

    def connectionMade(self) -> None:
        # Without TCP_NODELAY, Nagle holds each small write that follows an unacknowledged
        # one (the final ".", the next MAIL) until the server's delayed ACK: ~40 ms per
        # message on loopback, which capped a relay session at a few dozen messages a second.
        # Every command waits for its reply anyway, so nothing is gained by coalescing.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass
        smtp.ESMTPClient.connectionMade(self)

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        if not self.outcome.greeted:
            self.outcome.greeted = True
            name = resp.split(None, 1)[0].decode("ascii", "replace").lower() if resp else ""
            self._peer = name or self._peer
            if name.rstrip(".") in self._own_names:
                self.outcome.loop = True
                self.outcome.error = replies.GREETS_AS_OURSELVES.format(name=name)
                self._disconnectFromServer()
                return
        smtp.ESMTPClient.esmtpState_ehlo(self, code, resp)

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        self._extensions = {}
        for line in resp.splitlines()[1:]:
            words = line.split(None, 1)
            if words:
                self._extensions[words[0].upper()] = words[1] if len(words) > 1 else None
        self.outcome.dsn = b"DSN" in self._extensions
        if not self._tlsMode:
            self.outcome.starttls_offered = b"STARTTLS" in self._extensions
        smtp.ESMTPClient.esmtpState_serverConfig(self, code, resp)

    # --- transactions ------------------------------------------------------------------

    def smtpState_from(self, code: int, resp: bytes) -> None:
        self._note_tls()
        if not self._judge_tls():
            return
        self._failresponse = self.smtpTransferFailed
        self._next_transaction()

    def _next_transaction(self) -> None:
        self._current = current = next(self._queue, None)
        if current is None:
            self._disconnectFromServer()
            return
        d = self._prepare(current, b"8BITMIME" in self._extensions)
        d.addErrback(self._prepare_failed, current)
        d.addCallback(self._prepared, current)

    def _prepare_failed(self, failure: Failure, current: OutboundTransaction) -> Reply:
        log.failure("relay id={id}: cannot prepare the message", failure, id=current.queue_id)
        return replies.CANNOT_PREPARE.format(error=failure.getErrorMessage())

    def _size_limit(self) -> int:
        """The server's SIZE (RFC 1870), 0 for none or no limit."""
        words = (self._extensions.get(b"SIZE") or b"").split()
        return int(words[0]) if words and words[0].isdigit() else 0

    def _prepared(self, outgoing: Any, current: OutboundTransaction) -> None:
        if self._lost or current is not self._current:
            if not isinstance(outgoing, Reply):
                outgoing.discard()
            return
        self.resetTimeout()
        limit = self._size_limit()
        if not isinstance(outgoing, Reply) and limit and outgoing.size > limit:
            outgoing.discard()
            outgoing = replies.TOO_BIG_FOR_PEER.format(
                size=str(outgoing.size), limit=str(limit), peer=self._peer)
        utf8 = False
        if not isinstance(outgoing, Reply):
            utf8, decided = utf8_verdicts(
                current.smtputf8, current.sender, current.recipients,
                b"SMTPUTF8" in self._extensions, outgoing.head_utf8, self._peer)
            current.results.update(decided)
            if current.complete:
                outgoing.discard()
                outgoing = next(iter(decided.values()))
        if not isinstance(outgoing, Reply) and self._requiretls_refused(current):
            outgoing.discard()  # not for this host: perhaps the next one
            self._remaining -= 1
            self._next_transaction()
            return
        if isinstance(outgoing, Reply):  # decided here: nothing is sent for this message
            for address in current.recipients:
                current.results.setdefault(address, outgoing)
            self._remaining -= 1
            self._next_transaction()
            return
        self._outgoing = outgoing
        self._from = current.sender
        current.attempted = True
        params = b" SIZE=%d" % outgoing.size if b"SIZE" in self._extensions else b""
        if outgoing.eight_bit:
            params += b" BODY=8BITMIME"
        if utf8:
            params += b" SMTPUTF8"
        if self.outcome.dsn:
            params += current.dsn_mail
        if current.requiretls:
            params += b" REQUIRETLS"
        mail = b"MAIL FROM:<" + current.sender.encode("utf-8") + b">" + params
        if b"PIPELINING" in self._extensions:
            self._send_group(mail)
            return
        self.sendLine(mail)
        self._expected = [250]
        self._okresponse = self.smtpState_to

    def getMailTo(self) -> list[str]:
        assert self._current is not None  # (not those decided before MAIL: SMTPUTF8)
        return [a for a in self._current.recipients if a not in self._current.results]

    def smtpState_toOrData(self, code: int, resp: bytes) -> None:
        assert self._current is not None
        if self.lastAddress is not None:
            self.toAddressesResult.append((self.lastAddress, code, resp))
            if 200 <= code <= 299:
                self.successAddresses.append(self.lastAddress)
            else:
                self._current.results[self.lastAddress] = Reply.from_wire(code, resp)
        try:
            self.lastAddress = next(self.toAddresses)
        except StopIteration:
            self._recipients_answered(code, resp)
        else:
            self.sendLine(self._rcpt_line(self.lastAddress))

    def _rcpt_line(self, address: str) -> bytes:
        assert self._current is not None
        dsn = self._current.dsn_rcpt.get(address, b"") if self.outcome.dsn else b""
        return b"RCPT TO:<" + address.encode("utf-8") + b">" + dsn

    def _recipients_answered(self, code: int, resp: bytes) -> None:
        """Every RCPT answered (*code*, *resp*: the last reply): the data, or the end."""
        if self.successAddresses and b"CHUNKING" in self._extensions:
            self._chunks = bdat_chunks(self.getMailData(), CHUNK_SIZE)
            self._send_chunk(code, resp)
        elif self.successAddresses:
            self.sendLine(b"DATA")
            self._expected = [354]
            self._okresponse = self.smtpState_data
        else:
            self.smtpState_msgSent(code, resp)

    def smtpState_data(self, code: int, resp: bytes) -> None:
        smtp.ESMTPClient.smtpState_data(self, code, resp)  # the data, then the final dot
        self._okresponse = self._failresponse = self._data_answered

    def _data_answered(self, code: int, resp: bytes) -> None:
        """The reply to the end of the data: whatever it says, the transaction is over."""
        self._transaction_ended = True
        self.smtpState_msgSent(code, resp)

    def getMailData(self) -> MessageData:
        assert self._current is not None
        self._stuffer = DotStuffer()
        self._data = MessageData(self._outgoing.prefix, open(self._outgoing.path, "rb"))
        return self._data

    def _send_chunk(self, code: int, resp: bytes) -> None:
        """CHUNKING (RFC 3030): the next BDAT chunk once the last was accepted; after the
        LAST one's reply, the message's verdict. A refused chunk ends the message there
        (``smtpTransferFailed``: no further chunk is sent)."""
        self.resetTimeout()
        assert self._chunks is not None
        chunk = next(self._chunks, None)
        if chunk is None:
            self._chunks = None
            self._data_answered(code, resp)
            return
        self.transport.write(chunk)
        self._expected = smtp.SUCCESS
        self._okresponse = self._send_chunk

    def _release(self) -> None:
        """Close the data being sent and drop its converted copy, if any."""
        self._chunks = None
        if self._data is not None:
            self._data.close()
            self._data = None
        if self._outgoing is not None:
            self._outgoing.discard()
            self._outgoing = None

    def transformChunk(self, chunk: bytes) -> bytes:
        """LF to CRLF and dot-stuffing, correct at chunk boundaries and on the first line."""
        self.resetTimeout()
        return self._stuffer(chunk)

    def smtpState_msgSent(self, code: int, resp: bytes) -> None:
        ended, self._transaction_ended = self._transaction_ended, False
        current, self._current = self._current, None
        self._release()
        if current is not None:
            self._remaining -= 1
            verdict = Reply.from_wire(code, resp)
            for address in current.recipients:
                # Recipients refused at RCPT keep that refusal; the rest share the verdict
                # on the message (the reply to MAIL, to DATA, or to the end of the data).
                current.results.setdefault(address, verdict)
        self._from = None
        self.toAddressesResult = []
        self.successAddresses = []
        if self._remaining <= 0 or (current is not None and code == 421):
            self._disconnectFromServer()
            return
        if ended:
            self.smtpState_from(code, resp)
            return
        self.sendLine(b"RSET")
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_from
        self._failresponse = self._rset_failed

    def _rset_failed(self, code: int, resp: bytes) -> None:
        self.outcome.error = Reply.from_wire(code, resp)
        self._disconnectFromServer()

    # --- errors ------------------------------------------------------------------------

    def sendError(self, exc: Exception) -> None:
        if self.outcome.error is None:
            code = getattr(exc, "code", -1)
            resp = getattr(exc, "resp", b"") or str(exc)
            if isinstance(code, int) and 400 <= code <= 599:
                reply = Reply.from_wire(code, resp)
            else:
                text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)
                reply = replies.SESSION_FAILED.format(reason=text or type(exc).__name__)
            # Session-level trouble (TLS, AUTH, a refusing greeting) is never final: the
            # message waits and is retried, possibly at another host.
            if reply.permanent:
                wrap = replies.SESSION_REFUSED if self.outcome.greeted else replies.SESSION_FAILED
                reply = wrap.format(reason=str(reply))
            self.outcome.error = reply
        smtp.ESMTPClient.sendError(self, exc)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self._release()
        if self._tlsMode and self.outcome.tls is None and self.outcome.tls_failure is None:
            self.outcome.tls_failure = handshake_failure(self.transport, reason)
        if self._current is not None and self.outcome.reason is None:
            self.outcome.reason = f"connection lost during the transaction: {reason.getErrorMessage()}"
        elif self.outcome.error is None and self._remaining > 0 and self.outcome.reason is None:
            self.outcome.reason = f"connection lost: {reason.getErrorMessage()}"
        smtp.ESMTPClient.connectionLost(self, reason)


class RelayClientFactory(protocol.ClientFactory):
    """One connection attempt; ``done`` fires with the outcome when the connection ends.
    ``client`` is the protocol spoken (SMTP here, LMTP in mailsrv.outbound.lmtpclient)."""

    client: Any = RelayClient
    #: No "Starting factory <...RelayClientFactory object at 0x...>" and "Stopping factory"
    #: lines around every outbound connection: the relay's own lines say what happened.
    noisy = False

    def __init__(self, transactions: list[OutboundTransaction], **client_args: Any) -> None:
        self.transactions = transactions
        self.client_args = client_args
        self.outcome = SessionOutcome()
        self.done: defer.Deferred = defer.Deferred()

    def buildProtocol(self, addr: Any) -> Any:
        client = self.client(self.transactions, outcome=self.outcome, **self.client_args)
        client.factory = self
        return client

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.outcome.reason = reason.getErrorMessage()
        self._finish()

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self.done.called:
            self.done.callback(self.outcome)
