"""SMTPUTF8 (RFC 6531-6533), in process: the paths with and without the keyword, local parts
in NFC, UTF-8 mailbox names that stay safe on code points, the queue's flag, the Received:
keyword, and the relay client's choice (the keyword, or a 5.6.7/5.6.9 verdict)."""

from __future__ import annotations

import email
import email.policy
import unicodedata
from pathlib import Path

import pytest
from twisted.internet import task

from mailsrv.accounts.files import read_users
from mailsrv.config import ConfigError
from mailsrv.inbound.parameters import check_mail_parameters
from mailsrv.message import headers
from mailsrv.outbound.utf8 import needs_smtputf8, utf8_verdicts
from mailsrv.replies import Refusal
from mailsrv.routing.address import Mailbox, fold_local, is_safe_local_part, parse_mail_from, parse_rcpt_to
from mailsrv.routing.router import Directory, LocalTarget
from mailsrv.storage import envelope
from support.inprocess import Core, make_runtime

JOERG_NFD = "jo\u0308rg"  # o + COMBINING DIAERESIS
NON_ASCII = (553, "5.6.7", "Non-ASCII address without the SMTPUTF8 parameter")


def refusal(call, *args) -> tuple[int, str, str]:
    with pytest.raises(Refusal) as exc:
        call(*args)
    return exc.value.code, exc.value.status, exc.value.text


# --- the parser ------------------------------------------------------------------------


def test_utf8_paths_need_the_keyword() -> None:
    assert refusal(parse_mail_from, "FROM:<jörg@example.org>".encode()) == NON_ASCII
    assert refusal(parse_rcpt_to, "TO:<jörg@example.org>".encode()) == NON_ASCII
    assert refusal(parse_rcpt_to, "TO:<jörg@example.org>".encode(), False) == NON_ASCII
    sender, params = parse_mail_from("FROM:<jörg@bücher.example> SMTPUTF8".encode())
    assert sender == Mailbox("jörg", "xn--bcher-kva.example") and params == {"SMTPUTF8": None}
    # The keyword in any case, among other parameters.
    sender, _ = parse_mail_from("FROM:<jörg@example.org> BODY=8BITMIME smtputf8".encode())
    assert sender == Mailbox("jörg", "example.org")


@pytest.mark.parametrize("written, local, domain", [
    ("jörg@example.org", "jörg", "example.org"),
    (f"{JOERG_NFD}@example.org", "jörg", "example.org"),  # NFC
    ("Jörg@Bücher.Example", "Jörg", "xn--bcher-kva.example"),  # case kept, domain A-label
    ("jörg@xn--bcher-kva.example", "jörg", "xn--bcher-kva.example"),
    ('"jörg müller"@example.org', "jörg müller", "example.org"),
    ("用户@例子.广告", "用户", "例子.广告".encode("idna").decode()),
    ("θσερ@example.org", "θσερ", "example.org"),
])
def test_utf8_rcpt_with_the_keyword(written: str, local: str, domain: str) -> None:
    mailbox, _ = parse_rcpt_to(f"TO:<{written}>".encode(), True)
    assert (mailbox.local, mailbox.domain) == (local, domain)
    assert unicodedata.is_normalized("NFC", mailbox.local)


@pytest.mark.parametrize("path", [
    b"<j\xc3rg@example.org>",  # not UTF-8
    b"<j\xed\xa0\x80rg@example.org>",  # an encoded surrogate
    "<j\u202eröj@example.org>".encode(),  # RIGHT-TO-LEFT OVERRIDE
    "<jö\u200brg@example.org>".encode(),  # ZERO WIDTH SPACE
    "<jö\u00a0rg@example.org>".encode(),  # NO-BREAK SPACE
    "<jö\u2028rg@example.org>".encode(),  # LINE SEPARATOR
    "<jö\ue000rg@example.org>".encode(),  # private use
    "<jörg@bü_cher.example>".encode(),  # not a host name
])
def test_bad_utf8_paths_are_bad_syntax(path: bytes) -> None:
    assert refusal(parse_rcpt_to, b"TO:" + path, True)[:2] == (553, "5.1.3")
    assert refusal(parse_mail_from, b"FROM:" + path + b" SMTPUTF8")[:2] == (553, "5.1.7")


