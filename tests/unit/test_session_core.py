"""
Every rule of the README's "What clients are told" table, checked on the session core in
process: the real SessionDelivery and Transaction on a tmp_path configuration, deliveries run
at once, time on a task.Clock. (The timers, the connection limits and the transport's side are
in test_session_adapter.py.)
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re

import pytest
from twisted.internet import task

from mailsrv.inbound import message_intake
from mailsrv.inbound.sasl import MAX_RESPONSE_LINE
from mailsrv.inbound.session import MAX_ERRORS, RECIPIENT_OVERSHOOT_LIMIT
from mailsrv.message.headsection import HEADER_SECTION_LIMIT
from support.inprocess import CLIENT, PASSWORD, Core, make_runtime
from support.queue_runtime import maildir_of
from support.sasl import b64, plain

QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as [0-9A-Za-z]{14}$")


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def runtime(tmp_path, clock):
    return make_runtime(tmp_path, clock)


def delivered(tmp_path) -> int:
    path = tmp_path / "mail" / "example.org" / "alice"
    return len(maildir_of(tmp_path)) if path.exists() else 0


def transaction(core: Core, *body: str, sender="a@client.test", rcpt="alice@example.org"):
    """MAIL, RCPT, DATA and the body: the replies after EHLO."""
    return core.send(f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>", "DATA", *body, ".")


# -- accepted ------------------------------------------------------------------------------


def test_accepted_message_is_stored_before_250_queued_as_its_id(tmp_path, runtime):
    core = Core(runtime)
    core.greet()
    replies = transaction(core, "Subject: hello", "", "body")
    assert replies[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert QUEUED.match(replies[3])
    queue_id = replies[3].rsplit(" ", 1)[1]
    [message] = maildir_of(tmp_path)
    assert message["Subject"] == "hello" and queue_id in message["Received"]
    # The transaction is over: the next one starts afresh (recipients, junk count).
    assert core.send("RCPT TO:<alice@example.org>") == ["503 5.5.1 Error: need MAIL command"]
    assert core.core.junk_commands == 0


# -- recipients ----------------------------------------------------------------------------


def test_unknown_local_user_550_5_1_1(runtime):
    core = Core(runtime)
    core.greet()
    core.send("MAIL FROM:<a@client.test>")
    [reply] = core.send("RCPT TO:<nobody@example.org>")
    assert reply.startswith("550 5.1.1 ")


def test_foreign_or_disguised_recipient_without_right_to_relay_554_5_7_1(runtime):
    core = Core(runtime)
    core.greet()
    core.send("MAIL FROM:<a@client.test>")
    denied = "554 5.7.1 Relay access denied"
    assert core.send("RCPT TO:<bob@example.net>") == [denied]
    assert core.send("RCPT TO:<bob%example.net@example.org>") == [denied]
    assert core.send("RCPT TO:<@example.org:bob@example.net>") == [denied]
    # A trusted network may relay.
    trusted = Core(runtime, ip="10.1.2.3")
    trusted.greet()
    assert trusted.send("MAIL FROM:<a@client.test>", "RCPT TO:<bob@example.net>") == [
        "250 2.1.0 Ok", "250 2.1.5 Ok"]


def test_bad_address_syntax_553_5_1_7_sender_5_1_3_recipient(runtime):
    core = Core(runtime)
    core.greet()
    [reply] = core.send("MAIL FROM:<a@@client.test>")
    assert reply.startswith("553 5.1.7 ")
    core.send("MAIL FROM:<a@client.test>")
    [reply] = core.send("RCPT TO:<alice@@example.org>")
    assert reply.startswith("553 5.1.3 ")


@pytest.mark.parametrize("local", ["a/b", "a..b", ".alice", "a" * 65, '"a\tb"'])
def test_unsafe_local_part_553_5_1_3(runtime, local):
    core = Core(runtime)
    core.greet()
    core.send("MAIL FROM:<a@client.test>")
    [reply] = core.send(f"RCPT TO:<{local}@example.org>")
    assert reply.startswith("553 5.1.3 ")


# -- commands ------------------------------------------------------------------------------


def test_unknown_command_500_5_5_2(runtime):
    core = Core(runtime)
    assert core.send("BOGUS") == ["500 5.5.2 Error: command not recognized"]
    assert core.send("EXPN staff") == ["502 5.5.1 Error: command not implemented"]


def test_command_line_of_512_octets_runs_513_is_refused_and_its_tail_discarded(runtime):
    core = Core(runtime)
    assert core.send("NOOP " + "x" * (512 - 7)) == ["250 2.0.0 Ok"]
    # One octet more; its tail (after the first 512+) arrives later and is never run.
    line = ("NOOP " + "x" * (513 - 7)).encode()
    assert core.send_bytes(line[:600]) == []
    assert core.send_bytes(line[600:] + b"\r\n") == ["500 5.5.2 Error: command line too long"]
    # A tail that looks like a command is never run, whole or in pieces.
    smuggler = b"NOOP " + b"x" * 510 + b"QUIT\r\n"
    assert core.send_bytes(smuggler) == ["500 5.5.2 Error: command line too long"]
    assert core.send_bytes(smuggler[:515]) == ["500 5.5.2 Error: command line too long"]
    assert core.send_bytes(smuggler[515:]) == []
    assert core.send("NOOP") == ["250 2.0.0 Ok"]
    assert not core.closing


def test_auth_lines_may_be_12288_octets_one_more_is_refused(tmp_path, clock):
    core = Core(make_runtime(tmp_path, clock, auth=True), submission=True, tls=True)
    core.greet()
    fill = MAX_RESPONSE_LINE - len("AUTH PLAIN ") - 2
    [reply] = core.send("AUTH PLAIN " + "A" * fill)  # the limit: decoded, and refused as such
    assert reply.startswith("501 5.5.2 ")
    assert core.send("AUTH PLAIN " + "A" * (fill + 1)) == [
        "500 5.5.2 Error: command line too long"]
    assert core.send("NOOP " + "x" * 600) == ["500 5.5.2 Error: command line too long"]


@pytest.mark.parametrize("line", [b"NOOP \xc3\xa9", b"NOOP \x01", b"MAIL FROM:<a\x7f@b>"])
def test_non_ascii_or_control_characters_in_a_command_500_5_5_2(runtime, line):
    core = Core(runtime)
    assert core.send_bytes(line + b"\r\n") == ["500 5.5.2 Error: invalid characters in command"]


def test_syntax_errors_501_5_5_4(runtime):
    core = Core(runtime)
    assert core.send("EHLO") == ["501 5.5.4 Syntax: EHLO domain-or-address-literal"]
    assert core.send("HELO bad/name") == ["501 5.5.4 Error: invalid HELO domain"]
    core.greet()
    assert core.send("MAIL FROM:<a@client.test> FOO=1") == [
        "501 5.5.4 Error: unsupported parameter FOO"]
    assert core.send("MAIL FROM:<a@client.test> SIZE=ten") == [
        "501 5.5.4 Error: bad value for parameter SIZE"]
    core.send("MAIL FROM:<a@client.test>")
    assert core.send("RCPT TO:<alice@example.org> XFOO=1") == [
        "501 5.5.4 Error: unsupported parameter XFOO"]
    assert core.send("DATA now") == ["501 5.5.4 Syntax: DATA takes no arguments"]
    helo = Core(core.runtime)
    helo.send("HELO client.test")
    assert helo.send("MAIL FROM:<a@client.test> BODY=8BITMIME") == [
        "501 5.5.4 Error: parameter BODY needs EHLO"]


def test_bad_sequence_503_5_5_1(runtime):
    core = Core(runtime)
    assert core.send("MAIL FROM:<a@client.test>") == ["503 5.5.1 Error: send HELO/EHLO first"]
    core.greet()
    assert core.send("RCPT TO:<alice@example.org>") == ["503 5.5.1 Error: need MAIL command"]
    assert core.send("DATA") == ["503 5.5.1 Error: need MAIL command"]
    core.send("MAIL FROM:<a@client.test>")
    assert core.send("MAIL FROM:<a@client.test>") == ["503 5.5.1 Error: nested MAIL command"]
    assert core.send("DATA") == ["503 5.5.1 Error: need RCPT command"]
    # RSET and a new EHLO end the transaction.
    assert core.send("RSET", "RCPT TO:<alice@example.org>") == [
        "250 2.0.0 Ok", "503 5.5.1 Error: need MAIL command"]


# -- STARTTLS and AUTH ---------------------------------------------------------------------


def test_starttls_without_certificate_502_a_second_one_503(runtime):
    core = Core(runtime)
    core.greet()
    assert core.send("STARTTLS") == ["502 5.5.1 Error: TLS not available"]
    runtime.tls = object()  # a certificate is configured (the context is the adapter's)
    assert core.send("STARTTLS") == ["220 2.0.0 Ready to start TLS"]
    assert core.core.starting_tls
    core.greet()
    assert core.send("STARTTLS") == ["503 5.5.1 Error: TLS already active"]


def test_starttls_forgets_what_was_pipelined_behind_it_and_needs_a_new_ehlo(runtime):
    runtime.tls = object()
    core = Core(runtime)
    core.greet()
    assert core.send("MAIL FROM:<a@client.test>", "STARTTLS", "RCPT TO:<alice@example.org>",
                     "NOOP") == ["250 2.1.0 Ok", "220 2.0.0 Ready to start TLS"]
    assert not core.core.held  # the pipelined plain text is gone, never executed
    assert core.send("MAIL FROM:<a@client.test>") == ["503 5.5.1 Error: send HELO/EHLO first"]
    [ehlo] = core.send("EHLO client.test")
    assert "STARTTLS" not in ehlo
    assert core.send("RCPT TO:<alice@example.org>") == ["503 5.5.1 Error: need MAIL command"]


def test_auth_not_offered_before_ehlo_twice_or_in_a_transaction_503_5_5_1(tmp_path, clock):
    assert Core(make_runtime(tmp_path, clock), tls=True).send("AUTH PLAIN") == [
        "503 5.5.1 Error: authentication not enabled"]
    core = Core(make_runtime(tmp_path, clock, auth=True), submission=True, tls=True)
    assert core.send("AUTH PLAIN") == ["503 5.5.1 Error: send EHLO first"]
    core.send("HELO client.test")
    assert core.send("AUTH PLAIN") == ["503 5.5.1 Error: send EHLO first"]
    core.greet()
    assert core.send("AUTH PLAIN " + plain("alice@example.org", PASSWORD)) == [
        "235 2.7.0 Authentication successful"]
    assert core.send("AUTH PLAIN") == ["503 5.5.1 Error: already authenticated"]


def test_auth_in_a_transaction_503(tmp_path, clock):
    """On port 25 with smtp.auth: MAIL needs no AUTH, so AUTH may come inside a transaction."""
    runtime = make_runtime(tmp_path, clock, auth=True)
    config = runtime.config
    runtime.config = dataclasses.replace(config, smtp=dataclasses.replace(config.smtp, auth=True))
    core = Core(runtime, tls=True)
    core.greet()
    core.send("MAIL FROM:<a@client.test>")
    assert core.send("AUTH PLAIN") == ["503 5.5.1 Error: MAIL transaction in progress"]


def test_auth_before_tls_538_5_7_11(tmp_path, clock):
    core = Core(make_runtime(tmp_path, clock, auth=True), submission=True)
    [ehlo] = core.send("EHLO client.test")
    assert "AUTH" not in ehlo
    assert core.send("AUTH PLAIN") == [
        "538 5.7.11 Error: encryption required for authentication (STARTTLS)"]


def test_sasl_unknown_mechanism_504_undecodable_501_5_5_2_cancelled_501_5_7_0(tmp_path, clock):
    core = Core(make_runtime(tmp_path, clock, auth=True), submission=True, tls=True)
    core.greet()
    assert core.send("AUTH CRAM-MD5") == ["504 5.5.4 Error: unrecognized authentication type"]
    assert core.send("AUTH PLAIN !!!") == ["501 5.5.2 Error: cannot decode response"]
    assert core.send("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
    assert core.send("*") == ["501 5.7.0 Error: authentication cancelled"]
    assert core.send("AUTH LOGIN", b64("alice@example.org"), b64(PASSWORD)) == [
        "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0 Authentication successful"]
    assert core.delivery.authenticated_as == "alice@example.org"


def test_wrong_password_535_5_7_8_after_a_delay_that_doubles(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock, auth=True)
    core = Core(runtime, submission=True, tls=True)
    core.greet()
    for delay in (1.0, 2.0):
        assert core.send("AUTH PLAIN " + plain("alice@example.org", "wrong"), "NOOP") == []
        assert core.advance(delay - 0.5) == []  # the NOOP waits behind it
        assert core.advance(0.5) == ["535 5.7.8 Error: authentication failed", "250 2.0.0 Ok"]
    assert core.delivery.authenticated_as is None


def test_auth_from_a_locked_out_address_454_4_7_0(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock, auth=True)
    for _ in range(runtime.config.auth.max_failures):
        core = Core(runtime, submission=True, tls=True)
        core.greet()
        core.send("AUTH PLAIN " + plain("alice@example.org", "wrong"))
        assert core.advance(16.0) == ["535 5.7.8 Error: authentication failed"]
    core = Core(runtime, submission=True, tls=True)
    core.greet()
    locked = "454 4.7.0 Error: too many failed authentication attempts; try again later"
    # Locked out: even the right password is not checked.
    assert core.send("AUTH PLAIN " + plain("alice@example.org", PASSWORD)) == [locked]
    # Another address is not.
    other = Core(runtime, ip="192.0.2.8", submission=True, tls=True)
    other.greet()
    assert other.send("AUTH PLAIN " + plain("alice@example.org", PASSWORD)) == [
        "235 2.7.0 Authentication successful"]


def test_mail_on_submission_without_auth_530_5_7_0(tmp_path, clock):
    core = Core(make_runtime(tmp_path, clock, auth=True), submission=True, tls=True)
    core.greet()
    assert core.send("MAIL FROM:<alice@example.org>") == [
        "530 5.7.0 Error: authentication required"]


def logged_in(tmp_path, clock, **settings) -> Core:
    core = Core(make_runtime(tmp_path, clock, auth=True, **settings), submission=True, tls=True)
    core.greet()
    assert core.send("AUTH PLAIN " + plain("alice@example.org", PASSWORD)) == [
        "235 2.7.0 Authentication successful"]
    return core


def test_sending_as_an_address_the_user_does_not_own_553_5_7_1(tmp_path, clock):
    core = logged_in(tmp_path, clock)
    assert core.send("MAIL FROM:<bob@example.org>") == [
        "553 5.7.1 Error: sender address <bob@example.org> not owned by user alice@example.org"]
    for field in ("From", "Sender", "Resent-From", "Resent-Sender"):
        replies = transaction(core, f"{field}: bob@example.org", "", "x",
                              sender="alice@example.org", rcpt="bob@example.org")
        assert replies[-1] == (f"553 5.7.1 Error: {field}: header address <bob@example.org> "
                               "not owned by user alice@example.org")
    replies = transaction(core, "From: Alice <alice@example.org>", "", "x",
                          sender="alice@example.org", rcpt="bob@example.org")
    assert QUEUED.match(replies[-1])


def test_header_section_readers_could_read_differently_554_5_6_0_over_1_mib_552_5_3_4(
    tmp_path, clock,
):
    core = logged_in(tmp_path, clock)
    for head in (["From: alice@example.org", "not a field"],
                 ["From: alice@example.org", "Subject: a\0b"],
                 ["From: <<<"]):
        replies = transaction(core, *head, "", "x", sender="alice@example.org")
        assert replies[-1].startswith("554 5.6.0 Error: malformed header section ("), head
    line = "X-Filler: " + "y" * 980
    long_head = ["From: alice@example.org"] + [line] * (HEADER_SECTION_LIMIT // len(line) + 1)
    replies = transaction(core, *long_head, "", "x", sender="alice@example.org")
    assert replies[-1] == (f"552 5.3.4 Error: header section longer than {HEADER_SECTION_LIMIT} "
                           "octets; message refused")
    assert delivered(tmp_path) == 0


# -- limits --------------------------------------------------------------------------------


def test_recipients_past_the_limit_452_4_5_3_no_error_up_to_the_overshoot_limit(tmp_path, clock):
    core = Core(make_runtime(tmp_path, clock, max_recipients=2))
    core.greet()
    core.send("MAIL FROM:<a@client.test>")
    assert core.send(*["RCPT TO:<alice@example.org>"] * 2) == ["250 2.1.5 Ok"] * 2
    too_many = "452 4.5.3 Error: too many recipients"
    assert core.send(*["RCPT TO:<bob@example.org>"] * RECIPIENT_OVERSHOOT_LIMIT) == [
        too_many] * RECIPIENT_OVERSHOOT_LIMIT
    assert core.core.errors == 0
    assert core.send("RCPT TO:<bob@example.org>") == [too_many]  # one past: an error
    assert core.core.errors == 1
    # The transaction goes through with the first two.
    replies = core.send("DATA", "Subject: x", "", "x", ".")
    assert QUEUED.match(replies[-1])


def test_message_too_big_declared_or_real_552_5_3_4(tmp_path, clock):
    size = 1024  # the smallest max_message_size the configuration takes
    core = Core(make_runtime(tmp_path, clock, max_message_size=size))
    core.greet()
    too_big = "552 5.3.4 Error: message size exceeds fixed limit"
    assert core.send(f"MAIL FROM:<a@client.test> SIZE={size + 1}") == [too_big]
    assert core.send(f"MAIL FROM:<a@client.test> SIZE={size}") == ["250 2.1.0 Ok"]
    core.send("RSET")
    body = ["Subject: x", ""] + ["y" * 98] * 9  # 12 + 2 + 900 octets with their CRLFs
    fill = size - sum(len(line) + 2 for line in body) - 2
    exact = body + ["z" * fill]
    assert QUEUED.match(transaction(core, *exact)[-1])
    assert transaction(core, *body, "z" * (fill + 1))[-1] == too_big
    assert delivered(tmp_path) == 1


def test_text_line_of_998_octets_passes_999_is_refused_after_the_final_dot(tmp_path, runtime):
    core = Core(runtime)
    core.greet()
    assert QUEUED.match(transaction(core, "Subject: x", "", "y" * 998)[-1])
    replies = transaction(core, "Subject: x", "", "y" * 999, "after")
    assert replies[-1] == "500 5.5.2 Error: message line longer than 1000 octets"
    assert delivered(tmp_path) == 1


@pytest.mark.parametrize("smuggled", [b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
def test_bare_cr_or_lf_in_the_message_554_5_6_0_after_the_real_end(tmp_path, runtime, smuggled):
    core = Core(runtime)
    core.greet()
    core.send("MAIL FROM:<a@client.test>", "RCPT TO:<alice@example.org>", "DATA")
    data = b"Subject: x\r\n\r\nx" + smuggled + b"MAIL FROM:<evil@client.test>\r\n"
    assert core.send_bytes(data) == []  # nothing of it is taken as a command
    assert core.send(".") == ["554 5.6.0 Error: bare CR or LF in message; message refused"]
    assert delivered(tmp_path) == 0
    assert list((tmp_path / "queue" / "incoming").iterdir()) == []  # nothing kept


@pytest.mark.parametrize("line", [b"NOOP\n", b"NOOP\rQUIT\r\n", b"NO\rOP"])
def test_bare_cr_or_lf_in_a_command_421_4_5_2_and_close(runtime, line):
    core = Core(runtime)
    assert core.send_bytes(line) == [
        "421 4.5.2 Error: bare CR or LF in command; closing connection"]
    assert core.closing


def test_more_received_fields_than_the_limit_554_5_4_6(tmp_path, clock):
    core = Core(make_runtime(tmp_path, clock, max_received_headers=2))
    core.greet()
    hop = "Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000"
    assert QUEUED.match(transaction(core, hop, hop, "", "x")[-1])
    assert transaction(core, hop, hop, hop, "", "x")[-1] == (
        "554 5.4.6 Error: too many Received: headers (mail loop?)")
    assert delivered(tmp_path) == 1


def test_disk_error_451_4_3_0_disk_full_452_4_3_1(tmp_path, runtime, monkeypatch):
    core = Core(runtime)
    core.greet()
    real_open = os.open
    failure = {"errno": errno.EIO}

    def failing_open(path, *args, **kwargs):
        if "incoming" in str(path):
            raise OSError(failure["errno"], os.strerror(failure["errno"]), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(message_intake.os, "open", failing_open)
    start = ["MAIL FROM:<a@client.test>", "RCPT TO:<alice@example.org>", "DATA"]
    assert core.send(*start)[-1] == "451 4.3.0 Error: local error in processing; try again later"
    failure["errno"] = errno.ENOSPC
    assert core.send(*start)[-1] == (
        "452 4.3.1 Error: insufficient system storage; try again later")
    # The transaction was reset: the client starts again.
    assert core.send("RCPT TO:<alice@example.org>") == ["503 5.5.1 Error: need MAIL command"]
    monkeypatch.undo()
    # A symbolic link below the mailbox root is never followed.
    (tmp_path / "mail" / "example.org").mkdir(parents=True, exist_ok=True)
    os.symlink(tmp_path, tmp_path / "mail" / "example.org" / "alice")
    assert transaction(core, "Subject: x", "", "x")[-1] == (
        "451 4.3.0 Error: local error in processing; try again later")


@pytest.mark.parametrize("lines", [1, 2 * message_intake.SPOOL_HELD // 100])
def test_spool_write_failing_452_after_the_dot_nothing_kept(tmp_path, runtime, monkeypatch, lines):
    """A small message is written in the delivery thread, a big one (past SPOOL_HELD) while it
    arrives: either way the disk's refusal is the reply after the final dot."""
    core = Core(runtime)
    core.greet()
    written = []

    def full_disk(fd, data):
        written.append(len(data))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(message_intake, "write_all", full_disk)
    replies = transaction(core, "Subject: full", "", *["x" * 98] * lines)
    assert replies[-1] == "452 4.3.1 Error: insufficient system storage; try again later"
    assert len(written) == 1 and delivered(tmp_path) == 0
    assert list((tmp_path / "queue" / "incoming").iterdir()) == []
    monkeypatch.undo()
    assert QUEUED.match(transaction(core, "Subject: room again", "", "x")[-1])


