"""The outbound SMTP client: reply parsing, dot-stuffing across chunks, and (over a
StringTransport) the MAIL parameters, the SIZE limit and the 7-bit downgrade."""

from __future__ import annotations

import email
import email.policy
import io
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mailsrv.outbound import outgoing
from mailsrv.outbound.chunks import MessageData
from mailsrv.outbound.lmtpclient import LMTPClientFactory
from mailsrv.outbound.smtpclient import (
    RelayClient,
    RelayClientFactory,
    SessionOutcome,
)
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.replies import Reply
from support.relay_session import Session


@pytest.mark.parametrize("factory_class", [RelayClientFactory, LMTPClientFactory])
def test_an_outbound_connection_logs_no_factory_lines(factory_class: type) -> None:
    """Twisted's "Starting factory <... object at 0x...>" / "Stopping factory" pair, logged by
    a noisy factory around each connection, says nothing an administrator can use."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        factory = factory_class([])
        factory.doStart()
        factory.doStop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e.get("log_format") for e in events if "factory" in str(e.get("log_format"))] == []


@pytest.mark.parametrize(
    "code, text, status, permanent",
    [
        (250, b"2.0.0 Ok: queued as X", "2.0.0", False),
        (550, b"5.1.1 <bob@x>: user unknown", "5.1.1", True),
        (451, b"4.3.0 try later", "4.3.0", False),
        (550, b"no enhanced code here", "5.0.0", True),
        (421, b"", "4.0.0", False),
        (550, b"4.1.1 mismatched class", "5.0.0", True),  # a 4.x.x code on a 5xx reply is ignored
    ],
)
def test_reply_from_wire(code: int, text: bytes, status: str, permanent: bool) -> None:
    reply = Reply.from_wire(code, text)
    assert reply.status == status and reply.permanent is permanent
    assert str(reply).startswith(str(code))


def test_reply_str_is_one_line() -> None:
    assert str(Reply.from_wire(550, b"5.7.1 first line\nsecond line")) == (
        "550 5.7.1 first line second line")


def client() -> RelayClient:
    return RelayClient([], identity="mx.example.org", own_names=(), outcome=SessionOutcome(),
                       prepare=lambda t, ok: defer.fail(AssertionError("no message to prepare")))


def stuff(chunks: list[bytes]) -> bytes:
    c = client()
    return b"".join(c.transformChunk(chunk) for chunk in chunks)


def test_dot_stuffing_inside_a_chunk() -> None:
    assert stuff([b"a\n.b\n..c\n"]) == b"a\r\n..b\r\n...c\r\n"


def test_dot_stuffing_at_a_chunk_boundary_and_first_line() -> None:
    # Twisted's own transformChunk misses both of these.
    assert stuff([b".first\nx\n", b".after boundary\n"]) == (
        b"..first\r\nx\r\n..after boundary\r\n")
    assert stuff([b"no newline at end", b".not a line start\n"]) == (
        b"no newline at end.not a line start\r\n")


def test_lone_dot_line_cannot_end_the_message_early() -> None:
    out = stuff([b"Subject: x\n\nbefore\n", b".\n", b"MAIL FROM:<evil@x>\n"])
    assert b"\r\n.\r\n" not in out
    assert out.endswith(b"\r\n..\r\nMAIL FROM:<evil@x>\r\n")


def test_message_data_reads_prefix_then_body() -> None:
    data = MessageData(b"Received: x\n", io.BytesIO(b"Subject: y\n\nbody\n"))
    chunks = []
    while True:
        chunk = data.read(5)
        if not chunk:
            break
        chunks.append(chunk)
    assert b"".join(chunks) == b"Received: x\nSubject: y\n\nbody\n"


# --- MAIL parameters, SIZE and 8BITMIME, over a StringTransport ------------------------

PREFIX = b"Received: from client.test by mx.example.org; Mon, 1 Nov 2026 10:00:00 +0000\n"
EIGHT_BIT = "Subject: 8 bits\n\nGrüße aus Köln\n.dot line\n".encode()
SEVEN_BIT = b"Subject: 7 bits\n\nplain\n"


def transaction(tmp_path: Path, name: str, body: bytes, sender: str = "a@x.test") -> OutboundTransaction:
    path = tmp_path / f"{name}.body"
    path.write_bytes(body)
    return OutboundTransaction(queue_id=name, sender=sender, recipients=[f"r@{name}.test"],
                       prefix=PREFIX, body_path=path)


def wire_size(prefix: bytes, body: bytes) -> int:
    return len((prefix + body).replace(b"\n", b"\r\n"))


def test_mail_from_carries_size_and_body_8bitmime(tmp_path: Path) -> None:
    t = transaction(tmp_path, "eight", EIGHT_BIT)
    s = Session([t], ["SIZE 100000", "8BITMIME", "PIPELINING"], tmp_path)
    assert s.sent().endswith(  # with PIPELINING, RCPT and DATA in the same write
        b"MAIL FROM:<a@x.test> SIZE=%d BODY=8BITMIME\r\nRCPT TO:<r@eight.test>\r\nDATA\r\n"
        % wire_size(PREFIX, EIGHT_BIT))
    data = s.deliver()
    assert data == (PREFIX + EIGHT_BIT).replace(b"\n", b"\r\n").replace(b"\n.", b"\n..")
    assert t.results["r@eight.test"].success


def test_seven_bit_message_and_a_server_without_size(tmp_path: Path) -> None:
    s = Session([transaction(tmp_path, "seven", SEVEN_BIT)], ["8BITMIME"], tmp_path)
    assert s.sent().endswith(b"MAIL FROM:<a@x.test>\r\n")
    s = Session([transaction(tmp_path, "seven", SEVEN_BIT)], ["SIZE"], tmp_path)
    assert s.sent().endswith(b"MAIL FROM:<a@x.test> SIZE=%d\r\n" % wire_size(PREFIX, SEVEN_BIT))


def test_message_over_the_servers_size_is_not_sent(tmp_path: Path) -> None:
    """Item 10: a message over the announced SIZE gets 552 5.3.4 without being sent."""
    big_body = b"Subject: big\n\n" + b"x" * 70 + b"\n"
    limit = wire_size(PREFIX, big_body) - 1  # one octet too many
    big = transaction(tmp_path, "big", big_body, sender="big@x.test")
    small = transaction(tmp_path, "small", b"Subject: s\n\n\n", sender="small@x.test")
    s = Session([big, small], [f"SIZE {limit}", "8BITMIME"], tmp_path)
    sent = s.sent()
    assert b"big@x.test" not in sent and sent.endswith(b"MAIL FROM:<small@x.test> SIZE=%d\r\n"
                                                       % wire_size(PREFIX, b"Subject: s\n\n\n"))
    [reply] = big.results.values()
    assert (reply.code, reply.status) == (552, "5.3.4") and not big.attempted
    assert f"exceeds the size limit {limit} of peer.test" in reply.text
    s.deliver()
    assert small.results["r@small.test"].success
    # At the limit exactly, it goes.
    s = Session([transaction(tmp_path, "big", big_body)], [f"SIZE {limit + 1}"], tmp_path)
    assert b"MAIL FROM:<a@x.test> SIZE=" in s.sent()


def test_server_without_8bitmime_gets_a_7bit_copy(tmp_path: Path) -> None:
    t = transaction(tmp_path, "eight", EIGHT_BIT)
    s = Session([t], ["SIZE 100000"], tmp_path)
    mail = s.sent()
    assert b"BODY=8BITMIME" not in mail
    [copy] = list(tmp_path.glob("eight.7bit.*"))
    assert mail.endswith(b"MAIL FROM:<a@x.test> SIZE=%d\r\n"
                         % wire_size(b"", copy.read_bytes()))
    data = s.deliver()
    assert data.isascii()
    message = email.message_from_bytes(data.replace(b"\r\n..", b"\r\n."),
                                       policy=email.policy.default)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content() == "Grüße aus Köln\r\n.dot line\r\n"
    assert not copy.exists()  # the copy is removed once sent
    assert t.body_path.read_bytes() == EIGHT_BIT  # the queued body is untouched


def test_unconvertible_message_is_refused_with_5_6_3(tmp_path: Path) -> None:
    bad = transaction(tmp_path, "bad", "Subject: Grüße\n\nGrüße\n".encode(), sender="bad@x.test")
    good = transaction(tmp_path, "good", SEVEN_BIT, sender="good@x.test")
    s = Session([bad, good], [], tmp_path)
    assert s.sent().endswith(b"MAIL FROM:<good@x.test>\r\n")
    [reply] = bad.results.values()
    assert (reply.code, reply.status) == (554, "5.6.3") and "'Subject'" in reply.text
    assert list(tmp_path.glob("bad.7bit.*")) == []


def test_connection_lost_while_preparing_drops_the_copy(tmp_path: Path) -> None:
    pending: defer.Deferred = defer.Deferred()
    t = transaction(tmp_path, "eight", EIGHT_BIT)
    s = Session([t], [], tmp_path, prepare=lambda *_: pending)
    s.client.connectionLost(Failure(ConnectionDone()))
    pending.callback(outgoing.prepare(t, False, tmp_path))
    assert b"MAIL" not in s.sent() and list(tmp_path.glob("eight.7bit.*")) == []
    assert not t.attempted and "connection lost" in (s.outcome.reason or "")


# --- DSN (RFC 3461): the parameters go out only to a server that offers DSN -----------------


def dsn_transaction(tmp_path: Path) -> OutboundTransaction:
    t = transaction(tmp_path, "dsn", SEVEN_BIT)
    t.recipients = ["r@dsn.test", "s@dsn.test"]
    t.dsn_mail = b" RET=HDRS ENVID=e+2B1"
    t.dsn_rcpt = {"r@dsn.test": b" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;R+40x", "s@dsn.test": b""}
    return t


def test_dsn_parameters_go_to_a_server_that_offers_dsn(tmp_path: Path) -> None:
    t = dsn_transaction(tmp_path)
    s = Session([t], ["DSN", "8BITMIME"], tmp_path)
    assert s.sent().endswith(b"MAIL FROM:<a@x.test> RET=HDRS ENVID=e+2B1\r\n")
    s.server(b"250 2.1.0 Ok")
    assert s.sent() == b"RCPT TO:<r@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;R+40x\r\n"
    s.server(b"250 2.1.5 Ok")
    assert s.sent() == b"RCPT TO:<s@dsn.test>\r\n"
    assert s.outcome.dsn


def test_no_dsn_parameters_to_a_server_without_dsn(tmp_path: Path) -> None:
    s = Session([dsn_transaction(tmp_path)], ["8BITMIME"], tmp_path)
    assert s.sent().endswith(b"MAIL FROM:<a@x.test>\r\n")
    s.server(b"250 2.1.0 Ok")
    assert s.sent() == b"RCPT TO:<r@dsn.test>\r\n"
    assert not s.outcome.dsn
# --- SMTPUTF8 (RFC 6531): the keyword when offered, else a verdict per recipient ---------

UTF8_BODY = "From: Jörg <jörg@x.test>\nSubject: Grüße\n\nHallo\n".encode()


def utf8_transaction(tmp_path: Path, body: bytes = UTF8_BODY) -> OutboundTransaction:
    path = tmp_path / "utf8.body"
    path.write_bytes(body)
    return OutboundTransaction(queue_id="utf8", sender="jörg@x.test" if body == UTF8_BODY
                               else "a@x.test", recipients=["jörg@y.test", "bob@y.test"],
                               prefix=PREFIX, body_path=path, smtputf8=True)


def test_smtputf8_sent_when_offered(tmp_path: Path) -> None:
    t = utf8_transaction(tmp_path)
    s = Session([t], ["8BITMIME", "SMTPUTF8"], tmp_path)
    assert s.sent().endswith("MAIL FROM:<jörg@x.test> BODY=8BITMIME SMTPUTF8\r\n".encode())
    s.server(b"250 2.1.0 Ok")
    assert s.sent() == "RCPT TO:<jörg@y.test>\r\n".encode()
    s.server(b"250 2.1.5 Ok")
    assert s.sent() == b"RCPT TO:<bob@y.test>\r\n"


def test_without_smtputf8_utf8_addresses_bounce_5_6_7_and_utf8_headers_5_6_9(tmp_path: Path) -> None:
    t = utf8_transaction(tmp_path)  # a UTF-8 sender: nothing can go
    s = Session([t], ["8BITMIME"], tmp_path)
    assert b"MAIL" not in s.sent() and not t.attempted
    assert {a: r[:2] for a, r in t.results.items()} == {
        "jörg@y.test": (553, "5.6.7"), "bob@y.test": (553, "5.6.7")}
    # An ASCII sender, UTF-8 header fields: the UTF-8 recipient 5.6.7, the other 5.6.9.
    t = utf8_transaction(tmp_path, "Subject: Grüße\n\nHallo\n".encode())
    s = Session([t], ["8BITMIME"], tmp_path)
    assert b"MAIL" not in s.sent()
    assert {a: r[:2] for a, r in t.results.items()} == {
        "jörg@y.test": (553, "5.6.7"), "bob@y.test": (554, "5.6.9")}
    # ASCII header fields and an 8-bit body: the ASCII recipient goes, without the keyword.
    t = utf8_transaction(tmp_path, "Subject: hi\n\nGrüße\n".encode())
    s = Session([t], ["8BITMIME"], tmp_path)
    assert s.sent().endswith(b"MAIL FROM:<a@x.test> BODY=8BITMIME\r\n")
    s.server(b"250 2.1.0 Ok")
    assert s.sent() == b"RCPT TO:<bob@y.test>\r\n"
    s.server(b"250 2.1.5 Ok")
    s.server(b"354 go ahead")
    assert t.results["jörg@y.test"][:2] == (553, "5.6.7")
