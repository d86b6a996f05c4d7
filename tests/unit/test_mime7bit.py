"""The 7-bit downgrade for peers without 8BITMIME (mailsrv.outbound.mime7bit), checked with real bytes:
each converted message is read back with the standard library's parser and every part's
decoded content compared with the original's."""

from __future__ import annotations

import binascii
import email
import email.message
import email.policy
import random

import pytest

from mailsrv.outbound.mime7bit import QP_LINE_MAX, ConversionError, quoted_printable_line, to_7bit

UTF8_TEXT = "Grüße aus Köln — naïve café, 日本語.\n".encode()


def convert(data: bytes) -> bytes:
    out: list[bytes] = []
    to_7bit(lambda: data.splitlines(keepends=True), out.append)
    return b"".join(out)


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def leaves(message: email.message.Message) -> list[tuple[str, bytes | None]]:
    return [(p.get_content_type(), p.get_payload(decode=True))
            for p in message.walk() if not p.is_multipart()]


def check_7bit(data: bytes) -> None:
    assert data.isascii()
    for line in data.split(b"\n"):
        assert len(line) <= 998


def test_quoted_printable_line_round_trips_and_stays_short() -> None:
    rng = random.Random(11)
    alphabet = bytes(range(256)).replace(b"\n", b"") + b"-= \t" * 20
    cases = [b"", b"-", b"--boundary", b"a" * 74 + b"\xe9", b"x " * 60, b"end with space ",
             b"tab\t", b"=" * 100, b"-" * 200, b"a" * 75 + b"-" * 5]
    cases += [bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 990))) for _ in range(300)]
    for content in cases:
        encoded = quoted_printable_line(content)
        assert binascii.a2b_qp(encoded) == content, content
        for line in encoded.split(b"\n"):
            assert len(line) <= QP_LINE_MAX and line.isascii()
            assert not line.startswith(b"-")  # never a boundary delimiter
            assert line[-1:] not in (b" ", b"\t")  # trailing white space is encoded


def test_non_mime_utf8_body_gets_mime_fields_and_quoted_printable() -> None:
    head = b"Received: from a by b; Mon, 1 Nov 2026 10:00:00 +0000\nFrom: <a@x.test>\nSubject: hi\n"
    body = b"Hallo,\n" + UTF8_TEXT + b"a = b   \n-- \nsig\n"
    out = convert(head + b"\n" + body)
    check_7bit(out)
    assert out.startswith(head)  # the fields are kept byte for byte, new ones at the end
    assert out[len(head):].startswith(
        b"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: quoted-printable\n\n")
    [(ctype, decoded)] = leaves(parse(out))
    assert ctype == "text/plain" and decoded == body
    assert parse(out).get_content_charset() == "utf-8"


def test_non_mime_body_that_is_not_utf8_is_unknown_8bit() -> None:
    body = "Größe in Latin-1\n".encode("latin-1")
    out = convert(b"Subject: x\n\n" + body)
    message = parse(out)
    assert message.get_content_charset() == "unknown-8bit"
    assert leaves(message) == [("text/plain", body)]


def test_message_without_header_section() -> None:
    body = b"no headers at all\n" + UTF8_TEXT
    out = convert(body)
    check_7bit(out)
    assert leaves(parse(out)) == [("text/plain", body)]


MULTIPART = b"""\
From: <a@x.test>
Subject: parts
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"
Content-Transfer-Encoding: 8bit

Preamble with \xc3\xa9 nobody reads.
--outer
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

""" + UTF8_TEXT + b"""line with = signs and trailing spaces   
--outer is not the boundary here because of this text
""" + b"y" * 900 + b"\xc3\xa9" + b"""
.
-- 
--outer
Content-Type: multipart/alternative;
 boundary=inner

--inner
Content-Type: text/plain; charset=us-ascii

plain ascii, kept as it is
--inner
Content-Type: text/html; charset=utf-8

<p>""" + UTF8_TEXT + b"""</p>
--inner--
--outer
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

AAECAwQFBgcICQ==
--outer
Content-Type: message/rfc822
Content-Transfer-Encoding: 8bit

From: <b@y.test>
Subject: forwarded

forwarded """ + UTF8_TEXT + b"""--outer--
Epilogue \xff.
"""


def test_multipart_each_8bit_leaf_is_encoded_and_the_rest_kept() -> None:
    out = convert(MULTIPART)
    check_7bit(out)
    before, after = parse(MULTIPART), parse(out)
    assert not after.defects
    assert leaves(after) == leaves(before)
    assert [p.get_content_type() for p in after.walk()] == [
        p.get_content_type() for p in before.walk()]
    # The 7-bit and base64 parts are byte for byte the same; 8-bit containers say 7bit.
    assert b"Content-Type: text/plain; charset=us-ascii\n\nplain ascii, kept as it is\n" in out
    assert b"base64\n\nAAECAwQFBgcICQ==\n--outer\n" in out
    assert after["Content-Transfer-Encoding"] == "7bit"
    [forwarded] = [p for p in after.walk() if p.get_content_type() == "message/rfc822"]
    assert forwarded["Content-Transfer-Encoding"] == "7bit"
    inner = forwarded.get_payload(0)
    assert inner["MIME-Version"] == "1.0" and inner.get_content_charset() == "utf-8"
    assert inner.get_payload(decode=True) == b"forwarded " + UTF8_TEXT[:-1]
    assert b"Preamble with ?? nobody reads." in out and b"Epilogue ?." in out


def test_a_message_with_nothing_8bit_in_parts_is_unchanged() -> None:
    data = b"Subject: x\nMIME-Version: 1.0\nContent-Type: text/plain\n\nplain\n"
    assert convert(data) == data


@pytest.mark.parametrize(
    "data, why",
    [
        (b"Subject: Gr\xc3\xbc\xc3\x9fe\n\nbody \xc3\xa9\n", "header field 'Subject'"),
        (b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Description: \xe9\n\nx\n--b--\n",
         "header field 'Content-Description'"),
        (b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\nAAAA\xe9\n",
         "encoded as 'base64'"),
        (b"Content-Type: multipart/mixed\n\nno boundary \xe9\n", "cannot be encoded"),
        (b"Content-Type: message/partial; id=x; number=1\n\n\xe9\n", "cannot be encoded"),
    ],
    ids=["top-header", "part-header", "base64-part", "multipart-without-boundary", "partial"],
)
def test_what_cannot_be_converted_is_refused_before_any_output(data: bytes, why: str) -> None:
    out: list[bytes] = []
    with pytest.raises(ConversionError, match=why):
        to_7bit(lambda: data.splitlines(keepends=True), out.append)
    assert out == []
