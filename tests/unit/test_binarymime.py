"""
BINARYMIME (RFC 3030 §3): the converter that makes a binary MIME message text
(mailsrv.message.binarymime), every case read back with the standard library's ``email``,
and the session rules in process (EHLO, MAIL's BODY=, BDAT only, the conversion before the
checks, its refusal).
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import mmap
import re

import pytest
from twisted.internet import task

from mailsrv.message.binarymime import MAX_DEPTH, BinaryMimeError, to_text
from support.inprocess import Core, make_runtime
from support.queue_runtime import maildir_of

QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as [0-9A-Za-z]{14}$")
#: Every octet value, bare CR and LF, NUL, and a "line" far over 1000 octets.
BINARY = bytes(range(256)) * 8 + b"\r\n\n\r\x00" + b"z" * 3000 + b"\r"
HEAD = b"From: a@client.test\r\nTo: alice@example.org\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"


def convert(message: bytes) -> bytes:
    out: list[bytes] = []
    to_text(message, len(message), out.append)
    return b"".join(out)


def parse(text: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(text, policy=email.policy.default)


def is_spool_text(text: bytes) -> bool:
    """LF lines of at most 998 octets, without CR or NUL: what the spool holds for DATA."""
    return b"\r" not in text and b"\0" not in text and all(
        len(line) <= 998 for line in text.split(b"\n"))


def multipart(*parts: bytes, boundary: bytes = b"XX", preamble: bytes = b"",
              epilogue: bytes = b"") -> bytes:
    body = preamble + b"".join(b"\r\n--" + boundary + b"\r\n" + part for part in parts)
    body = body[2:] if not preamble else body
    return (HEAD + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
            + body + b"\r\n--" + boundary + b"--\r\n" + epilogue)


BINARY_PART = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"


# -- the converter -------------------------------------------------------------------------


def test_binary_part_becomes_base64_of_exactly_its_octets_text_part_kept():
    message = multipart(b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\nw\xc3\xb6rld\r\n",
                        BINARY_PART + BINARY, preamble=b"preamble\r\n", epilogue=b"epilogue\r\n")
    text = convert(message)
    assert is_spool_text(text)
    parsed = parse(text)
    plain, data = parsed.iter_parts()
    assert plain.get_content() == "hello\nwörld\n" and "Content-Transfer-Encoding" not in plain
    assert data["Content-Transfer-Encoding"] == "base64"
    assert data.get_payload(decode=True) == BINARY
    # Headers and text pass through with only their line ends changed.
    assert text.startswith(HEAD.replace(b"\r\n", b"\n"))
    assert b"\n\npreamble\n\n--XX\n" in text and text.endswith(b"--XX--\nepilogue\n")


def test_part_declared_binary_with_text_content_is_relabelled_8bit_or_7bit():
    message = multipart(b"Content-Type: text/plain; charset=utf-8\r\n"
                        b"Content-Transfer-Encoding: binary\r\n\r\ncaf\xc3\xa9\r\n",
                        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: Binary\r\n\r\nplain")
    first, second = parse(convert(message)).iter_parts()
    assert first["Content-Transfer-Encoding"] == "8bit" and first.get_content() == "café\n"
    assert second["Content-Transfer-Encoding"] == "7bit" and second.get_content() == "plain"


def test_nested_multipart_and_message_rfc822_are_followed_containers_relabelled():
    inner = (b"Content-Type: multipart/alternative; boundary=in\r\n"
             b"Content-Transfer-Encoding: binary\r\n\r\n--in\r\n" + BINARY_PART + BINARY
             + b"\r\n--in--")
    attached = (b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                b"Subject: inside\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: binary"
                b"\r\n\r\n" + BINARY[::-1])
    text = convert(multipart(inner, attached))
    assert is_spool_text(text)
    alternative, rfc822 = parse(text).iter_parts()
    assert alternative["Content-Transfer-Encoding"] == "8bit"
    [leaf] = alternative.iter_parts()
    assert leaf.get_payload(decode=True) == BINARY
    assert rfc822["Content-Transfer-Encoding"] == "8bit"
    embedded = rfc822.get_payload()[0]
    assert embedded["Subject"] == "inside" and embedded.get_payload(decode=True) == BINARY[::-1]


def test_message_without_mime_with_binary_body_gains_mime_version_and_base64():
    message = b"Subject: raw\r\n\r\n" + BINARY
    text = convert(message)
    parsed = parse(text)
    assert parsed["MIME-Version"] == "1.0" and parsed["Content-Transfer-Encoding"] == "base64"
    assert parsed.get_payload(decode=True) == BINARY


def test_text_message_passes_byte_for_byte_but_line_ends():
    message = HEAD + b"Content-Type: text/plain\r\n\r\nline\r\n.dot\r\n\r\nlast"
    assert convert(message) == message.replace(b"\r\n", b"\n")
    assert convert(b"") == b""


def test_binary_preamble_and_epilogue_are_dropped():
    text = convert(multipart(b"Content-Type: text/plain\r\n\r\nx", preamble=b"\x00\r\r\n",
                             epilogue=b"\n\x00"))
    assert is_spool_text(text)
    [part] = parse(text).iter_parts()
    assert part.get_content() == "x"


def test_a_line_only_starting_like_a_delimiter_is_content():
    content = b"--XXnot a delimiter\r\n--XX-- neither\r\n\x00"
    [part] = parse(convert(multipart(BINARY_PART + content))).iter_parts()
    assert part.get_payload(decode=True) == content


def test_unclosed_multipart_ends_with_the_message():
    message = HEAD + b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n" + BINARY_PART + BINARY
    [part] = parse(convert(message)).iter_parts()
    assert part.get_payload(decode=True) == BINARY


def test_large_part_converted_through_a_mapped_file(tmp_path):
    payload = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)  # 3 MiB, several blocks
    message = multipart(BINARY_PART + payload, b"Content-Type: text/plain\r\n\r\n"
                        + b"line\r\n" * 300000)
    path = tmp_path / "raw"
    path.write_bytes(message)
    out = tmp_path / "text"
    with open(path, "rb") as raw, open(out, "wb") as sink:
        with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as data:
            to_text(data, len(message), sink.write)
    text = out.read_bytes()
    assert is_spool_text(text)
    binary, lines = parse(text).iter_parts()
    assert binary.get_payload(decode=True) == payload
    assert lines.get_content() == "line\n" * 300000


@pytest.mark.parametrize(("message", "reason"), [
    (b"Subject: a\nbare LF\r\n\r\nbody", "a bare CR or LF in a header section"),
    (b"Subject: " + b"x" * 990 + b"\r\n\r\nbody", "a header line longer than 998 octets"),
    (HEAD + b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n\x00\x01",
     "binary octets in a part encoded as 'base64'"),
    (HEAD + b"Content-Type: multipart/mixed\r\n\r\n\x00", "binary octets in a multipart/mixed "
     "part that cannot be encoded"),
    (HEAD + b"Content-Type: multipart/mixed; boundary=XX\r\n\r\nno delimiter\x00",
     "binary octets in a multipart without its delimiters"),
])
def test_what_cannot_be_made_text_is_refused_with_why(message, reason):
    with pytest.raises(BinaryMimeError, match=re.escape(reason)):
        convert(message)


def test_nesting_one_past_the_limit_is_refused_at_the_limit_converted():
    def nested(depth: int) -> bytes:
        message = b"Content-Type: text/plain\r\n\r\nleaf"
        for _ in range(depth):
            message = b"Content-Type: message/rfc822\r\n\r\n" + message
        return message

    assert convert(nested(MAX_DEPTH)).endswith(b"\nleaf")
    with pytest.raises(BinaryMimeError, match="nested deeper"):
        convert(nested(MAX_DEPTH + 1))


# -- the session ---------------------------------------------------------------------------


@pytest.fixture
def runtime(tmp_path):
    return make_runtime(tmp_path, task.Clock())


def greeted(runtime) -> Core:
    core = Core(runtime)
    core.greet()
    return core


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


ENVELOPE = b"MAIL FROM:<a@client.test> BODY=BINARYMIME\r\nRCPT TO:<alice@example.org>\r\n"


def test_binarymime_in_chunks_cut_mid_crlf_is_stored_as_text(tmp_path, runtime):
    message = multipart(b"Content-Type: text/plain\r\n\r\nhi\r\n", BINARY_PART + BINARY)
    cut = message.index(b"\r\n\x00") + 1  # between a CR and the LF the binary part has
    replies = greeted(runtime).send_bytes(ENVELOPE + bdat(message[:cut]) + bdat(message[cut:], True))
    assert replies[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", f"250 2.0.0 Ok: {cut} octets received"]
    assert QUEUED.match(replies[3])
    [stored] = list(maildir_of(tmp_path))
    text, data = stored.get_payload()
    assert text.get_payload() == "hi\n" and data.get_payload(decode=True) == BINARY
    assert list((tmp_path / "queue" / "incoming").iterdir()) == []


def test_data_after_body_binarymime_is_a_bad_sequence_and_ends_the_transaction(runtime):
    core = greeted(runtime)
    assert core.send_bytes(ENVELOPE + b"DATA\r\n") == [
        "250 2.1.0 Ok", "250 2.1.5 Ok", "503 5.5.1 Error: DATA after BODY=BINARYMIME; send RSET"]
    assert core.send("RCPT TO:<alice@example.org>") == ["503 5.5.1 Error: need MAIL command"]


def test_body_binarymime_needs_ehlo_and_other_values_are_refused(runtime):
    core = Core(runtime)
    core.send("HELO client.test")
    assert core.send("MAIL FROM:<a@client.test> BODY=BINARYMIME") == [
        "501 5.5.4 Error: parameter BODY needs EHLO"]
    core = greeted(runtime)
    assert core.send("MAIL FROM:<a@client.test> BODY=BINARY") == [
        "501 5.5.4 Error: bad value for parameter BODY"]
    assert core.send("MAIL FROM:<a@client.test> BODY=binarymime") == ["250 2.1.0 Ok"]


def test_binary_chunks_keep_the_size_limit_one_past_refused(tmp_path):
    core = greeted(make_runtime(tmp_path, task.Clock(), max_message_size=1024))
    body = b"Subject: x\r\n\r\n"
    assert QUEUED.match(core.send_bytes(
        ENVELOPE + bdat(body + b"\x00" * (1024 - len(body)), last=True))[2])
    assert core.send_bytes(ENVELOPE + bdat(body + b"\x00" * (1025 - len(body)), last=True))[2] == (
        "552 5.3.4 Error: message size exceeds fixed limit")


def test_message_that_cannot_be_made_text_is_refused_554_and_nothing_kept(tmp_path, runtime):
    message = HEAD + b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n\x00"
    replies = greeted(runtime).send_bytes(ENVELOPE + bdat(message, last=True))
    assert replies[2] == (
        "554 5.6.0 Error: binary MIME message cannot be made into text (binary octets in a "
        "part encoded as 'base64'); message refused")
    assert not (tmp_path / "mail" / "example.org" / "alice").exists()
    assert list((tmp_path / "queue" / "incoming").iterdir()) == []
