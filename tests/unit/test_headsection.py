"""Tests for mailsrv.message.headsection: reading a message's header section as mail readers do."""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import io

import pytest

from mailsrv.message import headsection
from mailsrv.message.headers import needs_separator
from mailsrv.message.headsection import HEADER_SECTION_LIMIT, HeaderFacts, inspect_head, read_head

ALICE = ("From", "alice@example.test")


def read(message: bytes, limit: int = HEADER_SECTION_LIMIT) -> HeaderFacts:
    """What the delivery code sees: read_head on the spool, then inspect_head."""
    return inspect_head(read_head(io.BytesIO(message), limit), limit)


# --- the facts -------------------------------------------------------------------


def test_inspect_normal_headers() -> None:
    head = (
        b"Received: from a by b; Sun, 22 Nov 2026 21:00:00 +0000\n"
        b"Received: from c by d; Sun, 22 Nov 2026 20:00:00 +0000\n"
        b"From: Alice <alice@example.org>\n"
        b"Message-ID: <1@example.org>\n"
        b"Subject: hi\n"
        b"\n"
        b"Hello\n"
    )
    assert inspect_head(head) == HeaderFacts(
        has_header_section=True, has_message_id=True, received_count=2,
        originators=(("From", "alice@example.org"),),
    )


def test_inspect_date_and_from_addresses() -> None:
    head = (
        b"Date: Sun, 22 Nov 2026 21:00:00 +0000\n"
        b"From: \"Sales, EU\" <Sales@Example.org>,\n"
        b"  bob@example.org (Bob)\n"
        b"Subject: From: mallory@evil.test\n"
        b"\n"
        b"From: notaheader@example.org\n"
    )
    facts = inspect_head(head)
    assert facts.has_date
    assert facts.originators == (("From", "sales@example.org"), ("From", "bob@example.org"))
    assert facts.ambiguity is None
    assert not inspect_head(b"Subject: x\n\nDate: y\n").has_date


def test_every_originator_field_and_every_address_in_them() -> None:
    head = (
        b"From: bob@example.test\n"
        b"sender: Bob <bob@example.test>\n"
        b"Resent-From: carol@example.test,\n\tdave@example.test\n"
        b"RESENT-SENDER: erin@example.test\n"
        b"From: Alice <alice@example.test>\n"
        b"\n"
    )
    assert inspect_head(head).originators == (
        ("From", "bob@example.test"), ("Sender", "bob@example.test"),
        ("Resent-From", "carol@example.test"), ("Resent-From", "dave@example.test"),
        ("Resent-Sender", "erin@example.test"), ALICE,
    )


def test_an_address_in_a_display_name_or_comment_is_checked_too() -> None:
    facts = inspect_head(b'From: "Alice <alice@example.test>" <bob@example.test>\n\n')
    assert ALICE in facts.originators and ("From", "bob@example.test") in facts.originators
    facts = inspect_head(b"From: bob@example.test (on behalf of <alice@example.test>)\n\n")
    assert ALICE in facts.originators


@pytest.mark.parametrize("value", [
    b"alice@example.test)<bob@example.test>",  # parsers lose their way differently
    b"undisclosed-recipients:;",
    b"<>",
    b"bob@example.test, , alice@example.test",
])
def test_an_originator_field_without_a_readable_address_list_is_ambiguous(value: bytes) -> None:
    facts = inspect_head(b"Subject: x\nFrom: " + value + b"\n\nbody\n")
    assert facts.ambiguity == "From: field without a readable address list"


def test_an_empty_originator_field_has_no_address() -> None:
    facts = inspect_head(b"Subject: x\nFrom:  \n\nbody\n")
    assert facts.originators == () and facts.ambiguity is None


def test_inspect_folded_headers() -> None:
    head = (
        b"Received: from a\n"
        b"\tby b with ESMTP id X\n"
        b"\tfor <x@example.org>; Sun, 22 Nov 2026 21:00:00 +0000\n"
        b"Subject: a long\n"
        b" subject\n"
        b"Received: from c\n"
        b"    by d; Sun, 22 Nov 2026 20:00:00 +0000\n"
        b" \n"  # a line of white space only: a continuation (obs-FWS)
        b"\n"
        b"body\n"
    )
    facts = inspect_head(head)
    assert facts.has_header_section and facts.ambiguity is None
    assert facts.received_count == 2
    assert not facts.has_message_id


def test_inspect_folded_line_looking_like_a_field_is_a_continuation() -> None:
    head = b"Subject: x\n Received: not a field\n From: alice@example.test\n\nbody\n"
    facts = inspect_head(head)
    assert facts.received_count == 0 and facts.originators == ()


def test_inspect_no_headers() -> None:
    facts = inspect_head(b"Hello Bob,\nReceived: this is body text\n")
    assert facts == HeaderFacts(has_header_section=False, has_message_id=False, received_count=0)


