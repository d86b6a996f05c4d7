"""Send and connection limits in the session, in-process on a task.Clock with the real
delivery objects: the issue's test (the 1,001st message of the day deferred, the postmaster
notified once, the day rolling over), what counts and what does not, the notice itself, and
the connection rate through the listener's factory."""

from __future__ import annotations

import email
import email.policy
import mailbox
import os

import pytest
from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher

from mailsrv.checks.ratelimits import DAY, ConnectionRate
from mailsrv.inbound.listener import ConnectionCounter
from mailsrv.inbound.sendquota import SendQuota
from mailsrv.outbound.notice import build_notice, notice_recipient
from mailsrv.routing.router import Directory
from support.inprocess import PASSWORD, Connection, Core, factory_for, make_runtime
from support.sasl import plain

USER = "alice@example.org"
DEFERRED_MESSAGES = "451 4.7.0 Error: sending limit reached ({} messages in 24 hours); try again later"
DEFERRED_RECIPIENTS = "451 4.7.0 Error: sending limit reached ({} recipients in an hour); try again later"


@pytest.fixture
def clock():
    clock = task.Clock()
    clock.advance(1_800_000_000)
    return clock


@pytest.fixture
def logged():
    events: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("mailsrv"):
            events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def logged_in(tmp_path, clock, limits: tuple[int, int] | None = None) -> Core:
    """Alice logged in on a submission session; the postmaster is bob."""
    runtime = make_runtime(tmp_path, clock, auth=True)
    runtime.directory = Directory(
        ["example.org"], frozenset({USER, "bob@example.org"}),
        {"postmaster@example.org": ("bob@example.org",)}, passwords=runtime.directory.passwords)
    if limits is not None:
        runtime.send_quota = SendQuota(*limits, clock.seconds, runtime.notify_send_limit)
    return login(runtime)


def login(runtime) -> Core:
    core = Core(runtime, submission=True, tls=True)
    core.greet()
    assert core.send("AUTH PLAIN " + plain(USER, PASSWORD)) == [
        "235 2.7.0 Authentication successful"]
    return core


def message(core: Core, *rcpts: str) -> list[str]:
    """One message to ``rcpts`` (all of them remote: nobody's Maildir fills): every reply."""
    out = core.send("MAIL FROM:<alice@example.org>")
    if not out[0].startswith("250"):
        return out
    for rcpt in rcpts or ("someone@remote.test",):
        out += core.send(f"RCPT TO:<{rcpt}>")
    if not any(line.startswith("250 2.1.5") for line in out):
        core.send("RSET")
        return out
    out += core.send("DATA")
    out += core.send("From: alice@example.org", "Subject: hi", "", "hello", ".")
    return out


def notices(tmp_path) -> list:
    box = tmp_path / "mail" / "example.org" / "bob"
    return list(mailbox.Maildir(box, create=False).keys()) if box.exists() else []


def test_the_1001st_message_of_the_day_is_deferred_the_postmaster_notified_once(
        tmp_path, clock, logged, monkeypatch):
    """The default limits: 1,000 messages a day; sent one every 72 s (50 an hour, well under
    recipients_per_hour 500), the 1,001st comes 20 hours after the first.  (Without fsync:
    the test is about counting, and a thousand durable writes would take most of a minute.)"""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    core = logged_in(tmp_path, clock)
    assert core.runtime.config.limits.messages_per_day == 1000
    first = clock.seconds()
    for n in range(1000):
        replies = message(core)
        assert replies[-1].startswith("250 2.0.0 Ok: queued as "), (n, replies)
        clock.advance(72)
    assert message(core) == [DEFERRED_MESSAGES.format(1000)]
    assert len(notices(tmp_path)) == 1
    assert message(core) == [DEFERRED_MESSAGES.format(1000)]  # again: no second notice
    again = login(core.runtime)  # nor from another connection
    assert message(again) == [DEFERRED_MESSAGES.format(1000)]
    assert len(notices(tmp_path)) == 1
    refusals = [line for line in logged if line.startswith("refused sender")]
    assert len(refusals) == 3
    assert all(f"user={USER}" in line
               and 'check=send_limit reason="send limit messages_per_day 1000"' in line
               for line in refusals)
    assert sum("send limit notice user=alice@example.org to=<postmaster@example.org>" in line
               for line in logged) == 1
    # 24 hours after the first message it leaves the window: one more may go.
    clock.advance(first + DAY - clock.seconds())
    assert message(again)[-1].startswith("250 2.0.0 Ok: queued as ")
    assert message(again) == [DEFERRED_MESSAGES.format(1000)]
    assert len(notices(tmp_path)) == 1  # within 24 hours of the first notice


