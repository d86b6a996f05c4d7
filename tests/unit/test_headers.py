"""Tests for mailsrv.message.headers: the trace fields we prepend (the message's own: test_headsection)."""

from __future__ import annotations

import datetime
import email.message
import email.parser
import email.policy
import email.utils
import re

import pytest

from mailsrv.message import headers
from mailsrv.message.headers import needs_separator

WHEN = datetime.datetime(2026, 11, 22, 21, 7, 1, tzinfo=datetime.timezone.utc)
DATE = "Sun, 22 Nov 2026 21:07:01 +0000"


def received(**overrides: object) -> bytes:
    args: dict[str, object] = dict(
        helo="client.example",
        client_ip="192.0.2.7",
        reverse_name="mx.client.example",
        hostname="mail.example.org",
        protocol="ESMTP",
        queue_id="4Xb7Qd2kHpZ3",
        recipient="alice@example.org",
        when=WHEN,
    )
    args.update(overrides)
    return headers.received_header(**args)  # type: ignore[arg-type]


def parse(header_block: bytes) -> email.message.EmailMessage:
    return email.parser.BytesParser(policy=email.policy.default).parsebytes(
        header_block + b"Subject: test\n\nbody\n"
    )


# --- needs_separator -------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"Subject: hi\n\nbody\n", False),
        (b"X-Weird!Name: v\n", False),
        (b"Subject: only a header, no newline", False),
        (b"\nbody after an empty header section\n", False),
        (b"\r\nbody\n", False),
        (b"", True),
        (b"Hello Bob\n", True),
        (b"Hello Bob", True),
        (b" indented first line\n", True),
        (b"\tSubject: tab first\n", True),
        (b"From alice@example.org Sun Nov 22 21:07:01 2026\nSubject: x\n", True),
        # Obsolete syntax (RFC 5322 §4.5.3): readers take it as a field, and so do we.
        (b"Subject : space before colon\n", False),
        (b"Subject\t: tab before colon\n", False),
        (b"X-\xc3\xa9: 8-bit in the name\n", True),
        (b": no name\n", True),
    ],
)
def test_needs_separator(head: bytes, expected: bool) -> None:
    assert needs_separator(head) is expected


def test_separator_keeps_body_out_of_the_header_section() -> None:
    body = b" indented text\nmore\n"
    prefix = headers.return_path("a@b.example") + received()
    if needs_separator(body):
        prefix += b"\n"
    msg = parse(b"")  # sanity of the helper
    assert msg["Subject"] == "test"
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(prefix + body)
    assert msg.get_payload() == body.decode()
    assert len(msg.get_all("Received")) == 1


# --- Return-Path / Message-ID ----------------------------------------------------


def test_return_path() -> None:
    assert headers.return_path("alice@example.org") == b"Return-Path: <alice@example.org>\n"
    assert headers.return_path(None) == b"Return-Path: <>\n"
    assert headers.return_path("") == b"Return-Path: <>\n"


def test_return_path_sanitised() -> None:
    value = headers.return_path("a>\r\nX-Injected: 1\x00<b@c\u00e9")
    assert value.count(b"\n") == 1 and value.endswith(b"\n")
    assert b"\r" not in value and b"\x00" not in value
    assert value.startswith(b"Return-Path: <") and value.endswith(b">\n")
    assert value[len(b"Return-Path: <") : -2].count(b">") == 0
    value.decode("ascii")
    assert parse(value).get("X-Injected") is None


MSGID_RE = re.compile(r"<\d{8}T\d{6}\.[A-Za-z0-9._-]+@[A-Za-z0-9.-]+>")


def test_make_message_id_format_and_validity() -> None:
    msgid = headers.make_message_id("4Xb7Qd2kHpZ3", "mail.example.org")
    assert MSGID_RE.fullmatch(msgid), msgid
    assert msgid.endswith(".4Xb7Qd2kHpZ3@mail.example.org>")
    field = email.policy.default.header_factory("Message-ID", msgid)
    assert field.defects == ()
    msg = parse(headers.message_id_header(msgid))
    assert msg["Message-ID"] == msgid
    assert msg["Message-ID"].defects == ()
    assert email.utils.unquote(msgid) == msgid[1:-1]


