"""Rate limits, pure: the sliding window, the connections of a client address, the per-user
ledger (what counts, when, the postmaster told once a day) and the MAIL and RCPT checks, each
one past its limit on an injected clock."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from mailsrv import replies
from mailsrv.checks.pipeline import ACCEPT, Client, Facts, Stage, TempFail
from mailsrv.checks.ratelimits import (
    DAY,
    HOUR,
    ConnectionRate,
    MessagesPerDay,
    RecipientsPerHour,
    Window,
)
from mailsrv.config import ConfigError, parse_config
from mailsrv.inbound.sendquota import SendQuota
from mailsrv.interfaces import ICheck
from mailsrv.routing.address import parse_mail_from, parse_rcpt_to
from mailsrv.routing.router import Directory

USER = "alice@example.org"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_window_forgets_what_is_older_than_its_span() -> None:
    window = Window(60)
    window.add(100.0)
    window.add(130.0, 3)
    assert window.count(130.0) == 4
    assert window.count(159.9) == 4
    assert window.count(160.0) == 3  # the first event is 60 s old: out
    assert window.count(190.0) == 0
    window.add(200.0, 0)  # nothing happened
    assert window.count(200.0) == 0


def test_connections_per_minute_one_past_the_limit_then_a_minute_later() -> None:
    clock = Clock()
    rate = ConnectionRate(3, clock)
    assert [rate.admit("192.0.2.7") for _ in range(4)] == [True, True, True, False]
    assert rate.admit("192.0.2.8")  # another address has its own count
    clock.now += 59
    assert not rate.admit("192.0.2.7")  # refused ones were not counted, but 3 still are
    clock.now += 1
    assert rate.admit("192.0.2.7")


def test_connections_per_minute_zero_is_no_limit_and_the_memory_is_bounded() -> None:
    assert all(ConnectionRate(0, Clock()).admit("192.0.2.7") for _ in range(1000))
    rate = ConnectionRate(1, Clock(), max_clients=3)
    for n in range(10):
        assert rate.admit(f"192.0.2.{n}")
    assert len(rate) == 3  # the least recently seen forgotten


def quota(clock: Clock, messages: int = 3, recipients: int = 5) -> tuple[SendQuota, list]:
    told: list = []
    return SendQuota(messages, recipients, clock,
                     lambda user, reason, client: told.append((user, reason, client))), told


def send(q: SendQuota, recipients: int = 1, accepted: bool = True, user: str = USER) -> None:
    q.opened(user)
    for _ in range(recipients):
        q.recipient_added(user)
    q.closed(user, recipients, accepted)


def test_a_message_counts_once_accepted_a_refused_one_not_at_all() -> None:
    clock = Clock()
    q, _ = quota(clock)
    send(q, 2, accepted=False)  # refused at the end of DATA, or abandoned
    assert (q.messages_used(USER), q.recipients_used(USER)) == (0, 0)
    assert len(q) == 0  # nothing to remember of that user
    send(q, 2)
    assert (q.messages_used(USER), q.recipients_used(USER)) == (1, 2)
    assert q.messages_used("bob@example.org") == 0


def test_an_open_transaction_counts_until_it_ends() -> None:
    """Parallel connections of one user cannot pass the limit together."""
    q, _ = quota(Clock())
    q.opened(USER)
    q.recipient_added(USER)
    q.opened(USER)
    assert (q.messages_used(USER), q.recipients_used(USER)) == (2, 1)
    q.closed(USER, 1, accepted=True)
    q.closed(USER, 0, accepted=False)
    assert (q.messages_used(USER), q.recipients_used(USER)) == (1, 1)


def test_the_windows_slide_a_day_for_messages_an_hour_for_recipients() -> None:
    clock = Clock()
    q, _ = quota(clock)
    send(q, 5)
    clock.now += HOUR - 1
    assert (q.messages_used(USER), q.recipients_used(USER)) == (1, 5)
    clock.now += 1
    assert (q.messages_used(USER), q.recipients_used(USER)) == (1, 0)
    clock.now += DAY - HOUR
    assert q.messages_used(USER) == 0


def test_the_postmaster_is_told_once_per_user_per_day() -> None:
    clock = Clock()
    q, told = quota(clock)
    assert q.refused(USER, "send limit messages_per_day 3", "unknown[192.0.2.7]")
    assert not q.refused(USER, "send limit messages_per_day 3", "unknown[192.0.2.7]")
    assert not q.refused(USER, "send limit recipients_per_hour 5", "unknown[192.0.2.7]")
    assert q.refused("bob@example.org", "send limit messages_per_day 3", "x")  # per user
    clock.now += DAY - 1
    assert not q.refused(USER, "send limit messages_per_day 3", "unknown[192.0.2.7]")
    clock.now += 1  # the day rolled over
    assert q.refused(USER, "send limit messages_per_day 3", "unknown[192.0.2.8]")
    assert told == [
        (USER, "send limit messages_per_day 3", "unknown[192.0.2.7]"),
        ("bob@example.org", "send limit messages_per_day 3", "x"),
        (USER, "send limit messages_per_day 3", "unknown[192.0.2.8]"),
    ]


DIRECTORY = Directory(["example.org"], frozenset({USER}), {})


def facts(stage: Stage, user: str | None = USER, recipients: int = 0, **client) -> Facts:
    return Facts(
        stage, Client(ip="192.0.2.7", name="unknown[192.0.2.7]", authenticated_as=user,
                      **client), DIRECTORY,
        sender=parse_mail_from(b"FROM:<alice@example.org>")[0],
        recipient=parse_rcpt_to(b"TO:<someone@remote.test>")[0] if stage is Stage.RCPT else None,
    )


def test_the_checks_are_checks() -> None:
    for check in (MessagesPerDay(lambda: None), RecipientsPerHour(lambda: None)):
        verifyObject(ICheck, check)
    assert (MessagesPerDay.stage, RecipientsPerHour.stage) == (Stage.MAIL, Stage.RCPT)


def test_messages_per_day_one_past_the_limit_451_4_7_0() -> None:
    clock = Clock()
    q, told = quota(clock, messages=3)
    check = MessagesPerDay(lambda: q)
    for _ in range(3):
        assert check.check(facts(Stage.MAIL)) is ACCEPT
        send(q)
    refused = check.check(facts(Stage.MAIL))
    assert refused == TempFail(replies.SEND_LIMIT_MESSAGES.format(limit="3"),
                               reason="send limit messages_per_day 3")
    assert str(refused.reply) == (
        "451 4.7.0 Error: sending limit reached (3 messages in 24 hours); try again later")
    assert told == [(USER, "send limit messages_per_day 3", "unknown[192.0.2.7]")]
    clock.now += DAY
    assert check.check(facts(Stage.MAIL)) is ACCEPT  # the day rolled over


def test_recipients_per_hour_one_past_the_limit_451_4_7_0() -> None:
    clock = Clock()
    q, told = quota(clock, recipients=5)
    check = RecipientsPerHour(lambda: q)
    send(q, 3)
    q.opened(USER)  # a second message: its 2 first recipients pass, the third is one past
    for _ in range(2):
        assert check.check(facts(Stage.RCPT)) is ACCEPT
        q.recipient_added(USER)
    refused = check.check(facts(Stage.RCPT))
    assert isinstance(refused, TempFail) and refused.reason == "send limit recipients_per_hour 5"
    assert str(refused.reply) == (
        "451 4.7.0 Error: sending limit reached (5 recipients in an hour); try again later")
    assert len(told) == 1


@pytest.mark.parametrize("check", [MessagesPerDay, RecipientsPerHour])
def test_no_user_no_limit_and_zero_is_off(check) -> None:
    stage = check.stage
    full, _ = quota(Clock(), messages=1, recipients=1)
    send(full)
    assert check(lambda: full).check(facts(stage, user=None, trusted_network=True)) is ACCEPT
    assert check(lambda: None).check(facts(stage)) is ACCEPT
    off, _ = quota(Clock(), messages=0, recipients=0)
    send(off, 10)
    assert check(lambda: off).check(facts(stage)) is ACCEPT
    assert not isinstance(check(lambda: full).check(facts(stage)), type(ACCEPT))


def base_config(**limits) -> dict:
    return {
        "hostname": "mx.example.org", "domains": {"local": ["example.org"]},
        "mailboxes": {"root": "/tmp/m"}, "queue": {"path": "/tmp/q"}, "smtp": {},
        "relay": {}, "limits": limits,
    }


def test_the_limits_keys_their_defaults_and_their_errors() -> None:
    limits = parse_config(base_config(), None).limits
    assert (limits.messages_per_day, limits.recipients_per_hour,
            limits.connections_per_minute) == (1000, 500, 60)
    assert parse_config(base_config(messages_per_day=0), None).limits.messages_per_day == 0
    for key, value in (("messages_per_day", -1), ("recipients_per_hour", "500"),
                       ("connections_per_minute", 1.5), ("messages_per_day", True)):
        with pytest.raises(ConfigError) as error:
            parse_config(base_config(**{key: value}), "/etc/mailsrv/mailsrv.toml")
        assert str(error.value) == (
            f"/etc/mailsrv/mailsrv.toml: limits.{key}: expected an integer >= 0, got {value!r}")
    with pytest.raises(ConfigError, match="limits.messages_per_hour: unknown key"):
        parse_config(base_config(messages_per_hour=5), None)
