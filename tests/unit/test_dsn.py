"""Tests for mailsrv.outbound.dsn, dsn_text and dsn_original: RFC 3464 bounces and delay warnings, and the
original's headers.

The output is checked the way a mail client reads it (the standard library's parser, with
LF and with CRLF line ends), and line by line for what the spool and the wire require.
"""

from __future__ import annotations

import datetime
import email
import email.message
import email.parser
import email.policy
import email.utils
import re
from dataclasses import replace

import pytest

from mailsrv.outbound.dsn import RecipientReport, build_dsn
from mailsrv.outbound.dsn_original import original_headers

NOW = 1_795_000_000.0
ARRIVAL = NOW - 3600
LAST = NOW - 60
UNTIL = NOW + 4 * 86400
HOST = "mx.example.org"
ORIGINAL = (
    b"Received: from client.test (client.test [127.0.0.1])\n"
    b"\tby mx.example.org (mailsrv) with ESMTP id Q1w2E3r4T5y6U7; Mon, 1 Nov 2026 10:00:00 +0000\n"
    b"From: Alice <alice@example.org>\n"
    b"To: Bob <bob@remote.test>\n"
    b"Subject: Quarterly figures\n"
    b"Message-ID: <123@example.org>\n"
)
TOP_FIELDS = [
    "From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version",
    "Content-Type", "Content-Transfer-Encoding",
]
RECIPIENT_FIELDS = {
    "Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
    "Last-Attempt-Date", "Will-Retry-Until",
}


def failed(address: str = "bob@remote.test", **overrides: object) -> RecipientReport:
    report = RecipientReport(
        address=address,
        action="failed",
        status="5.1.1",
        diagnostic=f"550 5.1.1 <{address}>: user unknown",
        remote_mta="mx1.remote.test",
        last_attempt=LAST,
    )
    return replace(report, **overrides)  # type: ignore[arg-type]


def delayed(address: str = "bob@remote.test", **overrides: object) -> RecipientReport:
    args: dict[str, object] = dict(action="delayed", status="4.2.2",
                                   diagnostic="452 4.2.2 mailbox full", will_retry_until=UNTIL)
    args.update(overrides)
    return failed(address, **args)


def build(*reports: RecipientReport, **overrides: object) -> bytes:
    args: dict[str, object] = dict(
        hostname=HOST,
        dsn_id="DSN42abc",
        queue_id="Q1w2E3r4T5y6U7",
        original_sender="alice@example.org",
        received_from="client.test[127.0.0.1]",
        arrival=ARRIVAL,
        recipients=list(reports) or [failed()],
        original_headers=ORIGINAL,
        now=NOW,
    )
    args.update(overrides)
    return build_dsn(**args)  # type: ignore[arg-type]


def parse(data: bytes, crlf: bool = False) -> email.message.EmailMessage:
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def parts(message: email.message.EmailMessage) -> list[email.message.EmailMessage]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return payload


def status_blocks(message: email.message.EmailMessage) -> list[email.message.Message]:
    """The delivery-status part's field blocks: per-message first, then one per recipient."""
    return parts(message)[1].get_payload()  # type: ignore[return-value]


def human(message: email.message.EmailMessage) -> str:
    return parts(message)[0].get_content()


def date_of(value: object) -> float:
    return email.utils.parsedate_to_datetime(str(value)).timestamp()


def boundary_of(data: bytes) -> str:
    boundary = parse(data).get_boundary()
    assert boundary
    return boundary


def check_lines(data: bytes) -> None:
    """LF line ends, lines within 998 octets, ASCII outside the original-headers part."""
    assert b"\r" not in data and b"\x00" not in data
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    assert max(len(line) for line in lines) <= 998
    headers_start = data.index(b"Content-Type: text/rfc822-headers")
    assert data[:headers_start].isascii()


# --- message structure ---------------------------------------------------------------


def test_top_level_header_fields() -> None:
    message = parse(build())
    assert list(message.keys()) == TOP_FIELDS
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.org"
    assert message["From"].addresses[0].display_name == "Mail Delivery System"
    assert message["To"].addresses[0].addr_spec == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"] == "<DSN42abc.dsn@mx.example.org>"
    assert message["MIME-Version"] == "1.0"
    assert date_of(message["Date"]) == NOW


@pytest.mark.parametrize("crlf", [False, True], ids=["LF", "CRLF"])
def test_multipart_report_with_three_parts(crlf: bool) -> None:
    message = parse(build(), crlf=crlf)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers",
    ]
    assert parts(message)[0].get_content_charset() == "us-ascii"
    for part in message.walk():
        assert not part.defects, part.defects