@pytest.mark.parametrize(
    "hostname", ["bad host/name:x", "..dots..", "", "h\u00e9\u00e9.example", "a@b>c<d", "x\r\ny"]
)
def test_make_message_id_sanitises_hostname(hostname: str) -> None:
    msgid = headers.make_message_id("4Xb7Qd2kHpZ3", hostname)
    assert MSGID_RE.fullmatch(msgid), msgid
    assert ".." not in msgid and "@." not in msgid and not msgid.endswith(".>")
    assert email.policy.default.header_factory("Message-ID", msgid).defects == ()


def test_make_message_id_unique_per_queue_id() -> None:
    assert headers.make_message_id("AAA", "h") != headers.make_message_id("AAB", "h")
    # An unusable queue id still gives a valid, random id.
    a, b = headers.make_message_id("..", "h"), headers.make_message_id("..", "h")
    assert MSGID_RE.fullmatch(a) and a != b


def test_message_id_header() -> None:
    assert headers.message_id_header("<a.b@c.d>") == b"Message-ID: <a.b@c.d>\n"
    for bad in ["a@b", "<a@b>\r\nX: y", "<a b@c>", "<@c>", "<a@>", "<a@b@c>", "<a\u00e9@b>"]:
        with pytest.raises(ValueError):
            headers.message_id_header(bad)


# --- Received --------------------------------------------------------------------


def test_received_ipv4_with_recipient() -> None:
    assert received() == (
        b"Received: from client.example (mx.client.example [192.0.2.7])\n"
        b"\tby mail.example.org (mailsrv) with ESMTP id 4Xb7Qd2kHpZ3\n"
        b"\tfor <alice@example.org>; " + DATE.encode() + b"\n"
    )


def test_received_without_recipient() -> None:
    assert received(recipient=None) == (
        b"Received: from client.example (mx.client.example [192.0.2.7])\n"
        b"\tby mail.example.org (mailsrv) with ESMTP id 4Xb7Qd2kHpZ3; " + DATE.encode() + b"\n"
    )


def test_received_unknown_reverse_name() -> None:
    value = received(reverse_name=None)
    assert value.startswith(b"Received: from client.example (unknown [192.0.2.7])\n")


def test_received_ipv6() -> None:
    value = received(client_ip="2001:db8:0:0::1", reverse_name=None, protocol="SMTP")
    assert value == (
        b"Received: from client.example (unknown [IPv6:2001:db8::1])\n"
        b"\tby mail.example.org (mailsrv) with SMTP id 4Xb7Qd2kHpZ3\n"
        b"\tfor <alice@example.org>; " + DATE.encode() + b"\n"
    )


def test_received_ipv4_mapped_ipv6_shown_as_ipv4() -> None:
    assert b"(mx.client.example [192.0.2.7])" in received(client_ip="::ffff:192.0.2.7")


def test_received_ipv6_zone_dropped() -> None:
    assert b"[IPv6:fe80::1])" in received(client_ip="fe80::1%eth0")


def test_received_bad_client_ip() -> None:
    with pytest.raises(ValueError):
        received(client_ip="not an address")


def test_received_naive_when_is_utc() -> None:
    assert received(when=WHEN.replace(tzinfo=None)) == received()


def test_received_other_timezone() -> None:
    tz = datetime.timezone(datetime.timedelta(hours=2))
    value = received(when=WHEN.astimezone(tz))
    assert value.endswith(b"; Sun, 22 Nov 2026 23:07:01 +0200\n")


@pytest.mark.parametrize("protocol", ["SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA"])
def test_received_protocols(protocol: str) -> None:
    assert f" with {protocol} id ".encode() in received(protocol=protocol)


@pytest.mark.parametrize("protocol", ["esmtp", "HTTP", "ESMTP\nX: y", "", "LMTP"])
def test_received_bad_protocol(protocol: str) -> None:
    with pytest.raises(ValueError):
        received(protocol=protocol)


def test_received_empty_helo() -> None:
    assert received(helo="").startswith(b"Received: from unknown (mx.client.example")


def test_received_date_parses() -> None:
    msg = parse(received())
    value = str(msg["Received"])
    date = value.rsplit(";", 1)[1].strip()
    assert email.utils.parsedate_to_datetime(date) == WHEN


