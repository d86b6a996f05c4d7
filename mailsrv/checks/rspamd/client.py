"""
The HTTP client that asks rspamd about a message, for a delivery thread.

The header and message stages run in a delivery thread, which may wait; the HTTP exchange is
Twisted's (``twisted.web.client.Agent``) and lives on the reactor, as ThreadDNS's lookups do.
:meth:`RspamdClient.scan` hands the request to the reactor with ``blockingCallFromThread`` and
waits; a timer there cancels the whole exchange (connect, send, answer) after ``timeout``
seconds, so an rspamd that is down costs a refused connection and one that hangs costs
``timeout``, never a stuck thread.  Either way the answer is a :class:`ScanFailure`, which
``[rspamd] on_failure`` turns into an accepted or a deferred message.

The body is streamed from the spool file (``FileBodyProducer``, 64 KiB reads by the
reactor's cooperator, from a file just written and so in the page cache): a 25 MiB message
is never held in memory.  One connection per message (no keep-alive): on loopback a connect
costs less than recovering from a connection rspamd closed while it was idle.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread
from twisted.python import threadable
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mailsrv.checks.rspamd.protocol import ProtocolError, Scan, ScanFailure, parse_reply

__all__ = ["RspamdClient"]

#: Longest reply read (a /checkv2 answer with every symbol is a few KiB).
MAX_REPLY = 1024 * 1024


class _Joined(io.RawIOBase):
    """``prefix`` followed by the open file ``body``, as one file (for FileBodyProducer,
    which reads, and seeks to learn the length)."""

    def __init__(self, prefix: bytes, body: BinaryIO) -> None:
        self.prefix = prefix
        self.body = body
        self.size = len(prefix) + body.seek(0, io.SEEK_END)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.size
        data = b""
        if self.position < len(self.prefix):
            data = self.prefix[self.position:self.position + size]
        if len(data) < size:
            self.body.seek(self.position + len(data) - len(self.prefix))
            data += self.body.read(size - len(data))
        self.position += len(data)
        return data


class RspamdClient:
    """``POST <url>/checkv2`` through ``reactor``, each scan bounded by ``timeout`` seconds."""

    def __init__(self, url: str, reactor: Any, timeout: float = 20.0) -> None:
        self.url = (url.rstrip("/") + "/checkv2").encode("ascii")
        self.reactor = reactor
        self.timeout = timeout
        self.agent = Agent(reactor, connectTimeout=timeout)

    # -- in a delivery thread --------------------------------------------------------------

    def scan(self, headers: dict[bytes, list[bytes]], prefix: bytes, body_path: Path
             ) -> Scan | ScanFailure:
        """rspamd's verdict on ``prefix`` followed by the file ``body_path``, or why there
        is none.  Blocks at most about ``timeout`` seconds; never on the reactor thread."""
        if threadable.isInIOThread():
            raise RuntimeError("RspamdClient.scan would block the reactor thread")
        with open(body_path, "rb") as body:
            return blockingCallFromThread(self.reactor, self.request, headers, prefix, body)

    # -- on the reactor --------------------------------------------------------------------

    def request(self, headers: dict[bytes, list[bytes]], prefix: bytes, body: BinaryIO
                ) -> defer.Deferred:
        """A Deferred firing with a Scan or a ScanFailure (never failing), within
        ``timeout`` seconds."""
        producer = FileBodyProducer(_Joined(prefix, body))
        exchange = self.agent.request(b"POST", self.url, Headers(headers), producer)
        exchange.addCallback(self._read)
        result: defer.Deferred = defer.Deferred()
        late: list[bool] = []

        def too_late() -> None:
            late.append(True)
            exchange.cancel()

        timer = self.reactor.callLater(self.timeout, too_late)

        def done(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            _stop(producer)  # before the thread closes the spool file under it
            if isinstance(outcome, (Scan, ScanFailure)):
                result.callback(outcome)
            elif late:  # the cancellation comes back wrapped, ResponseNeverReceived & co
                result.callback(ScanFailure(f"no answer within {self.timeout:g} s"))
            else:
                result.callback(ScanFailure(_why(outcome)))

        exchange.addBoth(done)
        return result

    def _read(self, response: Any) -> defer.Deferred:
        length = response.length
        if isinstance(length, int) and length > MAX_REPLY:
            response.deliverBody(_Discard())
            return defer.succeed(ScanFailure(f"a reply of {length} octets"))
        reading = readBody(response)

        def parsed(body: bytes) -> Scan | ScanFailure:
            if response.code != 200:
                text = " ".join(body[:200].decode("utf-8", "replace").split())
                return ScanFailure(f"HTTP {response.code} {text}".rstrip())
            try:
                return parse_reply(body)
            except ProtocolError as e:
                return ScanFailure(f"unreadable reply: {e}")

        return reading.addCallback(parsed)


class _Discard:
    """A body consumer that drops what it gets (a reply too long to read)."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def _stop(producer: FileBodyProducer) -> None:
    """Stop reading the body (when the exchange ended early the connection may only be
    closed at the next turn of the reactor, and the producer with it)."""
    try:
        producer.stopProducing()
    except AttributeError:  # never started: the connection was not made
        pass


def _why(failure: Any) -> str:
    """A failure in one line: the connection refused, reset, the reply cut."""
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseFailed & co wrap their causes
    if reasons:
        value = reasons[0].value
    text = str(value) or type(value).__name__
    return " ".join(f"{type(value).__name__}: {text}".split())[:300]
