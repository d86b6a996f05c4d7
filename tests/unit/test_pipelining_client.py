"""
The relay client's PIPELINING (RFC 2920) and the end of a transaction: MAIL, the RCPTs and
DATA in one write to a server that offers it, every reply read in order whatever the earlier
ones said, a lone dot when DATA is accepted for no recipient; no RSET after the reply to the
data (RFC 5321 4.1.1.4), RSET after a transaction that ended before it. Over a
StringTransport with the server's replies scripted.
"""

from __future__ import annotations

from pathlib import Path

from mailsrv.outbound.transaction import OutboundTransaction
from support.relay_session import Session

PREFIX = b"Received: from client.test by mx.example.org; Mon, 1 Nov 2026 10:00:00 +0000\n"
BODY = b"Subject: pipelined\n\n.a dot line\nend\n"
WIRE = (PREFIX + BODY).replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..") + b".\r\n"
PIPELINING = ["PIPELINING", "8BITMIME"]


def message(tmp_path: Path, name: str, *recipients: str) -> OutboundTransaction:
    path = tmp_path / f"{name}.body"
    path.write_bytes(BODY)
    return OutboundTransaction(queue_id=name, sender=f"{name}@x.test",
                               recipients=list(recipients), prefix=PREFIX, body_path=path)


def group(sender: str, *recipients: str, data: bool = True) -> bytes:
    lines = [b"MAIL FROM:<%s>" % sender.encode()]
    lines += [b"RCPT TO:<%s>" % r.encode() for r in recipients]
    return b"".join(line + b"\r\n" for line in lines + [b"DATA"] * data)


def replies(s: Session, *lines: bytes) -> None:
    """The server's replies to a group, in one read as a pipelining server sends them."""
    s.client.dataReceived(b"".join(line + b"\r\n" for line in lines))


def codes(t: OutboundTransaction) -> dict[str, tuple]:
    return {address: reply[:2] for address, reply in t.results.items()}