def test_local_part_limit_is_64_octets_of_utf8() -> None:
    assert parse_rcpt_to(("TO:<" + "ö" * 32 + "@example.org>").encode(), True)[0].local == "ö" * 32
    code, status, text = refusal(parse_rcpt_to, ("TO:<" + "ö" * 32 + "a@example.org>").encode(), True)
    assert (code, status) == (553, "5.1.3") and "local part longer than 64 octets" in text


def test_path_limit_is_256_octets_of_utf8() -> None:
    domain = ".".join(["ü" * 20] * 6) + ".example"  # 244 octets of UTF-8 as written
    path = f"<ab@{domain}>".encode()
    assert len(path) > 256
    assert refusal(parse_rcpt_to, b"TO:" + path, True)[:2] == (553, "5.1.3")


def test_smtputf8_parameter_takes_no_value_and_needs_ehlo() -> None:
    check_mail_parameters({"SMTPUTF8": None}, True, 1000)
    assert refusal(check_mail_parameters, {"SMTPUTF8": "yes"}, True, 1000) == (
        501, "5.5.4", "Error: bad value for parameter SMTPUTF8")
    assert refusal(check_mail_parameters, {"SMTPUTF8": None}, False, 1000) == (
        501, "5.5.4", "Error: parameter SMTPUTF8 needs EHLO")


# --- local parts as names -----------------------------------------------------------------


def test_fold_local_is_lower_case_nfc() -> None:
    assert fold_local("JO\u0308RG") == "jörg" == fold_local("Jörg")
    assert fold_local("ÖRJAN") == "örjan"


@pytest.mark.parametrize("name", [
    "jörg", "örjan.svensson", "用户", "θσερ", "jörg+tag", "müller-lüdenscheidt",
])
def test_utf8_mailbox_names_that_are_safe(name: str) -> None:
    assert is_safe_local_part(name)


@pytest.mark.parametrize("name", [
    "a/b", "..", "a..b", ".jörg", "jörg\0", "jörg\n", "a\\b",
    JOERG_NFD,  # not NFC: two names, one mailbox
    "jörg\uff0fetc",  # FULLWIDTH SOLIDUS
    "jörg\uff3cetc",  # FULLWIDTH REVERSE SOLIDUS
    "\uff0e\uff0e",  # FULLWIDTH FULL STOPs
    "jörg\u2024x",  # ONE DOT LEADER
    "jörg\u2025x",  # TWO DOT LEADER
    "jörg\u2026",  # HORIZONTAL ELLIPSIS
    "jörg\ufe52x",  # SMALL FULL STOP
    "jörg\u2215etc",  # DIVISION SLASH
    "jörg\u2044etc",  # FRACTION SLASH
    "jörg\u29f8etc",  # BIG SOLIDUS
    "jörg\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "jörg\u2066x",  # LEFT-TO-RIGHT ISOLATE
    "jö\u200drg",  # ZERO WIDTH JOINER
    "jö\u00adrg",  # SOFT HYPHEN
    "jörg\ufeff",  # BYTE ORDER MARK
    "jörg\u0085",  # NEXT LINE (C1 control)
    "jörg\ud800",  # lone surrogate
    "ö" * 33,  # 66 octets
])
def test_hostile_mailbox_names_are_refused(name: str) -> None:
    assert not is_safe_local_part(name)


