"""
The relay client's CHUNKING (RFC 3030): the message as BDAT chunks to a server that offers it
(over a StringTransport, with a scripted server), DATA to one that does not, and the chunking
of the spool alone.
"""

from __future__ import annotations

import io
from pathlib import Path

from mailsrv.outbound.chunks import MessageData, bdat_chunks
from mailsrv.outbound.transaction import OutboundTransaction
from support.relay_session import Session

PREFIX = b"Received: from client.test by mx.example.org; Mon, 1 Nov 2026 10:00:00 +0000\n"
BODY = b"Subject: chunks\n\n.a line with a dot\n.\nend\n"


def chunks_of(prefix: bytes, body: bytes, size: int) -> list[bytes]:
    return list(bdat_chunks(MessageData(prefix, io.BytesIO(body)), size))


def test_one_chunk_when_the_message_fits_no_dot_stuffing() -> None:
    wire = (PREFIX + BODY).replace(b"\n", b"\r\n")
    assert chunks_of(PREFIX, BODY, 10**6) == [b"BDAT %d LAST\r\n" % len(wire) + wire]


def test_chunks_of_the_read_size_the_last_marked_and_an_empty_message() -> None:
    body = b"x\n" * 10  # 20 octets, 40 on the wire
    assert chunks_of(b"", body, 8) == [b"BDAT 12\r\n" + b"x\r\n" * 4] * 2 + [
        b"BDAT 6 LAST\r\n" + b"x\r\n" * 2]
    assert chunks_of(b"", body, 7)[-1] == b"BDAT 9 LAST\r\n" + b"x\r\n" * 3
    assert chunks_of(b"", b"", 8) == [b"BDAT 0 LAST\r\n"]
    # Reassembled, whatever the size: the message, each LF as CRLF.
    for size in range(1, 30):
        joined = b"".join(c.split(b"\r\n", 1)[1] for c in chunks_of(PREFIX, BODY, size))
        assert joined == (PREFIX + BODY).replace(b"\n", b"\r\n")


def transaction(tmp_path: Path, body: bytes = BODY) -> OutboundTransaction:
    path = tmp_path / "t.body"
    path.write_bytes(body)
    return OutboundTransaction(queue_id="t", sender="a@x.test", recipients=["r@y.test"],
                               prefix=PREFIX, body_path=path)


def test_a_server_offering_chunking_gets_bdat_chunk_by_chunk(tmp_path: Path, monkeypatch) -> None:
    from mailsrv.outbound import smtpclient
    monkeypatch.setattr(smtpclient, "CHUNK_SIZE", 64)
    t = transaction(tmp_path, BODY * 3)
    s = Session([t], [b"CHUNKING", b"8BITMIME"], tmp_path, clear=True)
    s.server(b"250 2.1.0 Ok")
    assert s.sent() == b"RCPT TO:<r@y.test>\r\n"
    s.server(b"250 2.1.5 Ok")
    received = b""
    while True:
        chunk = s.sent()
        command, data = chunk.split(b"\r\n", 1)
        assert command.startswith(b"BDAT ") and int(command.split()[1]) == len(data)
        assert s.sent() == b""  # nothing more before the chunk's reply
        received += data
        if command.endswith(b" LAST"):
            break
        s.server(b"250 2.0.0 Ok: %d octets" % len(received))
    assert b"DATA" not in received and received == (PREFIX + BODY * 3).replace(b"\n", b"\r\n")
    s.server(b"250 2.0.0 Ok: queued as X")
    assert t.results["r@y.test"].success
    assert s.sent() == b"QUIT\r\n"


def test_a_refused_chunk_ends_the_message_no_further_chunk(tmp_path: Path, monkeypatch) -> None:
    from mailsrv.outbound import smtpclient
    monkeypatch.setattr(smtpclient, "CHUNK_SIZE", 16)
    t = transaction(tmp_path)
    s = Session([t], [b"CHUNKING"], tmp_path, clear=True)
    s.server(b"250 2.1.0 Ok")
    s.server(b"250 2.1.5 Ok")
    assert s.sent().startswith(b"RCPT TO:<r@y.test>\r\nBDAT 16\r\n")
    s.server(b"552 5.3.4 Error: message size exceeds fixed limit")
    assert s.sent() == b"QUIT\r\n"  # the only message: no BDAT, no RSET
    assert t.results["r@y.test"][:2] == (552, "5.3.4")


def test_without_chunking_data_as_before(tmp_path: Path) -> None:
    t = transaction(tmp_path)
    s = Session([t], [b"8BITMIME"], tmp_path, clear=True)
    s.server(b"250 2.1.0 Ok")
    s.server(b"250 2.1.5 Ok")
    assert s.sent() == b"RCPT TO:<r@y.test>\r\nDATA\r\n"