def test_two_messages_two_round_trips_each_and_no_rset(tmp_path: Path) -> None:
    a = message(tmp_path, "a", "r1@y.test", "r2@y.test")
    b = message(tmp_path, "b", "r3@y.test")
    s = Session([a, b], PIPELINING, tmp_path)
    assert s.sent().endswith(b"\r\n" + group("a@x.test", "r1@y.test", "r2@y.test"))
    replies(s, b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"250 2.1.5 Ok", b"354 go ahead")
    assert s.data() == WIRE
    s.server(b"250 2.0.0 Ok: queued as A")
    assert s.sent() == group("b@x.test", "r3@y.test")  # straight on: no RSET
    replies(s, b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 go ahead")
    assert s.data() == WIRE
    s.server(b"250 2.0.0 Ok: queued as B")
    assert s.sent() == b"QUIT\r\n"
    assert codes(a) == {"r1@y.test": (250, "2.0.0"), "r2@y.test": (250, "2.0.0")}
    assert codes(b) == {"r3@y.test": (250, "2.0.0")}


def test_a_refused_recipient_keeps_its_reply_the_others_get_the_datas(tmp_path: Path) -> None:
    t = message(tmp_path, "a", "gone@y.test", "r@y.test")
    s = Session([t], PIPELINING, tmp_path, clear=True)
    replies(s, b"250 2.1.0 Ok", b"550 5.1.1 no such user", b"250 2.1.5 Ok", b"354 go ahead")
    assert s.data() == WIRE
    s.server(b"250 2.0.0 Ok")
    assert codes(t) == {"gone@y.test": (550, "5.1.1"), "r@y.test": (250, "2.0.0")}


def test_a_refused_mail_decides_every_recipient_and_rset_follows(tmp_path: Path) -> None:
    a = message(tmp_path, "a", "r1@y.test", "r2@y.test")
    b = message(tmp_path, "b", "r3@y.test")
    s = Session([a, b], PIPELINING, tmp_path, clear=True)
    # The replies to the RCPTs and to DATA still come (503): read, and meaning nothing.
    replies(s, b"553 5.7.1 sender refused", b"503 5.5.1 need MAIL", b"503 5.5.1 need MAIL")
    assert s.sent() == b""  # DATA's reply is still due
    s.server(b"503 5.5.1 no valid recipients")
    assert codes(a) == {"r1@y.test": (553, "5.7.1"), "r2@y.test": (553, "5.7.1")}
    assert s.sent() == b"RSET\r\n"
    s.server(b"250 2.0.0 Ok")
    assert s.sent() == group("b@x.test", "r3@y.test")


def test_data_accepted_for_no_recipient_gets_a_lone_dot(tmp_path: Path) -> None:
    a = message(tmp_path, "a", "r1@y.test")
    b = message(tmp_path, "b", "r2@y.test")
    s = Session([a, b], PIPELINING, tmp_path, clear=True)
    replies(s, b"250 2.1.0 Ok", b"550 5.1.1 no such user", b"354 go ahead")
    assert s.sent() == b".\r\n"  # RFC 2920 3.1: no message, the transaction ended
    s.server(b"554 5.5.1 no valid recipients")
    assert codes(a) == {"r1@y.test": (550, "5.1.1")}
    assert s.sent() == group("b@x.test", "r2@y.test")  # the dot ended it: no RSET


def test_data_refused_after_every_recipient_was_refused_then_rset(tmp_path: Path) -> None:
    a = message(tmp_path, "a", "r1@y.test")
    b = message(tmp_path, "b", "r2@y.test")
    s = Session([a, b], PIPELINING, tmp_path, clear=True)
    replies(s, b"250 2.1.0 Ok", b"450 4.2.0 mailbox busy", b"554 5.5.1 no valid recipients")
    assert codes(a) == {"r1@y.test": (450, "4.2.0")}
    assert s.sent() == b"RSET\r\n"  # MAIL was accepted and no data ended the transaction


def test_data_refused_decides_the_accepted_recipients(tmp_path: Path) -> None:
    t = message(tmp_path, "a", "r1@y.test", "gone@y.test")
    s = Session([t], PIPELINING, tmp_path, clear=True)
    replies(s, b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"550 5.1.1 gone",
            b"451 4.3.0 try again later")
    assert codes(t) == {"r1@y.test": (451, "4.3.0"), "gone@y.test": (550, "5.1.1")}
    assert s.sent() == b"QUIT\r\n"


def test_421_in_the_group_ends_the_session_at_once(tmp_path: Path) -> None:
    a = message(tmp_path, "a", "r1@y.test", "r2@y.test")
    b = message(tmp_path, "b", "r3@y.test")
    s = Session([a, b], PIPELINING, tmp_path, clear=True)
    replies(s, b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"421 4.3.2 shutting down")
    assert codes(a) == {"r1@y.test": (421, "4.3.2"), "r2@y.test": (421, "4.3.2")}
    assert s.sent() == b"QUIT\r\n" and b.results == {}


def test_with_chunking_the_group_stops_before_bdat(tmp_path: Path) -> None:
    t = message(tmp_path, "a", "r1@y.test", "r2@y.test")
    s = Session([t], ["PIPELINING", "CHUNKING", "8BITMIME"], tmp_path)
    assert s.sent().endswith(b"\r\n" + group("a@x.test", "r1@y.test", "r2@y.test", data=False))
    replies(s, b"250 2.1.0 Ok", b"550 5.1.1 gone", b"250 2.1.5 Ok")
    wire = (PREFIX + BODY).replace(b"\n", b"\r\n")
    assert s.sent() == b"BDAT %d LAST\r\n" % len(wire) + wire
    s.server(b"250 2.0.0 Ok: queued")
    assert codes(t) == {"r1@y.test": (550, "5.1.1"), "r2@y.test": (250, "2.0.0")}


def test_with_chunking_every_recipient_refused_sends_no_chunk(tmp_path: Path) -> None:
    a = message(tmp_path, "a", "r1@y.test")
    b = message(tmp_path, "b", "r2@y.test")
    s = Session([a, b], ["PIPELINING", "CHUNKING"], tmp_path, clear=True)
    replies(s, b"250 2.1.0 Ok", b"550 5.1.1 gone")
    assert s.sent() == b"RSET\r\n" and codes(a) == {"r1@y.test": (550, "5.1.1")}


def test_without_pipelining_command_by_command_and_no_rset_after_the_data(
        tmp_path: Path) -> None:
    a = message(tmp_path, "a", "r1@y.test")
    b = message(tmp_path, "b", "r2@y.test")
    s = Session([a, b], ["8BITMIME"], tmp_path)
    assert s.sent().endswith(b"\r\nMAIL FROM:<a@x.test>\r\n")
    s.server(b"250 2.1.0 Ok")
    assert s.sent() == b"RCPT TO:<r1@y.test>\r\n"
    s.server(b"250 2.1.5 Ok")
    assert s.sent() == b"DATA\r\n"
    s.server(b"354 go ahead")
    assert s.data() == WIRE
    s.server(b"250 2.0.0 Ok")
    assert s.sent() == b"MAIL FROM:<b@x.test>\r\n"
