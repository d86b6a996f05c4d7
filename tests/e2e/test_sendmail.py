"""The ``sendmail`` command: its command line and message handling, then against a real server."""

from __future__ import annotations

import email
import email.policy
import io
import subprocess
import sys

import pytest

from mailsrv.config import load_config
from mailsrv.tools import sendmail
from mailsrv.tools.sendmail_args import UsageError, parse_args, parse_recipients
from mailsrv.tools.sendmail_message import (
    add_missing_headers,
    header_recipients,
    normalise_line_ends,
    read_message,
    remove_bcc,
    split_header,
)
from mailsrv.tools.sendmail_submit import (
    EX_CONFIG,
    EX_NOUSER,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    SendError,
    choose_listener,
)
from support.harness import _env, free_port, wait_for

# --------------------------------------------------------------------------- command line


def test_cron_command_line():
    # What Debian's cron runs: -FCronDaemon -i -B8BITMIME -oem root
    inv = parse_args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
    assert inv.full_name == "CronDaemon" and inv.ignore_dots and inv.recipients == ["root"]
    assert inv.mode == "deliver" and not inv.from_headers and inv.sender is None


def test_php_mail_command_line():
    # PHP's mail(): "sendmail -t -i" plus additional_parameters such as "-f addr".
    inv = parse_args(["-t", "-i", "-f", "www@example.org"])
    assert inv.from_headers and inv.ignore_dots and inv.sender == "www@example.org"
    assert inv.recipients == []


@pytest.mark.parametrize("args, sender", [
    (["-fme@x.test"], "me@x.test"),
    (["-f", "<me@x.test>"], "me@x.test"),
    (["-r", "me@x.test"], "me@x.test"),
    (["-f", "<>"], ""),
    (["-f", ""], ""),
])
def test_sender_forms(args, sender):
    assert parse_args(args).sender == sender


def test_grouped_flags_values_and_double_dash():
    inv = parse_args(["-tiv", "-oi", "-odi", "-bm", "-C/tmp/m.toml", "a@x.test", "--", "-b@x.test"])
    assert inv.from_headers and inv.ignore_dots and inv.verbose and inv.config == "/tmp/m.toml"
    assert inv.recipients == ["a@x.test", "-b@x.test"]


def test_dots_end_input_unless_asked_not_to():
    assert not parse_args(["-odi", "-oem", "bob"]).ignore_dots
    assert parse_args(["-oi", "bob"]).ignore_dots
    assert parse_args(["-O", "IgnoreDots=true", "bob"]).ignore_dots


def test_options_after_recipients_are_options():
    inv = parse_args(["bob@x.test", "-f", "me@x.test"])
    assert inv.recipients == ["bob@x.test"] and inv.sender == "me@x.test"


def test_queue_modes():
    assert parse_args(["-bp"]).mode == "list-queue"
    assert parse_args([], program="mailq").mode == "list-queue"
    assert parse_args(["-q"]).mode == "flush-queue"
    assert parse_args(["-bi"]).mode == "check-aliases" == parse_args(["-I"]).mode


@pytest.mark.parametrize("args, complaint", [
    (["-bs"], "-bs is not supported"),
    (["-bd"], "-bd is not supported"),
    (["-q30m"], "no queue runner"),
    (["-x", "bob"], "unknown option -x"),
    (["-f"], "-f needs a value"),
    (["-f", "me x@y"], "invalid sender"),
    (["-f", "me@x\r\nRCPT TO:<e@vil>"], "invalid sender"),
])
def test_usage_errors(args, complaint):
    with pytest.raises(UsageError, match=complaint):
        parse_args(args)


def test_recipients_qualified_split_and_deduplicated():
    assert parse_recipients(["root", "a@x.test, Bob <b@y.test>", "a@x.test"], "example.org") == [
        "root@example.org", "a@x.test", "b@y.test"]
    assert parse_recipients(["undisclosed-recipients:;"], "example.org") == []
    with pytest.raises(UsageError, match="invalid recipient"):
        parse_recipients(["jörg@x.test"], "example.org")