INJECTIONS = [
    "evil.example\r\nX-Injected: 1",
    "evil.example\nX-Injected: 1",
    "evil.example\rX-Injected: 1",
    "evil (fake.example [10.0.0.1])",
    "evil) (by trusted.example",
    "evil; Sun, 1 Jan 2000 00:00:00 +0000",
    "evil\x00.example",
    "evil\\).example",
    "<evil>",
    "\u00e9vil.\u043f\u0440\u0438\u043c\u0435\u0440",
    "a" * 5000,
    "\r\n\r\nX-Injected: 1\r\n\r\n",
    "\t\x0b\x0c\x7f",
]


@pytest.mark.parametrize("evil", INJECTIONS)
def test_received_injection_in_helo(evil: str) -> None:
    check_one_received(received(helo=evil))


@pytest.mark.parametrize("evil", INJECTIONS)
def test_received_injection_in_reverse_name(evil: str) -> None:
    check_one_received(received(reverse_name=evil))


@pytest.mark.parametrize("evil", INJECTIONS)
def test_received_injection_in_recipient(evil: str) -> None:
    check_one_received(received(recipient=evil))


def test_received_injection_everywhere_at_once() -> None:
    evil = "x\r\nX-Injected: 1 (a; b) <c> \\"
    check_one_received(
        received(helo=evil, reverse_name=evil, recipient=evil, hostname=evil, queue_id=evil)
    )


def check_one_received(value: bytes) -> None:
    text = value.decode("ascii")  # ASCII only: raises otherwise
    lines = text.split("\n")
    assert lines[-1] == "" and all(line for line in lines[:-1])
    assert lines[0].startswith("Received: from ")
    assert all(line.startswith("\t") for line in lines[1:-1])
    assert "\r" not in text
    assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", text.replace("\n", ""))
    assert all(len(line) < 998 for line in lines)
    # Comments balanced: exactly our two "(...)" groups on the from/by lines.
    assert text.count("(") == text.count(")") == 2
    assert text.count(";") == 1 or "for <" in text  # the date separator (+ maybe in a quoted rcpt)
    assert text.rsplit(";", 1)[1].strip() == DATE
    msg = parse(value)
    assert len(msg.get_all("Received")) == 1
    assert msg.get("X-Injected") is None
    assert [key.lower() for key in msg] == ["received", "subject"]
    assert msg["Received"].defects == ()


def test_received_helo_capped() -> None:
    value = received(helo="h" * 1000, reverse_name="r" * 1000, recipient="x" * 1000)
    first = value.split(b"\n")[0]
    match = re.fullmatch(rb"Received: from (\S+) \((\S+) \[192\.0\.2\.7\]\)", first)
    assert match is not None
    assert match.group(1) == b"h" * 255
    assert match.group(2) == b"r" * 255
    assert all(len(line) < 998 for line in value.split(b"\n"))
    check_one_received(value)


def test_received_address_literal_helo_kept() -> None:
    assert received(helo="[192.0.2.7]").startswith(b"Received: from [192.0.2.7] (")
    assert received(helo="[IPv6:2001:db8::1]").startswith(b"Received: from [IPv6:2001:db8::1] (")


def test_with_clause_comment_for_later_tls_details() -> None:
    assert headers._with_clause("ESMTPS", "TLS1.3 TLS_AES_256_GCM_SHA384") == (
        "with ESMTPS (TLS1.3 TLS_AES_256_GCM_SHA384)"
    )
    assert headers._with_clause("ESMTPS", "x) (y\r\n") == "with ESMTPS (x? ?y)"


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        ('"john doe"@example.org', '"john doe"@example.org'),
        ('"a(b);c\\"d"@example.org', '"a(b);c\\"d"@example.org'),
        ('"unbalanced@example.org', "?unbalanced@example.org"),
        ('"a"b"@example.org', "?a?b?@example.org"),
        ("a(comment)@example.org", "a?comment?@example.org"),
        ("a b@example.org", "a?b@example.org"),
        ('"a"@x(y', "?a?@x?y"),
    ],
)
def test_received_recipient_quoting(address: str, shown: str) -> None:
    value = received(recipient=address)
    assert f"\tfor <{shown}>; {DATE}\n".encode() in value
    msg = parse(value)
    assert len(msg.get_all("Received")) == 1 and msg["Received"].defects == ()
    assert headers.return_path(address) == f"Return-Path: <{shown}>\n".encode()