def test_inspect_empty_message() -> None:
    assert inspect_head(b"") == HeaderFacts(False, False, 0)


def test_inspect_message_starting_with_blank_line() -> None:
    facts = inspect_head(b"\nReceived: x\nMessage-ID: <a@b>\nFrom: alice@example.test\n")
    assert facts == HeaderFacts(False, False, 0)


def test_inspect_leading_continuation_is_not_a_header_section() -> None:
    assert inspect_head(b" Received: x\nSubject: y\n\n") == HeaderFacts(False, False, 0)


def test_inspect_received_case_insensitive_and_only_in_header_section() -> None:
    head = (
        b"RECEIVED: from a\n"
        b"received: from b\n"
        b"ReCeIvEd: from c\n"
        b"Received : obsolete form with space, read as a field like readers do\n"
        b"Subject: hi\n"
        b"\n"
        b"Received: from the body\n"
        b"Received: from the body\n"
    )
    assert inspect_head(head).received_count == 4


def test_inspect_header_section_ends_at_non_field_line_for_counting() -> None:
    facts = inspect_head(b"Received: a\nthis is not a header\nReceived: b\n")
    assert facts.received_count == 1
    assert facts.ambiguity == "line 2 is neither a header field nor a continuation"


@pytest.mark.parametrize("name", [b"Message-ID", b"message-id", b"MESSAGE-ID", b"Message-Id"])
def test_inspect_message_id_any_case(name: bytes) -> None:
    assert inspect_head(b"Subject: x\n" + name + b": <a@b>\n\nbody\n").has_message_id


def test_inspect_message_id_in_body_does_not_count() -> None:
    assert not inspect_head(b"Subject: x\n\nMessage-ID: <a@b>\n").has_message_id


def test_inspect_tolerates_crlf() -> None:
    facts = inspect_head(b"Received: a\r\nMessage-ID: <a@b>\r\n\r\nReceived: body\r\n")
    assert facts == HeaderFacts(True, True, 1)


# --- the bypasses of issue 11: each one is read as a reader would, or is ambiguous ---------


@pytest.mark.parametrize("message", [
    b"Subject: x\nFrom : alice@example.test\n\nbody\n",  # SP before the colon (obs-optional)
    b"Subject: x\nFrom\t: alice@example.test\n\nbody\n",  # HTAB before the colon
    b"From \t : alice@example.test\nSubject: x\n\nbody\n",  # first line, mixed WSP
    b"Subject: x\nfROM: alice@example.test\n\nbody\n",
    b"From: bob@example.test\nSender: alice@example.test\n\nbody\n",
    b"From: bob@example.test\nResent-From: alice@example.test\n\nbody\n",
    b"From: bob@example.test\nFrom: alice@example.test\n\nbody\n",  # a second From:
    b"From: bob@example.test,\n alice@example.test\n\nbody\n",  # folded list
])
def test_obsolete_and_repeated_originator_fields_are_read(message: bytes) -> None:
    facts = read(message)
    assert facts.ambiguity is None
    assert ("alice@example.test" in {address for _, address in facts.originators})


@pytest.mark.parametrize(("message", "line"), [
    (b"Subject: x\nX-Junk\nFrom: alice@example.test\n\nbody\n", 2),  # no colon
    (b"Subject: x\nX-\xe9t\xe9: y\nFrom: alice@example.test\n\nbody\n", 2),  # 8-bit in a name
    (b"Subject: x\nX-\x00: y\nFrom: alice@example.test\n\nbody\n", 2),  # NUL in a name
    (b"Subject: x\n: x\nFrom: alice@example.test\n\nbody\n", 2),  # empty name
    (b"From: bob@example.test\nnot a header\nFrom: alice@example.test\n\nbody\n", 2),
    (b"Subject: x\nFr om: alice@example.test\n\nbody\n", 2),  # WSP inside a name
    (b"Subject: x\nFrom\x0b: alice@example.test\n\nbody\n", 2),  # a control before the colon
])
def test_a_line_neither_field_nor_continuation_makes_the_section_ambiguous(
    message: bytes, line: int
) -> None:
    facts = read(message)
    assert facts.ambiguity == f"line {line} is neither a header field nor a continuation"


def test_a_nul_in_a_field_value_makes_the_section_ambiguous() -> None:
    facts = read(b"Subject: x\nFrom: bob@example.test\x00alice@example.test\n\nbody\n")
    assert facts.ambiguity == "NUL octet in the header section"


@pytest.mark.parametrize("first", [b"X-Junk", b"X-\xe9t\xe9: y", b"X-\x00: y", b": x",
                                   b" folded first", b"From alice@example.test Sun Nov 22"])
