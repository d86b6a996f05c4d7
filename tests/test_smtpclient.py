"""Pure parts of the outbound SMTP client: reply parsing and dot-stuffing across chunks."""

from __future__ import annotations

import io

import pytest

from mailsrv.smtpclient import RelayClient, Reply, SessionOutcome, _MessageData


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
    return RelayClient([], identity="mx.example.org", own_names=(), outcome=SessionOutcome())


def stuff(chunks: list[bytes]) -> bytes:
    c = client()
    c._at_line_start = True
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
    data = _MessageData(b"Received: x\n", io.BytesIO(b"Subject: y\n\nbody\n"))
    chunks = []
    while True:
        chunk = data.read(5)
        if not chunk:
            break
        chunks.append(chunk)
    assert b"".join(chunks) == b"Received: x\nSubject: y\n\nbody\n"