def test_router_finds_a_utf8_mailbox_however_it_is_written(tmp_path: Path) -> None:
    d = Directory(["example.org", "bücher.example"],
                  frozenset({"jörg@example.org", "jörg@xn--bcher-kva.example",
                             "postmaster@example.org", "postmaster@xn--bcher-kva.example"}), {})
    for written in ("jörg@example.org", "Jörg@example.org", f"{JOERG_NFD}@example.org"):
        mailbox, _ = parse_rcpt_to(f"TO:<{written}>".encode(), True)
        assert d.resolve(mailbox) == (LocalTarget("example.org", "jörg"),)
    for written in ("jörg@bücher.example", "JÖRG@xn--bcher-kva.example"):
        mailbox, _ = parse_rcpt_to(f"TO:<{written}>".encode(), True)
        assert d.resolve(mailbox) == (LocalTarget("xn--bcher-kva.example", "jörg"),)
    assert LocalTarget("xn--bcher-kva.example", "jörg").maildir(tmp_path) == (
        tmp_path / "xn--bcher-kva.example" / "jörg")


def test_users_file_takes_utf8_names_in_nfc(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("Jörg@Bücher.example\npostmaster@example.org\n用户@example.org\n")
    assert set(read_users(path)) == {
        "jörg@xn--bcher-kva.example", "postmaster@example.org", "用户@example.org"}
    path.write_text(f"{JOERG_NFD}@example.org\n")
    with pytest.raises(ConfigError, match="NFC"):
        read_users(path)
    path.write_text("jörg\uff0fx@example.org\n")
    with pytest.raises(ConfigError, match="slash-like"):
        read_users(path)


# --- the session ----------------------------------------------------------------------------


@pytest.fixture
def utf8_runtime(tmp_path):
    runtime = make_runtime(tmp_path, task.Clock())
    runtime.directory = Directory(
        ["example.org"], frozenset({"alice@example.org", "jörg@example.org"}), {})
    return runtime


def test_ehlo_offers_smtputf8_and_helo_cannot_use_it(utf8_runtime) -> None:
    core = Core(utf8_runtime)
    assert "250-SMTPUTF8" in core.send("EHLO client.test")[0].split("\r\n")
    core = Core(utf8_runtime)
    core.send("HELO client.test")
    assert core.send("MAIL FROM:<a@client.test> SMTPUTF8") == [
        "501 5.5.4 Error: parameter SMTPUTF8 needs EHLO"]


def test_utf8_recipient_refused_without_the_keyword(utf8_runtime) -> None:
    core = Core(utf8_runtime)
    core.greet()
    assert core.send("MAIL FROM:<jörg@example.net>") == [
        "553 5.6.7 Non-ASCII address without the SMTPUTF8 parameter"]
    assert core.send("MAIL FROM:<a@example.net>", "RCPT TO:<jörg@example.org>") == [
        "250 2.1.0 Ok", "553 5.6.7 Non-ASCII address without the SMTPUTF8 parameter"]
    # Anything else 8-bit is still no command.
    assert core.send_bytes(b"NOOP \xc3\xb6\r\n") == ["500 5.5.2 Error: invalid characters in command"]


def test_utf8_message_delivered_with_utf8smtp_in_received(tmp_path, utf8_runtime) -> None:
    core = Core(utf8_runtime)
    core.greet()
    replies = core.send(
        "MAIL FROM:<müller@example.net> SMTPUTF8", f"RCPT TO:<{JOERG_NFD}@example.org>", "DATA",
        "From: Müller <müller@example.net>", "To: Jörg <jörg@example.org>",
        "Subject: Grüße", "", "Hallo Jörg", ".")
    assert replies[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert replies[3].startswith("250 2.0.0 Ok: queued as ")
    [path] = (tmp_path / "mail" / "example.org" / "jörg" / "new").iterdir()
    raw = path.read_bytes()
    message = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert message["Subject"] == "Grüße" and message["To"].addresses[0].username == "jörg"
    assert "with UTF8SMTP id" in " ".join(message["Received"].split())
    assert raw.startswith("Return-Path: <müller@example.net>\nDelivered-To: jörg@example.org\n".encode())


def test_received_keywords() -> None:
    for protocol in ("UTF8SMTP", "UTF8SMTPS", "UTF8SMTPA", "UTF8SMTPSA"):
        assert protocol in headers.PROTOCOLS


def test_addresses_in_trace_fields_stay_ascii_without_utf8() -> None:
    assert headers.return_path("jörg@example.org") == b"Return-Path: <j?rg@example.org>\n"
    assert headers.return_path("jörg\u202e@example.org", utf8=True) == (
        "Return-Path: <jörg?@example.org>\n".encode())


# --- the queue ----------------------------------------------------------------------------


def test_queue_flag_written_only_when_set() -> None:
    plain = envelope.new_message("Q1", sender="a@b.example", recipients=["c@d.example"],
                                 prefix=b"", created=1.0, received_from="x")
    assert b"smtputf8" not in envelope.encode(plain)
    utf8 = envelope.new_message("Q1", sender="jörg@b.example", recipients=["c@d.example"],
                                prefix=b"", created=1.0, received_from="x", smtputf8=True)
    raw = envelope.encode(utf8)
    assert b'"smtputf8": true' in raw and "jörg".encode() in raw
    assert envelope.decode(raw).smtputf8 and not envelope.decode(envelope.encode(plain)).smtputf8


# --- the next hop ---------------------------------------------------------------------------


def test_needs_smtputf8() -> None:
    assert not needs_smtputf8(False, "a@b", ["c@d"])
    assert needs_smtputf8(True, "a@b", ["c@d"])
    assert needs_smtputf8(False, "jörg@b", ["c@d"]) and needs_smtputf8(False, "", ["jörg@d"])


def test_verdicts_at_a_server_with_and_without_smtputf8() -> None:
    rcpts = ["jörg@d.example", "bob@d.example"]
    assert utf8_verdicts(True, "a@b", rcpts, True, True, "peer") == (True, {})
    assert utf8_verdicts(False, "a@b", ["c@d"], False, True, "peer") == (False, {})
    # Flagged, but ASCII throughout: sent without the keyword.
    assert utf8_verdicts(True, "a@b", ["c@d"], False, False, "peer") == (False, {})
    keyword, decided = utf8_verdicts(True, "a@b", rcpts, False, False, "peer")
    assert not keyword and list(decided) == ["jörg@d.example"]
    assert (decided["jörg@d.example"].code, decided["jörg@d.example"].status) == (553, "5.6.7")
    _, decided = utf8_verdicts(True, "a@b", rcpts, False, True, "peer")
    assert decided["bob@d.example"][:2] == (554, "5.6.9")
    _, decided = utf8_verdicts(True, "jörg@b", ["c@d"], False, False, "peer")
    assert decided["c@d"][:2] == (553, "5.6.7") and "<jörg@b>" in decided["c@d"].text


# --- bounces of UTF-8 addresses (RFC 6533) ----------------------------------------------------


def test_bounce_of_a_utf8_recipient_to_a_utf8_sender() -> None:
    from mailsrv.outbound.dsn import RecipientReport, build_dsn

    data = build_dsn(
        hostname="mx.example.org", dsn_id="DSN1", queue_id="Q1", original_sender="müller@b.example",
        received_from="client.test[127.0.0.1]", arrival=1.0, now=2.0,
        recipients=[RecipientReport("jörg+x@d.example", "failed", "5.6.7", "553 5.6.7 no", None)],
        original_headers="Subject: Grüße\n".encode())
    report = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    assert report["To"].addresses[0].username == "müller"
    parts = list(report.iter_parts())
    assert parts[0].get_content_charset() == "utf-8" and "<jörg+x@d.example>:".encode() in data
    [_, recipient] = parts[1].get_payload()
    assert recipient["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}x@d.example"  # stays 7-bit


def test_a_utf8_login_name_is_the_users_file_address() -> None:
    from mailsrv.accounts.auth import login_name

    assert login_name(" Jo\u0308rg@Bücher.example ") == "jörg@xn--bcher-kva.example"
    assert login_name("Alice@Example.org") == "alice@example.org"