def test_delivery_status_fields() -> None:
    data = build(
        failed(),
        failed("carol@nx.test", status="5.1.10", diagnostic="Domain nx.test not found",
               remote_mta=None, last_attempt=None),
    )
    per_message, bob, carol = status_blocks(parse(data))
    assert per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert per_message["X-Mailsrv-Queue-ID"] == "Q1w2E3r4T5y6U7"
    assert date_of(per_message["Arrival-Date"]) == ARRIVAL

    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.remote.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.test>: user unknown"
    assert date_of(bob["Last-Attempt-Date"]) == LAST
    assert "Will-Retry-Until" not in bob

    # A DNS error: nobody answered, and the words are our own, not an SMTP reply.
    assert carol["Final-Recipient"] == "rfc822; carol@nx.test"
    assert carol["Status"] == "5.1.10"
    assert "Remote-MTA" not in carol and "Last-Attempt-Date" not in carol
    assert carol["Diagnostic-Code"] == "X-Mailsrv; Domain nx.test not found"


def test_no_diagnostic_no_diagnostic_code() -> None:
    [_, block] = status_blocks(parse(build(failed(diagnostic=None))))
    assert "Diagnostic-Code" not in block
    assert "<bob@remote.test>: delivery failed at host mx1.remote.test (status 5.1.1)" in (
        human(parse(build(failed(diagnostic=None)))))


def test_multiline_reply_is_one_field_value() -> None:
    reply = "550-5.7.1 Our policy does not allow this\n550 5.7.1 message. See the FAQ."
    [_, block] = status_blocks(parse(build(failed(diagnostic=reply))))
    assert block["Diagnostic-Code"] == (
        "smtp; 550-5.7.1 Our policy does not allow this 550 5.7.1 message. See the FAQ.")


@pytest.mark.parametrize("crlf", [False, True], ids=["LF", "CRLF"])
def test_long_diagnostic_is_folded_without_loss(crlf: bool) -> None:
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(80))
    data = build(failed(diagnostic=reply))
    [_, block] = status_blocks(parse(data, crlf=crlf))
    assert block["Diagnostic-Code"] == f"smtp; {reply}"
    section = data.split(b"Diagnostic-Code:", 1)[1].split(b"\nLast-Attempt-Date:", 1)[0]
    lines = section.split(b"\n")
    assert len(lines) > 3
    assert all(line.startswith(b" ") and len(line) <= 78 for line in lines[1:])


# --- the human-readable part ---------------------------------------------------------


def test_human_part_explains_and_quotes_remote_words() -> None:
    data = build(
        failed(),
        failed("carol@nx.test", status="5.1.10", diagnostic="Domain nx.test not found",
               remote_mta=None),
    )
    text = human(parse(data))
    assert "This is the mail system at host mx.example.org." in text
    assert "could not be delivered" in " ".join(text.split())
    assert "Q1w2E3r4T5y6U7" in text and "client.test[127.0.0.1]" in text
    assert ("<bob@remote.test>: host mx1.remote.test said: 550 5.1.1 <bob@remote.test>:"
            in text)
    assert "user unknown" in text
    assert "\n<carol@nx.test>: Domain nx.test not found\n" in text


def test_human_part_indents_continuation_lines() -> None:
    reply = "550-5.1.1 short\n550 5.1.1 " + "more " * 40
    text = human(parse(build(failed(diagnostic=reply))))
    entry = text[text.index("<bob@remote.test>:"):].rstrip("\n").split("\n")
    assert entry[0].startswith("<bob@remote.test>: host mx1.remote.test said: 550-5.1.1")
    assert len(entry) > 2
    assert entry[1] == "    550 5.1.1 more more more more more more more more more more more more"
    assert all(line.startswith("    ") and len(line) <= 76 for line in entry[1:])


# --- the original headers ------------------------------------------------------------


def test_headers_part_reproduces_original_headers() -> None:
    part = parts(parse(build()))[2]
    assert part["Content-Transfer-Encoding"] == "7bit"
    copy = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
        part.get_payload(decode=True))
    assert copy["Subject"] == "Quarterly figures"
    assert copy["Message-ID"] == "<123@example.org>"
    assert len(copy.get_all("Received")) == 1