def test_too_many_errors_421_4_7_0_junk_commands_past_the_limit_count(tmp_path, clock):
    core = Core(make_runtime(tmp_path, clock, junk_command_limit=2))
    assert core.send("NOOP", "HELP") == ["250 2.0.0 Ok", (
        "214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT. "
        "See RFC 5321")]
    assert core.core.errors == 0
    # Past the junk limit every junk command is answered, and counted as an error too.
    for _ in range(MAX_ERRORS - 1):
        assert core.send("VRFY alice") == [
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"]
    assert core.core.errors == MAX_ERRORS - 1 and not core.closing
    assert core.send("RSET") == ["421 4.7.0 Error: too many errors; closing connection"]
    assert core.closing
    assert core.send("NOOP") == []  # nothing more is read


def test_ehlo_names_the_client_and_offers_only_what_applies(runtime):
    core = Core(runtime)
    [ehlo] = core.send("EHLO client.test")
    assert ehlo.split("\r\n")[0] == f"250-mx.example.org Hello client.test [{CLIENT}]"
    assert ehlo.split("\r\n")[1:] == [
        "250-PIPELINING", f"250-SIZE {runtime.config.smtp.max_message_size}", "250-8BITMIME",
        "250-SMTPUTF8", "250-ENHANCEDSTATUSCODES", "250-DSN", "250-CHUNKING", "250 BINARYMIME"]
