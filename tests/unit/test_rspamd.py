"""
rspamd as the content filter (mailsrv.checks.rspamd), its pure parts: the request's fields
from the envelope, the /checkv2 reply read (every action, the milter block, what is not
rspamd's JSON), the verdicts, the in-place removal of fields, the body reader, the
configuration.  The exchange with a real rspamd is tests/e2e/test_rspamd_filter.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from mailsrv import replies
from mailsrv.checks.auth.checks import JUNK_FOLDER
from mailsrv.checks.builtin import builtin_pipeline
from mailsrv.checks.pipeline import (
    ACCEPT,
    AddHeaders,
    Client,
    Facts,
    FileInto,
    Reject,
    Stage,
    TempFail,
)
from mailsrv.checks.rspamd.checks import RspamdAction, RspamdHeaders, rspamd_checks
from mailsrv.checks.rspamd.client import _Joined
from mailsrv.checks.rspamd.protocol import (
    ProtocolError,
    Scan,
    ScanFailure,
    header_field,
    parse_reply,
    request_headers,
)
from mailsrv.checks.rspamd.removal import removals, removed_name, rename_in_place
from mailsrv.config import ConfigError, parse_config
from mailsrv.interfaces import ICheck
from mailsrv.routing.router import Directory

SOURCE = Path("/etc/mailsrv/mailsrv.toml")
MINIMAL: dict[str, Any] = {
    "hostname": "mx.example.org",
    "domains": {"local": ["example.org"]},
    "mailboxes": {"root": "/var/mail/mailsrv"},
    "queue": {"path": "/var/spool/mailsrv"},
}


# -- the request ---------------------------------------------------------------------------


def test_the_request_carries_the_envelope_the_client_and_the_user():
    fields = request_headers(
        sender="alice@example.org", recipients=["bob@example.net", "carol@example.com"],
        ip="192.0.2.7", helo="laptop", reverse_name="host.example.net", user="alice@example.org",
        queue_id="1xZ1QiIAC0DLw2", hostname="mx.example.org", password="s3cret",
    )
    assert fields == {
        b"From": [b"alice@example.org"],
        b"Rcpt": [b"bob@example.net", b"carol@example.com"],  # one field per recipient
        b"IP": [b"192.0.2.7"],
        b"Helo": [b"laptop"],
        b"Hostname": [b"host.example.net"],
        b"User": [b"alice@example.org"],
        b"Queue-Id": [b"1xZ1QiIAC0DLw2"],
        b"MTA-Name": [b"mx.example.org"],
        b"Password": [b"s3cret"],
    }


def test_what_is_unknown_is_left_out():
    fields = request_headers(
        sender=None, recipients=["bob@example.net"], ip="2001:db8::7", helo=None,
        reverse_name=None, user=None, queue_id="Q", hostname="mx.example.org",
    )
    assert set(fields) == {b"Rcpt", b"IP", b"Queue-Id", b"MTA-Name"}  # <>: no From
    assert fields[b"IP"] == [b"2001:db8::7"]


def test_a_value_cannot_split_the_request_field():
    fields = request_headers(
        sender="a@example.org", recipients=["b@example.org"], ip="192.0.2.1",
        helo="evil\r\nX-Injected: 1", reverse_name=None, user=None, queue_id="Q",
        hostname="mx.example.org",
    )
    assert fields[b"Helo"] == [b"evil X-Injected: 1"]


def test_utf8_addresses_are_sent_as_they_came():
    fields = request_headers(
        sender="jörg@bücher.example", recipients=["b@example.org"], ip="192.0.2.1",
        helo=None, reverse_name=None, user=None, queue_id="Q", hostname="mx.example.org")
    assert fields[b"From"] == ["jörg@bücher.example".encode()]


# -- the reply -----------------------------------------------------------------------------


def reply(**changes: Any) -> bytes:
    body: dict[str, Any] = {"is_skipped": False, "score": 7.5, "required_score": 15.0,
                            "action": "no action", "symbols": {}, "messages": {}}
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize("action", [
    "no action", "greylist", "add header", "rewrite subject", "soft reject", "reject"])
def test_every_action_is_read(action):
    scan = parse_reply(reply(action=action))
    assert scan == Scan(action=action, score=7.5, required_score=15.0)
    assert scan.summary() == f'action="{action}" score=7.50/15.00'


def test_the_smtp_message_is_read():
    scan = parse_reply(reply(action="reject", messages={"smtp_message": "Gtube pattern"}))
    assert scan.message == "Gtube pattern"


@pytest.mark.parametrize("text", ["", "Ünïcode", "bell\x07", 5, None])
def test_an_smtp_message_we_cannot_send_is_dropped(text):
    assert parse_reply(reply(messages={"smtp_message": text})).message is None


def test_a_long_smtp_message_is_cut_and_on_one_line():
    scan = parse_reply(reply(messages={"smtp_message": "spam\r\n" + "x" * 2000}))
    assert scan.message.startswith("spam x") and len(scan.message) == 900


def test_the_milter_block_is_read():
    scan = parse_reply(reply(action="add header", milter={
        "add_headers": {
            "X-Spamd-Bar": "+++",
            "X-Spam-Status": {"value": "Yes, score=7.50", "order": -1},
            "X-Spamd-Result": {"value": "default: False [7.50 / 15.00];\n\tSYM(1.00)[]",
                               "order": 0},
            "X-Twice": [{"value": "one", "order": 0}, {"value": "two", "order": 1}],
        },
        "remove_headers": {"X-Spam-Status": 0, "X-Spamd-Bar": 1, "X-Last": -1},
    }))
    assert scan.add_headers == (
        b"X-Spamd-Bar: +++\n", b"X-Spam-Status: Yes, score=7.50\n",
        b"X-Spamd-Result: default: False [7.50 / 15.00];\n\tSYM(1.00)[]\n",
        b"X-Twice: one\n", b"X-Twice: two\n",
    )
    assert scan.remove_headers == (("x-spam-status", 0), ("x-spamd-bar", 1), ("x-last", -1))
    # Every field is one AddHeaders would take.
    AddHeaders(scan.add_headers)


@pytest.mark.parametrize("body, why", [
    (b"<html>oops</html>", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (reply(action="discard"), "unknown action 'discard'"),
    (reply(action=None), "unknown action None"),
    (reply(score="7"), "score is not a number"),
    (reply(required_score=None), "required_score is not a number"),
    (reply(milter=[1]), "milter is not an object"),
    (reply(milter={"add_headers": {"X-A": "one\r\ntwo"}}), "not a header field we write"),
    (reply(milter={"add_headers": {"X-A": "one\ntwo"}}), "not a header field we write"),
    (reply(milter={"add_headers": {"X-A": "nul\x00"}}), "not a header field we write"),
    (reply(milter={"add_headers": {"Bad Name": "x"}}), "not a header field we write"),
    (reply(milter={"add_headers": {"X-A": 5}}), "no text value"),
    (reply(milter={"add_headers": {f"X-{i}": "x" for i in range(51)}}), "at most 50"),
    (reply(milter={"remove_headers": {"X-A": "all"}}), "milter.remove_headers"),
    (reply(milter={"remove_headers": ["X-A"]}), "not an object"),
])
def test_what_is_not_rspamds_reply_is_a_protocol_error(body, why):
    with pytest.raises(ProtocolError, match=why.replace("[", r"\[")):
        parse_reply(body)


def test_header_field_keeps_folding_and_drops_trailing_space():
    assert header_field("X-A", "one\n\ttwo") == b"X-A: one\n\ttwo\n"
    assert header_field("X-A", "") == b"X-A:\n"
    assert header_field("X-A", "a\r\n b") == b"X-A: a\n b\n"
    assert header_field("X-A", "ünï") == "X-A: ünï\n".encode()


# -- the verdicts --------------------------------------------------------------------------


def facts(spam: Scan | ScanFailure | None) -> Facts:
    return Facts(Stage.MESSAGE, Client("192.0.2.1", "unknown[192.0.2.1]"),
                 Directory(["example.org"], None, {}), spam=spam)


def scan(action: str, message: str | None = None, add: tuple[bytes, ...] = ()) -> Scan:
    return Scan(action=action, score=20.0, required_score=15.0, message=message,
                add_headers=add)


def test_the_checks_are_checks():
    for check in (RspamdAction(), RspamdHeaders()):
        verifyObject(ICheck, check)
        assert check.stage is Stage.MESSAGE


def test_reject_is_550_with_rspamds_message():
    verdict = RspamdAction().check(facts(scan("reject", "Gtube pattern")))
    assert verdict == Reject(replies.SPAM_REJECTED.format(message="Gtube pattern"),
                             reason='rspamd action="reject" score=20.00/15.00')
    assert str(verdict.reply) == "550 5.7.1 Error: message refused as spam: Gtube pattern"


def test_reject_without_a_message_says_spam():
    verdict = RspamdAction().check(facts(scan("reject")))
    assert str(verdict.reply) == "550 5.7.1 Error: message refused as spam: spam message rejected"


def test_soft_reject_is_451():
    verdict = RspamdAction().check(facts(scan("soft reject", "Try again later")))
    assert isinstance(verdict, TempFail)
    assert str(verdict.reply) == (
        "451 4.7.1 Error: message deferred by the spam filter: Try again later")


@pytest.mark.parametrize("action", ["add header", "rewrite subject"])
def test_add_header_and_rewrite_subject_file_into_junk(action):
    assert RspamdAction().check(facts(scan(action))) == FileInto(JUNK_FOLDER)
    assert JUNK_FOLDER == "Junk"


@pytest.mark.parametrize("action", ["no action", "greylist"])
def test_no_action_and_greylist_deliver(action):
    assert RspamdAction().check(facts(scan(action))) is ACCEPT


def test_not_scanned_is_accepted():
    assert RspamdAction("tempfail").check(facts(None)) is ACCEPT
    assert RspamdHeaders().check(facts(None)) is ACCEPT


def test_no_answer_follows_on_failure():
    failure = facts(ScanFailure("no answer within 20 s"))
    assert RspamdAction("accept").check(failure) is ACCEPT
    verdict = RspamdAction("tempfail").check(failure)
    assert verdict == TempFail(replies.SPAM_FILTER_UNAVAILABLE,
                               reason="rspamd failed: no answer within 20 s")
    assert verdict.reply.code == 451 and verdict.reply.status == "4.7.1"
    assert RspamdHeaders().check(failure) is ACCEPT


def test_rspamds_fields_are_added_and_junk_gets_x_spam():
    fields = (b"X-Spam-Status: Yes, score=20.00\n",)
    assert RspamdHeaders().check(facts(scan("add header", add=fields))) == AddHeaders(
        fields + (b"X-Spam: Yes\n",))
    assert RspamdHeaders().check(facts(scan("no action", add=fields))) == AddHeaders(fields)
    assert RspamdHeaders().check(facts(scan("no action"))) is ACCEPT
    # rspamd's own X-Spam: field is not doubled.
    own = (b"X-Spam: yes\n",)
    assert RspamdHeaders().check(facts(scan("rewrite subject", add=own))) == AddHeaders(own)


@pytest.mark.parametrize("action", ["reject", "soft reject"])
def test_a_refused_message_gets_no_fields(action):
    fields = (b"X-Spam-Status: Yes, score=20.00\n",)
    assert RspamdHeaders().check(facts(scan(action, add=fields))) is ACCEPT


def test_the_checks_run_last_only_with_a_url():
    assert rspamd_checks(parse_config(MINIMAL, SOURCE)) == []
    config = parse_config({**MINIMAL, "rspamd": {"url": "http://127.0.0.1:11333",
                                                 "on_failure": "tempfail"}}, SOURCE)
    names = [check.name for check in builtin_pipeline(config).checks]
    assert names[-2:] == ["rspamd", "rspamd_headers"]
    assert builtin_pipeline(config).checks[-2].on_failure == "tempfail"


# -- the fields removed --------------------------------------------------------------------


HEAD = (b"Received: from a\n\tby b\n"
        b"X-Spam-Status: No, score=-100\n"
        b"Subject: hi\n"
        b"x-spam-status: No again\n"
        b"X-Spam: No\n"
        b"\n"
        b"X-Spam-Status: in the body, left alone\n")


def test_removed_name_keeps_the_length():
    for name in (b"X-Spam-Status", b"X-Spam", b"Authentication-Results", b"X", b"X-R", b"Z"):
        new = removed_name(name)
        assert len(new) == len(name) and new.lower() != name.lower()
    assert removed_name(b"X-Spam-Status") == b"X-Removed-X-S"
    assert removed_name(b"X-Spam") == b"X-Remo"


def test_removals_choose_instances_in_the_header_section_only():
    first, second = HEAD.index(b"X-Spam-Status"), HEAD.index(b"x-spam-status")
    spam = HEAD.index(b"X-Spam:")
    assert removals(HEAD, (("x-spam-status", 0),)) == [
        (first, b"X-Spam-Status"), (second, b"x-spam-status")]
    assert removals(HEAD, (("x-spam-status", 1),)) == [(first, b"X-Spam-Status")]
    assert removals(HEAD, (("x-spam-status", -1),)) == [(second, b"x-spam-status")]
    assert removals(HEAD, (("x-spam-status", 3), ("x-spam-status", -3))) == []
    assert removals(HEAD, (("x-spam", 0), ("x-spam-status", 2))) == [
        (second, b"x-spam-status"), (spam, b"X-Spam")]
    assert removals(HEAD, (("received", 0), ("subject", 0)))[0] == (0, b"Received")
    assert removals(b"a body without a header section\nX-Spam: x\n", (("x-spam", 0),)) == []
    # A head cut in the middle of a field (over the 1 MiB limit): the cut field stays.
    assert removals(b"X-Spam: whole\nX-Spam: cu", (("x-spam", 0),)) == [(0, b"X-Spam")]


def test_rename_in_place_changes_only_the_names(tmp_path):
    path = tmp_path / "spool"
    path.write_bytes(HEAD)
    rename_in_place(path, removals(HEAD, (("x-spam-status", 0), ("x-spam", 0))))
    assert path.read_bytes() == HEAD.replace(
        b"X-Spam-Status: No, score", b"X-Removed-X-S: No, score").replace(
        b"x-spam-status: No again", b"X-Removed-x-s: No again").replace(
        b"X-Spam: No", b"X-Remo: No")
    # A field no longer where it was (the file changed since) is left alone.
    rename_in_place(path, [(0, b"X-Spam")])
    assert path.read_bytes().startswith(b"Received: from a")


# -- the body sent -------------------------------------------------------------------------


def test_the_body_is_the_prefix_then_the_file():
    joined = _Joined(b"Received: x\n", io.BytesIO(b"Subject: s\n\nbody\n"))
    assert joined.seek(0, io.SEEK_END) == 12 + 17  # how FileBodyProducer learns the length
    assert joined.tell() == 29
    joined.seek(0)
    chunks = []
    while chunk := joined.read(5):
        chunks.append(chunk)
    assert b"".join(chunks) == b"Received: x\nSubject: s\n\nbody\n"
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 5, 4]
    joined.seek(10)
    assert joined.read() == b"x\nSubject: s\n\nbody\n"


# -- the configuration ---------------------------------------------------------------------


def test_rspamd_is_off_by_default():
    config = parse_config(MINIMAL, SOURCE).rspamd
    assert not config.enabled
    assert (config.url, config.password, config.timeout, config.on_failure) == (
        None, None, 20.0, "accept")


def test_rspamd_keys():
    config = parse_config({**MINIMAL, "rspamd": {
        "url": "http://[::1]:11334/", "password": "q1", "timeout": 5,
        "on_failure": "tempfail"}}, SOURCE).rspamd
    assert config.enabled
    assert (config.url, config.password, config.timeout, config.on_failure) == (
        "http://[::1]:11334", "q1", 5.0, "tempfail")
    assert parse_config({**MINIMAL, "rspamd": {"url": "http://Localhost"}},
                        SOURCE).rspamd.url == "http://localhost:80"


@pytest.mark.parametrize("key, value, why", [
    ("url", "https://127.0.0.1:11333", "only http:// is spoken"),
    ("url", "127.0.0.1:11333", "only http:// is spoken"),
    ("url", "http://127.0.0.1:11333/checkv2", "no path"),
    ("url", "http://user:pw@127.0.0.1:11333", "no user name"),
    ("url", "http://127.0.0.1:0", "from 1 to 65535"),
    ("url", "http://", "a host"),
    ("url", 11333, "an http URL"),
    ("timeout", 0, "seconds > 0"),
    ("on_failure", "reject", '"accept", "tempfail"'),
    ("password", "", "non-empty"),
])
def test_bad_rspamd_keys_name_the_file_and_key(key, value, why):
    data = {**MINIMAL, "rspamd": {"url": "http://127.0.0.1:11333", key: value}}
    with pytest.raises(ConfigError) as error:
        parse_config(data, SOURCE)
    assert error.value.file == str(SOURCE) and error.value.key == f"rspamd.{key}"
    assert why in error.value.expected


def test_a_password_needs_a_url():
    with pytest.raises(ConfigError) as error:
        parse_config({**MINIMAL, "rspamd": {"password": "q1"}}, SOURCE)
    assert error.value.key == "rspamd.url"
