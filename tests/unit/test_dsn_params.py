"""Tests for the DSN parameters (RFC 3461): parsing, xtext, the replies, the queue envelope."""

from __future__ import annotations

import json

import pytest

from mailsrv import replies
from mailsrv.inbound.parameters import check_mail_parameters, check_rcpt_parameters
from mailsrv.replies import Refusal
from mailsrv.routing.address import parse_mail_from, parse_rcpt_to
from mailsrv.routing.dsn_params import (
    ENVID_MAX,
    ORCPT_MAX,
    MailDSN,
    RecipientDSN,
    mail_arguments,
    rcpt_arguments,
    xtext_decode,
    xtext_encode,
)
from mailsrv.storage.envelope import decode, encode, new_message

MAX_SIZE = 10_000_000


def mail(params: str, esmtp: bool = True) -> MailDSN:
    _, parsed = parse_mail_from(b"FROM:<a@example.org>" + params.encode())
    return check_mail_parameters(parsed, esmtp, MAX_SIZE)


def rcpt(params: str, esmtp: bool = True) -> RecipientDSN:
    _, parsed = parse_rcpt_to(b"TO:<b@example.org>" + params.encode())
    return check_rcpt_parameters(parsed, esmtp)


def refused(call, *args) -> str:
    with pytest.raises(Refusal) as exc:
        call(*args)
    return str(exc.value)


# --- xtext ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "encoded"), [
    ("bob@example.org", "bob@example.org"),
    ("a+b=c@example.org", "a+2Bb+3Dc@example.org"),
    ('"a b"@example.org', '"a+20b"@example.org'),
    ("", ""),
])
def test_xtext_round_trip(text: str, encoded: str) -> None:
    assert xtext_encode(text) == encoded
    assert xtext_decode(encoded) == text


@pytest.mark.parametrize("bad", ["a+2b", "a+2", "a+", "a=b", "a b", "a+ZZ", "a\x7fb", "é"])
def test_what_is_not_xtext(bad: str) -> None:
    assert xtext_decode(bad) is None  # lower-case hex, a cut hexchar, '=', space, non-ASCII


# --- MAIL: RET, ENVID ----------------------------------------------------------------------


def test_mail_without_dsn_parameters() -> None:
    assert mail("") == MailDSN() and mail(" SIZE=10 BODY=8BITMIME") == MailDSN()


@pytest.mark.parametrize(("params", "expected"), [
    (" RET=FULL", MailDSN(ret="FULL")),
    (" ret=hdrs", MailDSN(ret="HDRS")),
    (" ENVID=QQ314159", MailDSN(envid="QQ314159")),
    (" RET=HDRS ENVID=a+2Bb+20c", MailDSN(ret="HDRS", envid="a+b c")),
    (" ENVID=" + "x" * ENVID_MAX, MailDSN(envid="x" * ENVID_MAX)),
])
def test_mail_dsn_parameters(params: str, expected: MailDSN) -> None:
    assert mail(params) == expected


@pytest.mark.parametrize(("params", "reply"), [
    (" RET=BODY", "501 5.5.4 Error: bad value for parameter RET"),
    (" RET", "501 5.5.4 Error: bad value for parameter RET"),
    (" ENVID", "501 5.5.4 Error: bad value for parameter ENVID"),
    (" ENVID=" + "x" * (ENVID_MAX + 1), "501 5.5.4 Error: bad value for parameter ENVID"),
    (" ENVID=a+2b", "501 5.5.4 Error: bad value for parameter ENVID"),  # lower-case hex
    (" ENVID=a+0Ab", "501 5.5.4 Error: bad value for parameter ENVID"),  # a line break
    (" RET=FULL RET=HDRS", "501 5.5.4 Error: parameter RET given twice"),
    (" NOTIFY=NEVER", "501 5.5.4 Error: unsupported parameter NOTIFY"),  # RCPT's
    (" ORCPT=rfc822;a@b", "501 5.5.4 Error: unsupported parameter ORCPT"),
])
def test_mail_dsn_parameters_refused(params: str, reply: str) -> None:
    assert refused(mail, params) == reply


def test_dsn_parameters_need_ehlo() -> None:
    assert refused(mail, " RET=FULL", False) == "501 5.5.4 Error: parameter RET needs EHLO"
    assert refused(rcpt, " NOTIFY=NEVER", False) == (
        "501 5.5.4 Error: parameter NOTIFY needs EHLO")


# --- RCPT: NOTIFY, ORCPT -------------------------------------------------------------------


@pytest.mark.parametrize(("params", "expected"), [
    ("", RecipientDSN()),
    (" NOTIFY=NEVER", RecipientDSN(notify=("NEVER",))),
    (" NOTIFY=never", RecipientDSN(notify=("NEVER",))),
    (" NOTIFY=SUCCESS", RecipientDSN(notify=("SUCCESS",))),
    (" NOTIFY=delay,Failure,SUCCESS", RecipientDSN(notify=("SUCCESS", "FAILURE", "DELAY"))),
    (" NOTIFY=FAILURE,FAILURE", RecipientDSN(notify=("FAILURE",))),  # 1#: repeats allowed
    (" ORCPT=rfc822;bob+2Bx@example.org", RecipientDSN(orcpt="rfc822;bob+x@example.org")),
    (" ORCPT=RFC822;a@b NOTIFY=SUCCESS", RecipientDSN(("SUCCESS",), "RFC822;a@b")),
    (" ORCPT=x400;" + "y" * (ORCPT_MAX - 5), RecipientDSN(orcpt="x400;" + "y" * (ORCPT_MAX - 5))),
])
def test_rcpt_dsn_parameters(params: str, expected: RecipientDSN) -> None:
    assert rcpt(params) == expected