def test_the_notice_says_who_which_limit_and_from_where(tmp_path, clock):
    core = logged_in(tmp_path, clock, limits=(1, 0))
    assert message(core)[-1].startswith("250 ")
    assert message(core) == [DEFERRED_MESSAGES.format(1)]
    [key] = notices(tmp_path)
    raw = mailbox.Maildir(tmp_path / "mail" / "example.org" / "bob", create=False).get_bytes(key)
    notice = email.message_from_bytes(raw, policy=email.policy.default)
    assert notice["Return-Path"] == "<>"
    assert notice["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert notice["To"] == "postmaster@example.org"
    assert notice["Subject"] == "Send limit reached by alice@example.org"
    assert notice["Auto-Submitted"] == "auto-generated"
    body = notice.get_content()
    assert "send limit messages_per_day 1" in body and "unknown[192.0.2.7]" in body
    assert "password may have been stolen" in body


def test_a_refused_or_abandoned_message_uses_no_quota(tmp_path, clock):
    core = logged_in(tmp_path, clock, limits=(2, 0))
    assert core.send("MAIL FROM:<alice@example.org>", "RCPT TO:<a@remote.test>", "RSET") == [
        "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok"]
    # Refused after the final dot (From: not alice's): no 250, no use of the quota.
    core.send("MAIL FROM:<alice@example.org>", "RCPT TO:<a@remote.test>", "DATA")
    assert core.send("From: bob@example.org", "", "x", ".")[0].startswith("553 5.7.1")
    core.send("MAIL FROM:<alice@example.org>", "RCPT TO:<a@remote.test>")
    core.core.connection_lost()  # dropped mid-transaction
    core = login(core.runtime)
    assert message(core)[-1].startswith("250 ")
    assert message(core)[-1].startswith("250 ")
    assert message(core) == [DEFERRED_MESSAGES.format(2)]


def test_an_open_transaction_holds_its_quota_against_a_parallel_one(tmp_path, clock):
    first = logged_in(tmp_path, clock, limits=(1, 0))
    assert first.send("MAIL FROM:<alice@example.org>") == ["250 2.1.0 Ok"]
    second = login(first.runtime)
    assert second.send("MAIL FROM:<alice@example.org>") == [DEFERRED_MESSAGES.format(1)]
    first.send("RSET")  # the first gave up: its quota is free again
    assert second.send("MAIL FROM:<alice@example.org>") == ["250 2.1.0 Ok"]


def test_recipients_per_hour_one_past_the_limit(tmp_path, clock, logged):
    core = logged_in(tmp_path, clock, limits=(0, 3))
    assert message(core, "a@remote.test", "b@remote.test")[-1].startswith("250 ")
    replies = message(core, "c@remote.test", "d@remote.test")
    # The third recipient of the hour passes, the fourth is deferred; the message goes to c.
    assert replies[1:3] == ["250 2.1.5 Ok", DEFERRED_RECIPIENTS.format(3)]
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    assert message(core, "e@remote.test") == ["250 2.1.0 Ok", DEFERRED_RECIPIENTS.format(3)]
    assert len(notices(tmp_path)) == 1
    assert sum(line.startswith("refused recipient") and
               'check=send_limit reason="send limit recipients_per_hour 3"' in line
               for line in logged) == 2
    clock.advance(3600)
    assert message(core, "e@remote.test")[-1].startswith("250 ")


def test_mail_without_auth_from_a_trusted_network_is_not_counted(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock)
    runtime.send_quota = SendQuota(1, 1, clock.seconds)
    core = Core(runtime, ip="10.0.0.5")
    core.greet()
    for _ in range(3):
        assert message(core, "a@remote.test", "b@remote.test")[-1].startswith("250 ")
    assert len(runtime.send_quota) == 0


def test_the_notice_goes_to_the_postmaster_of_the_users_domain(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock)
    directory = Directory(["example.org", "example.net"], None, {})
    assert notice_recipient(runtime.config, directory, "carol@example.net") == (
        "postmaster@example.net")
    assert notice_recipient(runtime.config, directory, "x@elsewhere.test") == (
        "postmaster@example.org")  # not ours: the host's postmaster
    data = build_notice(hostname="mx.example.org", notice_id="ABC123", to="postmaster@example.org",
                        user="bad\nuser", reason="send limit\r\nX: y", client="c", now=0)
    assert data.isascii() and b"\nX: y" not in data and b"\r" not in data


def test_connections_per_minute_one_past_the_limit_421_trusted_exempt(tmp_path, clock, logged):
    runtime = make_runtime(tmp_path, clock)
    counter = ConnectionCounter(100, 100, runtime.may_relay, ConnectionRate(2, clock.seconds))
    factory = factory_for(runtime, counter)
    for _ in range(2):
        connection = Connection(factory)
        assert connection.output() == ["220 mx.example.org ESMTP mailsrv"]
        connection.send("QUIT")
        connection.lose()
    third = Connection(factory)
    assert third.output() == [
        "421 4.7.0 Error: too many connections from your address in a minute; try again later"]
    assert third.closing
    third.lose()
    assert counter.connections == 0
    assert any('refused connection client=192.0.2.7 check=connection_rate reason="connection rate '
               'connections_per_minute 2"' in line for line in logged)
    for _ in range(5):  # relay.trusted_networks: exempt
        trusted = Connection(factory, ip="10.0.0.1")
        assert trusted.output() == ["220 mx.example.org ESMTP mailsrv"]
        trusted.lose()
    clock.advance(60)
    assert Connection(factory).output() == ["220 mx.example.org ESMTP mailsrv"]
