"""
The SMTP server's Twisted protocol: the session core (``session.SMTPSession``) on a transport.

The core decides every reply; this adapter writes them, keeps the timers (idle, reset by whole
commands only; the DATA deadline), starts TLS, closes, and keeps the flow control: commands
run one at a time, in order (a Deferred reply holds back what was pipelined behind it, as
RFC 2920 needs), none while the client reads no replies, and past MAX_HELD_INPUT of held input
the socket is no longer read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.inbound.chunking import CHUNK
from mailsrv.inbound.framing import Framing
from mailsrv.inbound.session import CLOSING, COMMAND, DATA, SMTPSession, log
from mailsrv.inbound.tls import describe_connection
from mailsrv.replies import Reply, format_reply

if TYPE_CHECKING:
    from mailsrv.inbound.listener import SMTPServerFactory
    from mailsrv.runtime import Runtime

#: Pipelined input held back while a command is in progress before we stop reading the socket.
MAX_HELD_INPUT = 64 * 1024
#: Seconds a connection we closed may take to go away (flushing, TLS close) before it is cut.
CLOSE_GRACE = 5.0


@implementer(IPushProducer, IHalfCloseableProtocol)
class SMTPServerProtocol(protocol.Protocol, TimeoutMixin):
    """One SMTP connection: the session core's replies written, its input read."""

    factory: "SMTPServerFactory"

    def __init__(
        self, runtime: "Runtime", client_ip: str, submission: bool = False,
        implicit_tls: bool = False,
    ) -> None:
        self.runtime = runtime
        self._client_ip = client_ip  # as people write it (listener.plain_ip)
        self.callLater = runtime.reactor.callLater  # the timers on the runtime's clock
        self.timeout = runtime.config.smtp.idle_timeout
        self._submission = submission
        self._implicit_tls = implicit_tls
        self.core: SMTPSession  # from connectionMade on
        self._closing = False
        self._busy = False
        self._reading_paused = False
        self._input_closed = False  # the client closed its side (readConnectionLost)
        self._replies_blocked = False  # the transport's write buffer is full
        self._data_deadline: Any = None
        self._force_close: Any = None

    def connectionMade(self) -> None:
        delivery = self.runtime.new_session(self._client_ip, self._submission)
        self.core = SMTPSession(
            self.runtime, delivery, self._client_ip, self._submission, self._implicit_tls,
            describe_tls=self._describe_tls, on_activity=self.resetTimeout,
        )
        # Told when the client reads no replies (a TLS layer passes its socket's state on).
        self.transport.registerProducer(self, True)
        kind = ("submission" if self._submission else "smtp") + (" tls" * self._implicit_tls)
        log.info("connect client={client} listener={kind}", client=self._client_ip, kind=kind)
        # A client that talks before the banner is held back, like any pipelined input.
        self._hold_until(self.core.greeting())

    def _describe_tls(self) -> str | None:
        """The negotiated TLS version and cipher (a method, not a closure per connection)."""
        get_handle = getattr(self.transport, "getHandle", None)
        return describe_connection(get_handle() if get_handle is not None else None)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        try:
            self.setTimeout(None)
            self._force_close = _cancel(self._force_close)
            self._data_deadline = _cancel(self._data_deadline)
            self._closing = True
            self.core.connection_lost()
            log.info("disconnect client={client}", client=self._client_ip)
        finally:
            # Whatever failed above, the connection no longer counts against the limits
            # (with receiving processes, this is what tells the parent).
            self.factory.connection_closed(self._client_ip)

    def readConnectionLost(self) -> None:
        """The client closed its sending side: Exim does so right after a QUIT it pipelined
        behind ``BDAT <n> LAST``. What it sent is still answered, in order (the end of the
        message once it is stored), then the connection closes. Reported as lost at the FIN,
        the connection closed with no reply written: the message was stored all the same, but
        Exim, without its 250, deferred it and would have sent it again (a duplicate)."""
        self._input_closed = True
        self._process_input()

    def writeConnectionLost(self) -> None:
        """We never close only our side (IHalfCloseableProtocol asks for it)."""

    def timeoutConnection(self) -> None:
        if not self._closing:
            self._answer(self.core.timed_out())

    # -- input ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self._closing:
            self.core.receive(data)
            self._process_input()

    def _process_input(self) -> None:
        core = self.core
        while core.held and not self._busy and not self._closing:
            if self._replies_blocked and core.mode == COMMAND:
                break  # the client reads no replies: its commands wait
            result = core.step()
            if result is Framing.NEED_MORE:
                break  # an unfinished line: wait for more bytes
            if result is not None:  # None: DATA goes on
                self._answer(result)
            elif core.mode == CHUNK and self._data_deadline is None:
                # Each BDAT chunk has smtp.data_timeout to arrive, as DATA has.
                self._data_deadline = self.callLater(
                    self.runtime.config.smtp.data_timeout, self.timeoutConnection)
        if self._input_closed and not self._busy and not self._closing and not (
                self._replies_blocked and core.held):
            # Nothing more will come: what is held is an unfinished line, DATA or chunk.
            self._close(grace=False)
            return
        self._update_reading()

    def _hold_until(self, d: "defer.Deferred[Reply]") -> None:
        """Process no further pipelined input until the reply ``d`` fires with is written."""
        self._busy = True
        self.setTimeout(None)

        def resume(reply: Reply | Failure) -> None:
            self._busy = False
            if isinstance(reply, Failure):
                log.failure("session step failed", reply)
            else:
                self._answer(reply)
            if not self._closing:
                self.setTimeout(self.timeout)
                self._process_input()  # resumes reading unless the replies are still blocked

        d.addBoth(resume)

    # -- output ---------------------------------------------------------------------------

    def _answer(self, result: "Reply | defer.Deferred[Reply]") -> None:
        """A reply of the core written, and what its mode now asks of the connection."""
        core = self.core
        if core.mode == DATA:
            if self._data_deadline is None:
                self._data_deadline = self.callLater(
                    self.runtime.config.smtp.data_timeout, self.timeoutConnection)
        elif self._data_deadline is not None:
            self._data_deadline = _cancel(self._data_deadline)
        if isinstance(result, defer.Deferred):
            return self._hold_until(result)
        self._write(result)
        if core.mode == CLOSING:
            self._close(grace=not core.client_quit)
        elif core.starting_tls:
            core.starting_tls = False
            self.transport.startTLS(self.runtime.tls)
            # Our producer now hangs under the TLS layer, which tells it afresh when its
            # socket's buffer is full: a pause from the plain connection would never be lifted.
            self._replies_blocked = False

    def _write(self, reply: Reply) -> None:
        if not self._closing:  # (a Deferred reply may come after the connection is gone)
            self.transport.write(format_reply(reply) + b"\r\n")

    def _close(self, grace: bool) -> None:
        """Close once the replies are flushed (a registered producer would hold it open)."""
        if self._closing:
            return
        self._closing = True
        self.setTimeout(None)
        self._data_deadline = _cancel(self._data_deadline)
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        if grace:
            # A TLS connection closes cleanly only once its handshake is done: a client that
            # never sends a ClientHello (a slowloris on port 465) would keep its place under
            # the connection limits for ever.  Give it a moment, then cut it.
            self._force_close = self.callLater(CLOSE_GRACE, self.transport.abortConnection)

    # -- flow control: we are the producer the transport pauses when its buffer is full -

    def pauseProducing(self) -> None:
        """The client does not read our replies: no command runs, and past MAX_HELD_INPUT the
        socket is not read. (Until then it is: a TLS transport also says "full" while it holds
        our banner until its handshake is done, which needs reading.)"""
        self._replies_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._replies_blocked = False
        self._process_input()

    def stopProducing(self) -> None:
        pass  # the connection is gone: connectionLost cleans up

    def _update_reading(self) -> None:
        pause = (self._busy or self._replies_blocked) and self.core.held > MAX_HELD_INPUT
        if pause != self._reading_paused and not self._closing:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()


def _cancel(call: Any) -> None:
    """Cancel a DelayedCall unless it has run; None, for the attribute that held it."""
    if call is not None and call.active():
        call.cancel()