def test_body_is_never_included() -> None:
    data = build(original_headers=ORIGINAL + b"\nThe secret figures are 42.\n")
    assert b"secret figures" not in data
    assert b"Subject: Quarterly figures\n" in data


def test_headers_part_ends_with_newline_and_may_be_empty() -> None:
    data = build(original_headers=b"Subject: no newline")
    assert parts(parse(data))[2].get_payload(decode=True) == b"Subject: no newline\n"
    empty = parse(build(original_headers=b""))
    assert [p.get_content_type() for p in parts(empty)][2] == "text/rfc822-headers"
    assert parts(empty)[2].get_payload(decode=True) == b""


def test_eight_bit_original_headers_are_kept_and_declared() -> None:
    data = build(original_headers=b"Subject: Gr\xc3\xbc\xc3\x9fe\nFrom: J\xe9r\xf4me <j@x.test>\n")
    assert b"Subject: Gr\xc3\xbc\xc3\x9fe\nFrom: J\xe9r\xf4me <j@x.test>\n" in data
    message = parse(data)
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert parts(message)[2]["Content-Transfer-Encoding"] == "8bit"
    check_lines(data)


def test_original_header_lines_are_made_safe() -> None:
    raw = b"Subject: " + b"x" * 3000 + b"\nX-Bad: a\x00b\rc\r\nX-After: ok\r\n"
    data = build(original_headers=raw)
    check_lines(data)
    copy = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
        parts(parse(data))[2].get_payload(decode=True))
    assert copy["X-Bad"] == "a?b?c" and copy["X-After"] == "ok"
    assert str(copy["Subject"]).replace(" ", "") == "x" * 3000


# --- hostile remote text -------------------------------------------------------------

HOSTILE = [
    "550 ok\r\n.\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\nDATA",
    "550 bye\n--DSN42abc.1795000000/mx.example.org--\nContent-Type: text/html\n\n<b>hi</b>",
    "550 bye\n\nBcc: victim@example.org\nSubject: injected",
    "550 nul\x00byte and\x0bvertical\x1b[31m escape\u2028separator\x85",
    "550 5.1.1 unicode: \u00fcber \u2603 \U0001f4a9 \ud800",
    "550 " + "A" * 5000,
    "550 " + ("word " * 1000 + "\n") * 3,
    "\r\n\r\n",
]