# --------------------------------------------------------------------------- the message


def test_a_lone_dot_ends_input_unless_ignore_dots():
    data = b"Subject: s\n\nline\n.\nafter\n"
    assert read_message(io.BytesIO(data), ignore_dots=False) == b"Subject: s\n\nline\n"
    assert read_message(io.BytesIO(data), ignore_dots=True) == data
    assert read_message(io.BytesIO(b"x\r\n.\r\ny\r\n"), ignore_dots=False) == b"x\r\n"


def test_line_ends_become_crlf():
    assert normalise_line_ends(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert normalise_line_ends(b"") == b""


def test_split_header():
    fields, body = split_header(b"To: a@x,\r\n b@y\r\nSubject: s\r\n\r\nbody\r\n")
    assert fields == [b"To: a@x,\r\n b@y\r\n", b"Subject: s\r\n"] and body == b"body\r\n"
    # No header at all: everything is body.
    assert split_header(b"hello there\r\n") == ([], b"hello there\r\n")
    # A non-field line ends the header section and starts the body.
    assert split_header(b"Subject: s\r\nhello\r\n") == ([b"Subject: s\r\n"], b"hello\r\n")


def test_t_takes_to_cc_and_bcc_and_bcc_is_removed():
    fields, _ = split_header(normalise_line_ends(
        b"From: me@x.test\nTo: Alice <alice@example.org>,\n  bob\nCc: carol@example.net\n"
        b"Bcc: secret@example.org\nSubject: hi\n\nbody\n"))
    assert header_recipients(fields, "example.org") == [
        "alice@example.org", "bob@example.org", "carol@example.net", "secret@example.org"]
    kept = remove_bcc(fields)
    assert b"".join(kept) == (b"From: me@x.test\r\nTo: Alice <alice@example.org>,\r\n  bob\r\n"
                              b"Cc: carol@example.net\r\nSubject: hi\r\n")


def test_resent_recipients_replace_the_original_ones():
    fields, _ = split_header(normalise_line_ends(
        b"To: old@example.org\nResent-To: new@example.org\nResent-Bcc: hidden@example.org\n\n"))
    assert header_recipients(fields, "example.org") == ["new@example.org", "hidden@example.org"]
    assert [f.split(b":")[0] for f in remove_bcc(fields)] == [b"To", b"Resent-To"]


def test_from_and_date_added_only_when_missing():
    added = add_missing_headers([b"Subject: s\r\n"], "cron@example.org", "Jörg Cron", now=0)
    assert added[1].isascii() and added[1].startswith(b"From: =?utf-8?")  # RFC 2047
    [author] = email.message_from_bytes(b"".join(added), policy=email.policy.default)[
        "From"].addresses
    assert (author.display_name, author.addr_spec) == ("Jörg Cron", "cron@example.org")
    assert added[2].startswith(b"Date: ") and b"1970" in added[2]
    present = [b"From: x@y\r\n", b"Date: Thu, 1 Jan 1970 00:00:00 +0000\r\n"]
    assert add_missing_headers(present, "cron@example.org", "") == present


def test_listener_choice():
    assert choose_listener(("tcp:25",)) == ("127.0.0.1", 25)
    assert choose_listener(("tcp:2525:interface=127.0.0.5",)) == ("127.0.0.5", 2525)
    assert choose_listener(("tcp6:25",)) == ("::1", 25)
    assert choose_listener(("tcp6:port=25:interface=\\:\\:1",)) == ("::1", 25)
    assert choose_listener(("tcp:25:interface=192.0.2.1", "tcp:26")) == ("127.0.0.1", 26)
    with pytest.raises(SendError) as info:
        choose_listener(("tcp:25:interface=192.0.2.1", "unix:/run/x.sock", "tcp:0"))
    assert info.value.status == EX_CONFIG


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def server(make_server):
    """A server whose listener has a fixed port (sendmail finds it in smtp.listen)."""
    port = free_port(["127.0.0.1"])
    return make_server(overrides={"smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}}).start()


def run_sendmail(config, *args: str, message: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailsrv.tools.sendmail", "-C", str(config), *args],
        input=message, capture_output=True, env=_env(), timeout=60,
    )


def test_sendmail_t_delivers_and_hides_bcc(server):
    message = (b"To: Alice <alice@example.org>\nCc: carol@example.net\n"
               b"Bcc: bob@example.org\nSubject: from cron\n\nline one\n.\nline three\n")
    result = run_sendmail(server.config_path, "-t", "-oi", "-f", "cron@example.org",
                          message=message)
    assert result.returncode == EX_OK, result.stderr
    for address in ("alice@example.org", "carol@example.net", "bob@example.org"):
        [delivered] = wait_for(lambda address=address: server.messages(address), 20, f"mail for {address}")
        assert delivered["Subject"] == "from cron"
        header_section = delivered.as_bytes().split(b"\n\n", 1)[0]
        # One copy for the three mailboxes: it names none of them (no Delivered-To:).
        assert "Delivered-To" not in delivered
        assert b"Bcc:" not in header_section and b"bob@" not in header_section
        assert delivered.get_payload() == "line one\n.\nline three\n"
        assert delivered["Return-Path"] == "<cron@example.org>"
        assert delivered["From"] and delivered["Date"] and delivered["Message-ID"]


def test_sendmail_qualifies_and_stops_at_a_dot(server):
    result = run_sendmail(server.config_path, "-FCron Daemon", "alice",
                          message=b"Subject: dots\n\nbefore\n.\nafter\n")
    assert result.returncode == EX_OK, result.stderr
    [delivered] = wait_for(lambda: server.messages("alice@example.org"), 20, "mail for alice")
    assert delivered.get_payload() == "before\n"
    # hostname (mx.example.org) is not a local domain: the first local domain is used.
    assert delivered["From"].startswith("Cron Daemon <") and delivered["From"].endswith(
        "@example.org>")


def test_sendmail_refused_recipient_is_ex_nouser(server):
    result = run_sendmail(server.config_path, "nobody@example.org", "alice@example.org",
                          message=b"Subject: partly\n\nx\n")
    assert result.returncode == EX_NOUSER
    assert b"except to:\n  <nobody@example.org>: 550" in result.stderr
    wait_for(lambda: server.messages("alice@example.org"), 20, "mail for alice")


def test_sendmail_without_server_is_tempfail(server):
    server.stop()
    result = run_sendmail(server.config_path, "alice@example.org", message=b"Subject: x\n\ny\n")
    assert result.returncode == EX_TEMPFAIL
    assert b"cannot reach mailsrv at 127.0.0.1:" in result.stderr
    assert b"not sent" in result.stderr


def test_sendmail_usage_and_config_errors(tmp_path, server):
    result = run_sendmail(server.config_path, message=b"Subject: x\n\ny\n")
    assert result.returncode == EX_USAGE and b"no recipients" in result.stderr
    missing = tmp_path / "nothing.toml"
    result = run_sendmail(missing, "alice", message=b"x\n")
    assert result.returncode == EX_CONFIG and str(missing).encode() in result.stderr


def test_mailq_lists_the_queue(server, capsys):
    assert sendmail.main(["mailq", "-C", str(server.config_path)]) == EX_OK
    assert capsys.readouterr().out == "Mail queue is empty\n"


def test_default_sender_domain_prefers_a_local_hostname(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('hostname = "example.net"\n[domains]\nlocal = ["example.org", "example.net"]\n'
                      '[mailboxes]\nroot = "m"\n[queue]\npath = "q"\n')
    assert sendmail.default_domain(load_config(config)) == "example.net"
    config.write_text(config.read_text().replace('"example.net"\n[', '"mx.example.net"\n[', 1))
    assert sendmail.default_domain(load_config(config)) == "example.org"
