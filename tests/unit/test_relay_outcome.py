"""Tests for mailsrv.outbound.outcome: one attempt's replies -> the message's new state (pure)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from mailsrv.outbound.mx import DestinationError
from mailsrv.outbound.outcome import (
    ADMIN_BOUNCE_REASON,
    BOUNCED_NOW,
    DEFERRED,
    EXPIRED,
    SENT_NOW,
    apply_results,
    bounced_by_administrator,
    delay_status,
    destination_failed,
    interrupted,
    rescheduled,
    unreachable,
)
from mailsrv.outbound.retry import RetryPolicy
from mailsrv.replies import Reply
from mailsrv.storage.envelope import BOUNCED, QUEUED, SENT, QueuedMessage, new_message

CREATED = 1_000_000.0
DAY = 86400.0
POLICY = RetryPolicy(schedule=(60.0,), max_age=DAY, delay_warning=3600.0)
WHERE = "mx1.remote.test[192.0.2.25]:25"

OK = Reply(250, "2.0.0", "Ok: queued as X")
LATER = Reply(451, "4.3.0", "try again later")
NO_USER = Reply(550, "5.1.1", "no such user")


def message(*recipients: str, sender: str = "alice@example.org", **fields) -> QueuedMessage:
    m = new_message("Q1", sender=sender, recipients=list(recipients), prefix=b"",
                    created=CREATED, received_from="local")
    return replace(m, **fields)


def state(m: QueuedMessage) -> dict[str, str]:
    return {r.address: r.status for r in m.recipients}


A, B, C = "a@remote.test", "b@remote.test", "c@remote.test"

# (name, replies, seconds since the message was queued,
#  expected recipient states, expected per-recipient results, expected report statuses)
TABLE = [
    ("2xx sent", {A: OK}, 60, {A: SENT}, {A: SENT_NOW}, []),
    ("5xx bounced", {A: NO_USER}, 60, {A: BOUNCED}, {A: BOUNCED_NOW}, ["5.1.1"]),
    ("4xx before max_age waits", {A: LATER}, 60, {A: QUEUED}, {A: DEFERRED}, []),
    ("4xx just before max_age waits", {A: LATER}, DAY - 1, {A: QUEUED}, {A: DEFERRED}, []),
    ("4xx at max_age expires", {A: LATER}, DAY, {A: BOUNCED}, {A: EXPIRED}, ["4.4.7"]),
    ("4xx after max_age expires", {A: LATER}, DAY + 5, {A: BOUNCED}, {A: EXPIRED}, ["4.4.7"]),
    ("mixed per recipient", {A: OK, B: LATER, C: NO_USER}, 60,
     {A: SENT, B: QUEUED, C: BOUNCED}, {A: SENT_NOW, B: DEFERRED, C: BOUNCED_NOW}, ["5.1.1"]),
    ("a recipient without a reply is untouched", {A: OK}, 60,
     {A: SENT, B: QUEUED}, {A: SENT_NOW}, []),
]


@pytest.mark.parametrize("name, replies, age, states, results, reports", TABLE,
                         ids=[row[0] for row in TABLE])
def test_the_table(name, replies, age, states, results, reports) -> None:
    before = message(*states)
    now = CREATED + age
    out = apply_results(before, replies, where=WHERE, now=now, policy=POLICY,
                        rng=random.Random(1))
    assert out.changed and out.before is before
    assert state(out.message) == states
    assert {r.address: r.status for r in out.results} == results
    assert [r.status for r in out.reports] == reports
    assert out.message.done == (QUEUED not in states.values())
    for r in out.message.recipients:
        if r.address not in replies:
            assert r == next(x for x in before.recipients if x.address == r.address)
            continue
        reply = replies[r.address]
        assert r.attempts == 1 and r.last_attempt == now and r.remote_mta == "mx1.remote.test"
        assert r.last_error == (None if reply.success else str(reply))
        if r.status == QUEUED:  # the next try: the schedule's delay with jitter, never later
            deadline = CREATED + DAY
            assert min(now + 54, deadline) <= r.next_attempt <= min(now + 66, deadline)


def test_a_retry_never_falls_after_the_deadline() -> None:
    out = apply_results(message(A), {A: LATER}, where=WHERE, now=CREATED + DAY - 10,
                        policy=POLICY, rng=random.Random(1))
    assert out.message.recipients[0].next_attempt == CREATED + DAY


def test_reports_say_what_happened() -> None:
    out = apply_results(message(A, B), {A: NO_USER, B: LATER}, where=WHERE, now=CREATED + DAY,
                        policy=POLICY)
    bounced, expired = out.reports
    assert (bounced.address, bounced.action, bounced.diagnostic, bounced.remote_mta) == (
        A, "failed", "550 5.1.1 no such user", "mx1.remote.test")
    assert bounced.last_attempt == CREATED + DAY
    assert (expired.address, expired.status) == (B, "4.4.7")
    assert expired.diagnostic == ("message expired after 1 day(s) in the queue;"
                                  " last error: 451 4.3.0 try again later")


def test_no_server_answered_leaves_no_remote_mta() -> None:
    out = apply_results(message(A), {A: unreachable("no MX host could be reached")}, where=None,
                        now=CREATED + 60, policy=POLICY)
    r = out.message.recipients[0]
    assert r.remote_mta is None and r.last_error == "451 4.4.1 no MX host could be reached"


def test_replies_for_recipients_no_longer_queued_count_once() -> None:
    sent = apply_results(message(A), {A: OK}, where=WHERE, now=CREATED + 1, policy=POLICY)
    again = apply_results(sent.message, {A: NO_USER, "stranger@remote.test": NO_USER},
                          where=WHERE, now=CREATED + 2, policy=POLICY)
    assert not again.changed and again.message is sent.message
    assert again.results == () and again.reports == ()


def test_the_delay_warning_goes_out_once() -> None:
    first = apply_results(message(A, B), {A: LATER, B: OK}, where=WHERE, now=CREATED + 3599,
                          policy=POLICY)
    assert first.warnings == () and not first.message.warned  # not yet due
    second = apply_results(first.message, {A: LATER}, where=WHERE, now=CREATED + 3600,
                           policy=POLICY)
    assert second.message.warned
    (warning,) = second.warnings  # only the recipient still waiting
    assert (warning.address, warning.action, warning.status) == (A, "delayed", "4.3.0")
    assert warning.will_retry_until == CREATED + DAY
    assert warning.diagnostic == "451 4.3.0 try again later"
    third = apply_results(second.message, {A: LATER}, where=WHERE, now=CREATED + 7200,
                          policy=POLICY)
    assert third.changed and third.warnings == ()


def test_no_delay_warning_when_nothing_waits_any_more() -> None:
    out = apply_results(message(A), {A: NO_USER}, where=WHERE, now=CREATED + 4000, policy=POLICY)
    assert out.warnings == () and not out.message.warned


def test_no_delay_warning_without_a_delay_warning_setting() -> None:
    policy = replace(POLICY, delay_warning=0.0)
    out = apply_results(message(A), {A: LATER}, where=WHERE, now=CREATED + 4000, policy=policy)
    assert out.warnings == () and not out.message.warned


def test_a_message_from_null_gets_no_delay_warning_but_is_marked_warned() -> None:
    out = apply_results(message(A, sender=""), {A: LATER}, where=WHERE, now=CREATED + 4000,
                        policy=POLICY)
    assert out.warnings == () and out.message.warned


def test_a_message_from_null_still_reports_its_failures() -> None:
    """They go to the postmaster (mailsrv.outbound.bounce.notify decides), as a double bounce."""
    out = apply_results(message(A, sender=""), {A: NO_USER}, where=WHERE, now=CREATED + 1,
                        policy=POLICY)
    assert [r.status for r in out.reports] == ["5.1.1"] and out.dropped == ()


def test_a_double_bounce_failure_is_dropped_not_reported() -> None:
    notice = message(A, sender="", double_bounce=True)
    out = apply_results(notice, {A: NO_USER}, where=WHERE, now=CREATED + 1, policy=POLICY)
    assert out.reports == () and [r.address for r in out.dropped] == [A]
    assert out.message.done and out.message.double_bounce
    expired = apply_results(notice, {A: LATER}, where=WHERE, now=CREATED + DAY, policy=POLICY)
    assert expired.reports == () and [r.status for r in expired.dropped] == ["4.4.7"]


def test_the_administrators_bounce() -> None:
    m = message(A, B)
    m = m.update({A: replace(m.recipients[0], status=SENT),
                  B: replace(m.recipients[1], last_error="451 4.3.0 busy")})
    out = bounced_by_administrator(m)
    assert state(out.message) == {A: SENT, B: BOUNCED} and out.message.done
    assert out.message.recipients[1].last_error == ADMIN_BOUNCE_REASON
    (report,) = out.reports
    assert (report.address, report.status) == (B, "5.0.0")
    assert report.diagnostic == f"{ADMIN_BOUNCE_REASON}; last error: 451 4.3.0 busy"


def test_the_administrators_bounce_of_a_bounce_tells_nobody() -> None:
    for m in (message(A, sender=""), message(A, sender="", double_bounce=True)):
        out = bounced_by_administrator(m)
        assert out.message.done and out.reports == () and out.dropped == ()


def test_rescheduled_moves_only_queued_recipients() -> None:
    m = message(A, B)
    m = m.update({A: replace(m.recipients[0], status=SENT, next_attempt=5.0)})
    later = rescheduled(m, CREATED + 500)
    assert [r.next_attempt for r in later.recipients] == [5.0, CREATED + 500]


@pytest.mark.parametrize("permanent, status, smarthost, expected", [
    (True, "5.1.2", False, "550 5.1.2 no such domain"),
    (True, "5.1.2", True, "451 4.1.2 no such domain"),  # our own smarthost: mail waits
    (False, "4.4.3", False, "451 4.4.3 no such domain"),
    (False, "4.4.3", True, "451 4.4.3 no such domain"),
])
def test_a_destination_without_a_host(permanent, status, smarthost, expected) -> None:
    error = DestinationError(Reply(550 if permanent else 451, status, "no such domain"))
    reply = destination_failed(error, smarthost)
    assert str(reply) == expected


def test_an_interrupted_transaction_defers_the_unanswered() -> None:
    results = interrupted([A, B], {A: NO_USER}, WHERE, "connection lost")
    assert results[A] is NO_USER
    assert str(results[B]) == f"451 4.4.2 {WHERE}: connection lost"


@pytest.mark.parametrize("error, status", [
    (None, "4.0.0"), ("451 4.3.0 busy", "4.3.0"), ("421 too busy", "4.0.0"),
    ("550 5.1.1 no", "4.0.0"), ("garbage", "4.0.0"),
])
def test_delay_status(error, status) -> None:
    assert delay_status(error) == status


def test_a_likely_forged_senders_failures_and_delays_are_dropped_not_reported() -> None:
    """A forwarded message whose sender failed SPF and DMARC (``no_bounce``) is never bounced
    nor warned about: the report would go to an innocent third party (backscatter)."""
    forwarded = message(A, sender="SRS0=x=yy=sender.test=dave@example.org",
                        no_bounce="spf=fail dmarc=fail for sender.test")
    out = apply_results(forwarded, {A: NO_USER}, where=WHERE, now=CREATED + 1, policy=POLICY)
    assert out.reports == () and [r.address for r in out.dropped] == [A] and out.message.done
    late = apply_results(forwarded, {A: LATER}, where=WHERE, now=CREATED + 3601, policy=POLICY)
    assert late.warnings == () and late.message.warned and late.dropped == ()
    assert bounced_by_administrator(forwarded).reports == ()
    honest = replace(forwarded, no_bounce=None)
    assert [r.status for r in apply_results(honest, {A: NO_USER}, where=WHERE, now=CREATED + 1,
                                            policy=POLICY).reports] == ["5.1.1"]