@pytest.mark.parametrize(("params", "name"), [
    (" NOTIFY=NEVER,SUCCESS", "NOTIFY"),  # NEVER stands alone
    (" NOTIFY=FAILURE,NEVER", "NOTIFY"),
    (" NOTIFY", "NOTIFY"),
    (" NOTIFY=SUCCESS,", "NOTIFY"),
    (" NOTIFY=ALWAYS", "NOTIFY"),
    (" ORCPT=bob@example.org", "ORCPT"),  # no address type
    (" ORCPT=;bob@example.org", "ORCPT"),
    (" ORCPT=rfc822;", "ORCPT"),
    (" ORCPT=rfc(822);a@b", "ORCPT"),
    (" ORCPT=rfc822;a+0Db@example.org", "ORCPT"),  # a CR, decoded
    (" ORCPT=rfc822;a+3db@example.org", "ORCPT"),  # lower-case hex
    (" ORCPT=x400;" + "y" * (ORCPT_MAX - 4), "ORCPT"),  # one past 500
])
def test_rcpt_dsn_parameters_refused(params: str, name: str) -> None:
    assert refused(rcpt, params) == f"501 5.5.4 Error: bad value for parameter {name}"


def test_rcpt_refuses_mail_parameters_and_repeats() -> None:
    assert refused(rcpt, " RET=FULL") == "501 5.5.4 Error: unsupported parameter RET"
    assert refused(rcpt, " SIZE=10") == "501 5.5.4 Error: unsupported parameter SIZE"
    assert refused(rcpt, " NOTIFY=NEVER NOTIFY=NEVER") == (
        "501 5.5.4 Error: parameter NOTIFY given twice")
    assert replies.DUPLICATE_PARAMETER.code == 501
    assert refused(rcpt, " NOTIFY=") == "501 5.5.4 Bad parameter syntax"  # any empty value


def test_the_arguments_for_the_next_hop_encode_again() -> None:
    assert mail_arguments(None, None) == b"" and rcpt_arguments(None, None) == b""
    assert mail_arguments("HDRS", "a+b c") == b" RET=HDRS ENVID=a+2Bb+20c"
    assert rcpt_arguments(("SUCCESS", "DELAY"), "rfc822;bob+x@example.org") == (
        b" NOTIFY=SUCCESS,DELAY ORCPT=rfc822;bob+2Bx@example.org")
    assert rcpt_arguments(("NEVER",), None) == b" NOTIFY=NEVER"
    # what we send parses back to what we stored
    assert rcpt(rcpt_arguments(("FAILURE",), "rfc822;a=b@x").decode()) == RecipientDSN(
        ("FAILURE",), "rfc822;a=b@x")


# --- the queue envelope -------------------------------------------------------------------


def envelope(**dsn) -> bytes:
    return encode(new_message("Q1", sender="a@example.org", recipients=["b@x.test", "c@x.test"],
                              prefix=b"", created=1.0, received_from="local", **dsn))


def test_an_envelope_without_dsn_is_as_it_always_was() -> None:
    data = json.loads(envelope())
    assert not {"ret", "envid"} & data.keys()
    assert all(not {"notify", "orcpt"} & r.keys() for r in data["recipients"])


def test_the_dsn_parameters_round_trip_through_the_envelope() -> None:
    raw = envelope(dsn=MailDSN("FULL", "id 1"), recipient_dsn={
        "b@x.test": RecipientDSN(("SUCCESS", "FAILURE"), "rfc822;B@x.test"),
        "c@x.test": RecipientDSN(("NEVER",))})
    data = json.loads(raw)
    assert (data["ret"], data["envid"]) == ("FULL", "id 1")
    assert data["recipients"][0]["notify"] == ["SUCCESS", "FAILURE"]
    assert data["recipients"][0]["orcpt"] == "rfc822;B@x.test"
    assert "orcpt" not in data["recipients"][1]
    message = decode(raw)
    assert (message.ret, message.envid) == ("FULL", "id 1")
    b, c = message.recipients
    assert (b.notify, b.orcpt, c.notify, c.orcpt) == (
        ("SUCCESS", "FAILURE"), "rfc822;B@x.test", ("NEVER",), None)
    assert encode(message) == raw
    assert b.wants("SUCCESS") and b.wants("FAILURE") and not b.wants("DELAY")
    assert not any(c.wants(kind) for kind in ("SUCCESS", "FAILURE", "DELAY"))
    plain = decode(envelope()).recipients[0]
    assert plain.wants("FAILURE") and plain.wants("DELAY") and not plain.wants("SUCCESS")


@pytest.mark.parametrize(("where", "key", "value"), [
    ("message", "ret", "BODY"),
    ("message", "ret", 1),
    ("message", "envid", "a\nb"),
    ("message", "envid", ""),
    ("recipient", "notify", ["NEVER", "SUCCESS"]),
    ("recipient", "notify", ["DELAY", "SUCCESS"]),  # not in the order we write
    ("recipient", "notify", []),
    ("recipient", "notify", "SUCCESS"),
    ("recipient", "orcpt", 5),
    ("recipient", "orcpt", "rfc822;\x00"),
])
def test_a_bad_dsn_field_makes_the_envelope_corrupt(where: str, key: str, value) -> None:
    data = json.loads(envelope())
    (data if where == "message" else data["recipients"][0])[key] = value
    with pytest.raises(ValueError, match="corrupt queue envelope"):
        decode(json.dumps(data).encode())
