"""A RelayClient (mailsrv.outbound.smtpclient) talking to a scripted server through a
StringTransport: the test plays the server's replies and reads what the client wrote."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from mailsrv.outbound import outgoing
from mailsrv.outbound.smtpclient import RelayClient, SessionOutcome
from mailsrv.outbound.transaction import OutboundTransaction


class Session:
    """Greeted, with ``extensions`` (str or bytes) in the EHLO reply; ``clear``: forget what
    the client wrote until then (EHLO, and the first MAIL or group)."""

    def __init__(self, transactions: list[OutboundTransaction], extensions: list, workdir: Path,
                 prepare=None, clear: bool = False) -> None:
        self.outcome = SessionOutcome()
        self.client = RelayClient(
            transactions, identity="mx.example.org", own_names=(), outcome=self.outcome,
            prepare=prepare or (lambda t, ok: defer.succeed(outgoing.prepare(t, ok, workdir))),
        )
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.server(b"220 peer.test ESMTP")
        ehlo = [b"peer.test"] + [e.encode() if isinstance(e, str) else e for e in extensions]
        self.server(b"\r\n".join(
            (b"250 " if i == len(ehlo) - 1 else b"250-") + line for i, line in enumerate(ehlo)))
        if clear:
            self.sent()

    def server(self, reply: bytes) -> None:
        self.client.dataReceived(reply + b"\r\n")

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def data(self) -> bytes:
        """What the client writes once its DATA got 354: the message and the final dot."""
        while self.transport.producer is not None:  # FileSender is a pull producer
            self.transport.producer.resumeProducing()
        return self.sent()

    def deliver(self) -> bytes:
        """MAIL, RCPT and DATA accepted; the message as sent (without the final dot)."""
        for reply in (b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 go ahead"):
            self.server(reply)
        self.sent()
        data = self.data()
        assert data.endswith(b"\r\n.\r\n")
        self.server(b"250 2.0.0 Ok: queued")
        return data[: -len(b".\r\n")]