def test_a_first_line_that_is_no_field_makes_everything_body(first: bytes) -> None:
    # Nothing to refuse: the server puts an empty line before it, so no reader sees a field.
    message = first + b"\nFrom: alice@example.test\n\nbody\n"
    facts = read(message)
    assert facts == HeaderFacts(False, False, 0)
    assert needs_separator(message)


def test_a_from_after_66_kb_of_header_lines_is_read() -> None:
    padding = b"".join(b"X-Pad-%05d: %s\n" % (i, b"p" * 60) for i in range(900))
    assert len(padding) > 66_000
    facts = read(b"Subject: x\n" + padding + b"From: alice@example.test\n\nbody\n" * 1000)
    assert facts.originators == (ALICE,)
    assert facts.ambiguity is None and not facts.too_long


def field_lines(size: int) -> bytes:
    """A header section of exactly *size* octets, its last field a From:."""
    last = b"From: alice@example.test\n"
    pad = size - len(last)
    lines = []
    while pad > 0:
        n = min(pad, 900)
        if pad - n and pad - n < 20:
            n = pad - 20
        lines.append(b"X-P: " + b"a" * (n - 6) + b"\n")
        pad -= n
    section = b"".join(lines) + last
    assert len(section) == size
    return section


def test_header_section_limit_and_one_past_it() -> None:
    at_limit = read(field_lines(HEADER_SECTION_LIMIT) + b"\nbody\n" * 10)
    assert not at_limit.too_long and at_limit.originators == (ALICE,)
    past = read(field_lines(HEADER_SECTION_LIMIT + 1) + b"\nbody\n" * 10)
    assert past.too_long and past.ambiguity is None
    # Without an empty line: the end of the message ends the section.
    assert not read(field_lines(HEADER_SECTION_LIMIT)).too_long
    assert read(field_lines(HEADER_SECTION_LIMIT + 1)).too_long


def test_a_long_bare_body_is_not_a_long_header_section() -> None:
    facts = read(b"Hello\n" * 400_000)
    assert facts == HeaderFacts(False, False, 0)


def test_read_head_stops_at_the_end_of_the_section() -> None:
    small = b"Subject: x\n\n" + b"body\n" * 100_000
    assert len(read_head(io.BytesIO(small))) == 65536  # one read
    bare = b"Hello\n" + b"body\n" * 100_000
    assert len(read_head(io.BytesIO(bare))) == 65536
    assert read_head(io.BytesIO(b"Subject: x\n")) == b"Subject: x\n"


# Messages a reader could show with a From:/Sender:/Resent-From: field.
READER_CASES = [
    b"Subject: x\nFrom : alice@example.test\n\nbody\n",
    b"From: bob@example.test\nX-Junk\nFrom: alice@example.test\n\n",
    b"From: bob@example.test\n\nFrom: alice@example.test\n",
    b"Sender: alice@example.test\nFrom: bob@example.test\n\n",
    b'From: "x" <alice@example.test>, bob@example.test\n\n',
    b"Resent-From:\n alice@example.test\n\n",
]


@pytest.mark.parametrize("message", READER_CASES)
def test_what_pythons_reader_shows_is_checked_or_refused(message: bytes) -> None:
    facts = read(message)
    if facts.ambiguity is not None:
        return
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(message)
    shown = {
        address.lower()
        for name in ("From", "Sender", "Resent-From", "Resent-Sender")
        for _, address in email.utils.getaddresses(parsed.get_all(name, []))
    }
    assert shown <= {address for _, address in facts.originators}


# --------------------------------------------------------------------------- the field reader


@pytest.mark.parametrize(
    ("line", "name", "strict_name"),
    [
        (b"From: a@b", b"From", b"From"),
        (b"From : a@b", b"From", None),  # obs-optional WSP: a field to readers
        (b"X-Tab\t:x", b"X-Tab", None),
        (b"Subject:", b"Subject", b"Subject"),
        (b" folded: x", None, None),  # a continuation starts no field
        (b"no colon here", None, None),
        (b": no name", None, None),
        (b"Bad Name: x", None, None),  # SP inside a name
        (b"", None, None),
    ],
)
def test_field_name_and_is_field(
    line: bytes, name: bytes | None, strict_name: bytes | None
) -> None:
    assert headsection.field_name(line) == name
    assert headsection.is_field(line) is (name is not None)
    assert headsection.field_name(line, obsolete=False) == strict_name
    assert headsection.is_field(line, obsolete=False) is (strict_name is not None)


def test_sendmail_and_dsn_read_fields_with_headsection() -> None:
    from mailsrv.outbound import dsn_original, mime7bit
    from mailsrv.tools import sendmail_message

    assert sendmail_message.is_field is headsection.is_field
    assert sendmail_message.field_name is headsection.field_name
    assert dsn_original.is_field is headsection.is_field
    assert mime7bit.is_field is headsection.is_field
