"""The LMTP client over a StringTransport: LHLO, one reply per accepted recipient after the
data (RFC 2033), refusals at RCPT kept, several messages per connection, dot-stuffing across
chunks, and a connection that breaks off."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailsrv.outbound.dotstuff import DotStuffer
from mailsrv.outbound.lmtpclient import LMTPClient, LMTPClientFactory
from mailsrv.outbound.smtpclient import SessionOutcome
from mailsrv.outbound.transaction import OutboundTransaction


def transaction(tmp_path: Path, queue_id: str, recipients: list[str],
                body: bytes = b"Subject: t\n\nbody\n") -> OutboundTransaction:
    path = tmp_path / f"{queue_id}.body"
    path.write_bytes(body)
    return OutboundTransaction(queue_id=queue_id, sender="s@client.test", recipients=recipients,
                               prefix=b"Received: by mx (mailsrv)\n", body_path=path)


def pump(transport: StringTransport) -> None:
    """Let FileSender (a pull producer) send the whole message, as the reactor would."""
    while transport.producer is not None:
        transport.producer.resumeProducing()


class Peer:
    """The server's side: the client's lines, and replies fed to it."""

    def __init__(self, transactions: list[OutboundTransaction]) -> None:
        self.outcome = SessionOutcome()
        self.client = LMTPClient(transactions, identity="mx.example.org", outcome=self.outcome)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def says(self, *lines: str) -> list[bytes]:
        """Feed reply lines; return what the client sent in answer."""
        self.transport.clear()
        for line in lines:
            self.client.dataReceived(line.encode() + b"\r\n")
            pump(self.transport)
        return self.transport.value().split(b"\r\n")[:-1]


def test_a_message_for_three_with_one_reply_each(tmp_path: Path) -> None:
    t = transaction(tmp_path, "Q1", ["a@x", "b@x", "c@x"], b".starts with a dot\nbody\n")
    peer = Peer([t])
    assert peer.says("220 vm Dovecot ready.") == [b"LHLO mx.example.org"]
    assert peer.says("250-vm", "250-8BITMIME", "250 PIPELINING") == [b"MAIL FROM:<s@client.test>"]
    assert t.attempted
    assert peer.says("250 2.1.0 Sender OK") == [b"RCPT TO:<a@x>"]
    assert peer.says("250 2.1.5 OK") == [b"RCPT TO:<b@x>"]
    assert peer.says("550 5.1.1 <b@x> User doesn't exist") == [b"RCPT TO:<c@x>"]
    assert peer.says("250 2.1.5 OK") == [b"DATA"]
    sent = peer.says("354 OK")
    assert sent == [b"Received: by mx (mailsrv)", b"..starts with a dot", b"body", b"."]
    # One reply per accepted recipient, in RCPT order: a@x, then c@x.
    assert peer.says("250 2.0.0 <a@x> Saved") == []
    assert peer.says("452 4.2.2 <c@x> Quota exceeded, try later") == [b"RSET"]
    assert [(a, r.code) for a, r in t.results.items()] == [("b@x", 550), ("a@x", 250),
                                                           ("c@x", 452)]
    assert t.complete
    assert peer.says("250 2.0.0 OK") == [b"QUIT"]


def test_several_messages_and_a_refused_mail_from(tmp_path: Path) -> None:
    first, second = transaction(tmp_path, "Q1", ["a@x"]), transaction(tmp_path, "Q2", ["b@x"])
    peer = Peer([first, second])
    peer.says("220 ready")
    peer.says("250 vm")
    assert peer.says("451 4.3.0 Temporary failure") == [b"RSET"]
    assert first.results["a@x"].code == 451
    assert peer.says("250 OK") == [b"MAIL FROM:<s@client.test>"]
    peer.says("250 OK")
    peer.says("250 OK")  # RCPT
    assert peer.says("354 go")[-1] == b"."
    assert peer.says("250 2.0.0 <b@x> Saved") == [b"RSET"]
    assert second.results["b@x"].success


def test_every_recipient_refused_sends_no_data(tmp_path: Path) -> None:
    t = transaction(tmp_path, "Q1", ["a@x"])
    peer = Peer([t])
    peer.says("220 ready")
    peer.says("250 vm")
    peer.says("250 OK")
    assert peer.says("552 5.2.2 <a@x> Quota exceeded (mailbox for user is full)") == [b"RSET"]
    assert t.results["a@x"].status == "5.2.2" and t.results["a@x"].permanent


@pytest.mark.parametrize("greeting", ["421 4.3.2 shutting down", "554 5.0.0 go away"])
def test_a_refusing_greeting_is_never_final(tmp_path: Path, greeting: str) -> None:
    t = transaction(tmp_path, "Q1", ["a@x"])
    peer = Peer([t])
    assert peer.says(greeting) == []
    assert peer.transport.disconnecting and not t.attempted and t.results == {}
    assert not peer.outcome.error.permanent


def test_connection_lost_after_the_data(tmp_path: Path) -> None:
    """Replies so far stand; the rest is the relayer's to defer (attempted, incomplete)."""
    t = transaction(tmp_path, "Q1", ["a@x", "b@x"])
    factory = LMTPClientFactory([t], identity="mx", timeout=30)
    client = factory.buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    for line in ("220 ready", "250 vm", "250 OK", "250 OK", "250 OK", "354 go",
                 "250 2.0.0 <a@x> Saved"):
        client.dataReceived(line.encode() + b"\r\n")
        pump(transport)
    client.connectionLost(Failure(ConnectionLost("gone")))
    factory.clientConnectionLost(None, Failure(ConnectionLost("gone")))
    outcome = factory.done.result
    assert "connection lost during the transaction" in outcome.reason
    assert t.attempted and not t.complete and list(t.results) == ["a@x"]


def test_a_bad_reply_line_ends_the_session(tmp_path: Path) -> None:
    peer = Peer([transaction(tmp_path, "Q1", ["a@x"])])
    peer.says("hello there")
    assert peer.transport.disconnecting and "bad LMTP reply" in str(peer.outcome.error)


@pytest.mark.parametrize("chunks, wire", [
    ([b".a\n", b".b\n"], b"..a\r\n..b\r\n"),
    ([b"x\n.", b"y\n"], b"x\r\n..y\r\n"),
    ([b"x", b".y\n"], b"x.y\r\n"),
    ([b"\n", b".\n"], b"\r\n..\r\n"),
])
def test_dot_stuffing_across_chunks(chunks: list[bytes], wire: bytes) -> None:
    stuffer = DotStuffer()
    assert b"".join(stuffer(c) for c in chunks) == wire


def test_probe_asks_rcpt_only(tmp_path: Path) -> None:
    """The quota check at RCPT (mailsrv.outbound.lmtpprobe): no data is ever sent."""
    t = transaction(tmp_path, "probe", ["a@x", "b@x"])
    outcome = SessionOutcome()
    client = LMTPClient([t], identity="mx", outcome=outcome, probe=True)
    transport = StringTransport()
    client.makeConnection(transport)
    for line in ("220 ready", "250 vm", "250 OK", "552 5.2.2 <a@x> Quota exceeded"):
        client.dataReceived(line.encode() + b"\r\n")
    transport.clear()
    client.dataReceived(b"250 2.1.5 OK\r\n")
    assert transport.value() == b"RSET\r\n"
    assert list(t.results) == ["a@x"] and t.results["a@x"].status == "5.2.2"