@pytest.mark.parametrize("diagnostic", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize("action", ["failed", "delayed"])
def test_hostile_diagnostic_cannot_inject(diagnostic: str, action: str) -> None:
    report = failed(diagnostic=diagnostic, remote_mta="evil\r\nBcc: x\n--DSN42abc",
                    action=action, status="5.1.1" if action == "failed" else "4.0.0",
                    will_retry_until=UNTIL)
    data = build(report, failed("carol@remote.test", action=action, status=report.status))
    check_lines(data)
    boundary = boundary_of(data)
    for line in data.split(b"\n"):
        # Only our delimiters start with "--"; remote words never start a line.
        if line.startswith(b"--"):
            assert line in (f"--{boundary}".encode(), f"--{boundary}--".encode())
        assert not line.startswith(
            (b"MAIL FROM", b"RCPT TO", b"Bcc:", b".", b"Content-Type: text/html"))
    for crlf in (False, True):
        message = parse(data, crlf=crlf)
        assert list(message.keys()) == TOP_FIELDS
        assert [p.get_content_type() for p in parts(message)] == [
            "text/plain", "message/delivery-status", "text/rfc822-headers",
        ]
        blocks = status_blocks(message)
        assert len(blocks) == 3
        for block in blocks[1:]:
            assert set(block.keys()) <= RECIPIENT_FIELDS
        assert blocks[2]["Final-Recipient"] == "rfc822; carol@remote.test"
        assert "\n<carol@remote.test>: host mx1.remote.test said:" in human(message)


def test_very_long_diagnostic_is_capped() -> None:
    data = build(failed(diagnostic="550 " + "blah " * 100_000))
    assert len(data) < 20_000
    [_, block] = status_blocks(parse(data))
    assert str(block["Diagnostic-Code"]).endswith("[...]")


# --- boundary ------------------------------------------------------------------------


def test_boundary_is_based_on_ids_and_absent_from_parts() -> None:
    data = build()
    boundary = boundary_of(data)
    assert boundary == "DSN42abc.1795000000/mx.example.org"
    body = data.split(b"\n\n", 1)[1]
    assert body.count(boundary.encode()) == 4  # three delimiters and the closing one
    for part in parts(parse(data)):
        assert boundary.encode() not in part.as_bytes()


def test_boundary_changes_when_original_headers_contain_it() -> None:
    base = "DSN42abc.1795000000/mx.example.org"
    trap = f"X-Trap: --{base}\nX-Trap2: --{base}=_1--\n".encode()
    data = build(original_headers=trap)
    boundary = boundary_of(data)
    assert boundary not in (base, f"{base}=_1")
    assert boundary.encode() not in trap
    copy = parts(parse(data))[2].get_payload(decode=True)
    assert copy == trap


def test_boundary_stays_within_70_characters() -> None:
    hostname = ".".join(["label" + "x" * 50] * 4)
    data = build(hostname=hostname)
    assert len(boundary_of(data)) <= 70
    assert len(parts(parse(data))) == 3
    check_lines(data)


# --- delay warnings ------------------------------------------------------------------


def test_delay_warning() -> None:
    message = parse(build(delayed(), delayed("carol@remote.test", will_retry_until=UNTIL - 10)))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    _, bob, carol = status_blocks(message)
    assert bob["Action"] == "delayed" and bob["Status"] == "4.2.2"
    assert date_of(bob["Will-Retry-Until"]) == UNTIL
    assert date_of(carol["Will-Retry-Until"]) == UNTIL - 10
    text = " ".join(human(message).split())
    assert "has not yet been delivered" in text
    assert "YOU DO NOT NEED TO RESEND YOUR MESSAGE" in text
    until = email.utils.format_datetime(
        datetime.datetime.fromtimestamp(UNTIL, datetime.timezone.utc))
    assert f"it will be retried until {until}." in text


def test_will_retry_until_only_for_delayed() -> None:
    [_, block] = status_blocks(parse(build(failed(will_retry_until=UNTIL))))
    assert "Will-Retry-Until" not in block


# --- postmaster notices (double bounces) ----------------------------------------------


def test_postmaster_notice_of_a_failed_bounce() -> None:
    bounce_head = (b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\n"
                   b"To: <bob@remote.test>\nSubject: Undelivered Mail Returned to Sender\n")
    message = parse(build(original_sender="", postmaster="postmaster@example.org",
                          original_headers=bounce_head))
    assert message["To"].addresses[0].addr_spec == "postmaster@example.org"
    assert message["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert message.get_content_type() == "multipart/report"
    text = " ".join(human(message).split())
    assert "from the null sender <>" in text and "comes to the postmaster" in text
    assert "please send mail to postmaster" not in text
    [_, block] = status_blocks(message)
    assert block["Final-Recipient"] == "rfc822; bob@remote.test" and block["Status"] == "5.1.1"
    assert parts(message)[2].get_payload().startswith("From: Mail Delivery System")
    # The bare RFC 5321 <postmaster> is an address too.
    assert b"\nTo: <postmaster>\n" in build(original_sender="", postmaster="postmaster")


@pytest.mark.parametrize(
    "overrides, why",
    [({"postmaster": "pm@x>\nBcc: y@z"}, "postmaster address"),
     ({"postmaster": "postmaster@example.org", "recipients": [delayed()]}, "failures only")],
)
def test_postmaster_notice_refused_arguments(overrides: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        build(original_sender="", **overrides)


# --- refused input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, reports, why",
    [
        ({"original_sender": ""}, [failed()], "never bounced"),
        ({"original_sender": "alice@example.org>\nBcc: x@y"}, [failed()], "sender address"),
        ({"recipients": []}, [], "at least one recipient"),
        ({}, [failed(), delayed("carol@remote.test")], "all 'failed' or all 'delayed'"),
        ({}, [failed(action="expanded")], "all 'failed' or all 'delayed'"),
        ({"dsn_id": "../etc"}, [failed()], "DSN queue id"),
        ({"hostname": "mx.example.org>\nBcc: x"}, [failed()], "host name"),
        ({}, [failed(), failed("c@remote.test", action="relayed")], "all 'failed' or all"),
        ({"envid": "a\nBcc: x@y"}, [failed()], "envelope id"),
        ({}, [failed(original_recipient="rfc822;a\rb")], "original recipient"),
        ({"original_message": b"Subject: x\n\nbody\n"}, [failed(action="relayed", status="2.0.0")],
         "only a failure report"),
        ({"postmaster": "postmaster@example.org", "original_sender": ""},
         [failed(action="delivered", status="2.0.0")], "failures only"),
    ],
    ids=["empty-sender", "bad-sender", "no-recipients", "mixed-actions", "unknown-action",
         "bad-dsn-id", "bad-hostname", "failed-and-relayed", "bad-envid", "bad-orcpt",
         "whole-message-on-success", "postmaster-success"],
)
def test_refused_arguments(
    overrides: dict[str, object], reports: list[RecipientReport], why: str
) -> None:
    # match= makes sure it is our check that refuses, not a later encode("ascii") failing.
    with pytest.raises(ValueError, match=re.escape(why)):
        build(*reports, **overrides) if reports else build(**overrides)


@pytest.mark.parametrize("status", ["5.1", "6.1.1", "5.1.1234", "5.1.1\n", "5.\u0661.1", "", "x"])
def test_bad_status_is_refused(status: str) -> None:
    with pytest.raises(ValueError, match="enhanced status code"):
        build(failed(status=status))


@pytest.mark.parametrize(
    "address",
    ["", "bob @remote.test", "bob@remote.test\r\nBcc: x@y", "b\u202eb@remote.test",
     "bob@remote.test>, <victim@x.test", "bob(comment)@remote.test", "x" * 600 + "@a.test"],
)
def test_bad_address_is_refused(address: str) -> None:
    with pytest.raises(ValueError, match="recipient address"):
        build(failed(address))


def test_quoted_local_part_and_literal_are_accepted() -> None:
    data = build(failed('"john doe"@remote.test'), failed("bob@[192.0.2.1]"),
                 failed("postmaster"))
    _, john, literal, postmaster = status_blocks(parse(data))
    assert john["Final-Recipient"] == 'rfc822; "john doe"@remote.test'
    assert literal["Final-Recipient"] == "rfc822; bob@[192.0.2.1]"
    assert postmaster["Final-Recipient"] == "rfc822; postmaster"


# --- original_headers ----------------------------------------------------------------


def test_original_headers_stops_at_empty_line() -> None:
    assert original_headers(ORIGINAL + b"\nBody: not a header\nmore\n") == ORIGINAL


def test_original_headers_without_body() -> None:
    assert original_headers(ORIGINAL) == ORIGINAL
    assert original_headers(ORIGINAL + b"\n") == ORIGINAL
    assert original_headers(b"") == b""
    assert original_headers(b"\nbody only\n") == b""


def test_original_headers_drops_partial_last_line() -> None:
    assert original_headers(ORIGINAL + b"X-Cut-Off: half a li") == ORIGINAL


def test_original_headers_limit_cuts_at_line_boundary() -> None:
    lines = ORIGINAL.splitlines(keepends=True)
    first_two = len(lines[0]) + len(lines[1])
    assert original_headers(ORIGINAL, limit=first_two) == lines[0] + lines[1]
    assert original_headers(ORIGINAL, limit=first_two - 1) == lines[0]
    assert original_headers(ORIGINAL, limit=first_two + len(lines[2]) - 1) == lines[0] + lines[1]
    assert original_headers(ORIGINAL, limit=0) == b""


def test_original_headers_keeps_eight_bit_octets() -> None:
    head = b"Subject: Gr\xfc\xdfe\nFrom: \xe2\x98\x83 <s@x.test>\n\nbody\n"
    assert original_headers(head) == b"Subject: Gr\xfc\xdfe\nFrom: \xe2\x98\x83 <s@x.test>\n"


def test_original_headers_ends_at_non_field_line() -> None:
    head = b"Subject: a\n folded\n\tmore\nnot a header line\nX-Late: no\n\n"
    assert original_headers(head) == b"Subject: a\n folded\n\tmore\n"
    assert original_headers(b" leading continuation\nSubject: a\n\n") == b""
    assert original_headers(b"Subject: a\r\n\r\nbody\r\n") == b"Subject: a\r\n"


def test_original_headers_feed_build_dsn() -> None:
    head = original_headers(ORIGINAL + b"\nsecret body\n")
    data = build(original_headers=head)
    assert b"secret body" not in data
    assert parts(parse(data))[2].get_payload(decode=True) == ORIGINAL


def test_original_headers_end_at_a_name_with_space_before_its_colon() -> None:
    # The current field syntax only (headsection.is_field(obsolete=False)), as always.
    head = b"Subject: hi\nFrom : x@y\nTo: z@y\n\nbody\n"
    assert original_headers(head) == b"Subject: hi\n"
    assert original_headers(b"Subject: hi\n folded\nTo: z@y\n\n") == (
        b"Subject: hi\n folded\nTo: z@y\n")
