"""
mailsrv.outbound.scheduler in-process: the timer and the recipients' due times on one task.Clock,
sessions replaced by Deferreds the test fires.  No reactor, no sockets, no disk.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from twisted.internet import defer, task

from mailsrv.outbound.scheduler import MESSAGES_PER_SESSION, Scheduler
from mailsrv.storage.envelope import SENT, QueuedMessage, new_message

START = 1_000_000.0


class Relay:
    """The relayer's side: its messages, and the sessions the scheduler started."""

    def __init__(self, clock: task.Clock, smarthost: bool = False, **limits) -> None:
        self.clock = clock
        self.messages: dict[str, QueuedMessage] = {}
        self.sessions: list[tuple[str, list[tuple[str, list[str]]], defer.Deferred]] = []
        self.ready = True
        limits.setdefault("max_sessions", 20)
        limits.setdefault("max_sessions_per_key", 5)
        self.scheduler = Scheduler(
            clock, self.messages,
            key_of=(lambda r: "[smarthost]") if smarthost else (lambda r: r.domain),
            deliver=self.deliver, ready=lambda: self.ready, now=clock.seconds, **limits,
        )

    def deliver(self, key: str, batch: list[tuple[str, list[str]]]) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.sessions.append((key, batch, d))
        return d

    def add(self, queue_id: str, *recipients: str, due: float | None = None) -> QueuedMessage:
        message = new_message(queue_id, sender="a@example.org", recipients=list(recipients),
                              prefix=b"", created=self.clock.seconds(), received_from="local")
        if due is not None:
            message = message.update({r.address: replace(r, next_attempt=due)
                                      for r in message.recipients})
        self.messages[queue_id] = message
        self.scheduler.push(message)
        self.scheduler.wake()
        return message

    def started(self) -> list[tuple[str, list[tuple[str, list[str]]]]]:
        """The sessions under way, oldest first."""
        return [(key, batch) for key, batch, _ in self.sessions]

    def end(self, index: int = 0, *, sent: bool = True, retry_at: float | None = None) -> None:
        """Session ``index`` ends: its recipients sent, or due again at ``retry_at``."""
        key, batch, d = self.sessions.pop(index)
        for queue_id, addresses in batch:
            message = self.messages[queue_id]
            if sent:
                changed = {r.address: replace(r, status=SENT)
                           for r in message.recipients if r.address in addresses}
            else:
                changed = {r.address: replace(r, next_attempt=retry_at)
                           for r in message.recipients if r.address in addresses}
            message = message.update(changed)
            if message.done:
                del self.messages[queue_id]
            else:
                self.messages[queue_id] = message
        d.callback(None)


@pytest.fixture
def clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(START)
    return clock


def test_due_recipients_go_out_one_session_per_domain(clock) -> None:
    relay = Relay(clock)
    relay.add("Q1", "a@one.test", "b@two.test", "c@one.test")
    assert relay.started() == []  # on the next turn of the reactor, not inside add()
    clock.advance(0)
    assert relay.started() == [("one.test", [("Q1", ["a@one.test", "c@one.test"])]),
                               ("two.test", [("Q1", ["b@two.test"])])]


def test_the_smarthost_takes_every_domain_in_one_session(clock) -> None:
    relay = Relay(clock, smarthost=True)
    relay.add("Q1", "a@one.test", "b@two.test")
    relay.add("Q2", "c@three.test")
    clock.advance(0)
    assert relay.started() == [("[smarthost]", [("Q1", ["a@one.test", "b@two.test"]),
                                                ("Q2", ["c@three.test"])])]


def test_a_recipient_goes_out_when_due_not_before(clock) -> None:
    relay = Relay(clock)
    relay.add("Q1", "a@one.test", "b@one.test", due=START + 300)
    clock.advance(299.9)
    assert relay.started() == []
    clock.advance(0.1)
    assert relay.started() == [("one.test", [("Q1", ["a@one.test", "b@one.test"])])]


def test_a_sooner_message_brings_the_timer_forward(clock) -> None:
    relay = Relay(clock)
    relay.add("Q1", "a@one.test", due=START + 300)
    relay.add("Q2", "b@two.test", due=START + 10)
    assert len(clock.getDelayedCalls()) == 1  # one timer, for the earliest
    clock.advance(10)
    assert relay.started() == [("two.test", [("Q2", ["b@two.test"])])]
    clock.advance(290)
    assert [key for key, _ in relay.started()] == ["two.test", "one.test"]


def test_nothing_starts_until_ready(clock) -> None:
    relay = Relay(clock)
    relay.ready = False
    relay.add("Q1", "a@one.test")
    clock.advance(60)
    assert relay.started() == [] and clock.getDelayedCalls() == []
    relay.ready = True
    relay.scheduler.wake()
    clock.advance(0)
    assert relay.started() == [("one.test", [("Q1", ["a@one.test"])])]


def test_stop_cancels_the_timer(clock) -> None:
    relay = Relay(clock)
    relay.add("Q1", "a@one.test", due=START + 60)
    relay.scheduler.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(120)
    assert relay.started() == []


def test_the_limit_on_sessions_in_all(clock) -> None:
    relay = Relay(clock, max_sessions=2)
    for n, domain in enumerate(("one", "two", "three")):
        relay.add(f"Q{n}", f"x@{domain}.test")
    clock.advance(0)
    assert [key for key, _ in relay.started()] == ["one.test", "two.test"]
    assert relay.scheduler.sessions == 2
    relay.end(0)  # a slot frees: the third destination's turn
    assert [key for key, _ in relay.started()] == ["two.test", "three.test"]


def test_the_limit_on_sessions_per_destination(clock) -> None:
    relay = Relay(clock, max_sessions_per_key=2, per_session=1)
    for n in range(3):
        relay.add(f"Q{n}", f"x{n}@one.test")
    clock.advance(0)
    assert [batch for _, batch in relay.started()] == [[("Q0", ["x0@one.test"])],
                                                       [("Q1", ["x1@one.test"])]]
    relay.end(1)
    assert [batch for _, batch in relay.started()] == [[("Q0", ["x0@one.test"])],
                                                       [("Q2", ["x2@one.test"])]]


def test_a_session_carries_at_most_per_session_messages(clock) -> None:
    assert MESSAGES_PER_SESSION == 100
    relay = Relay(clock, max_sessions_per_key=1, per_session=2)
    for n in range(3):
        relay.add(f"Q{n}", f"x{n}@one.test")
    clock.advance(0)
    assert [[q for q, _ in batch] for _, batch in relay.started()] == [["Q0", "Q1"]]
    relay.end(0)
    assert [[q for q, _ in batch] for _, batch in relay.started()] == [["Q2"]]


def test_a_recipient_in_flight_is_not_sent_twice(clock) -> None:
    relay = Relay(clock)
    relay.add("Q1", "a@one.test")
    clock.advance(0)
    assert relay.scheduler.in_flight("Q1", "a@one.test")
    # A second recipient of the same message arrives while the first is being delivered.
    message = relay.messages["Q1"]
    relay.messages["Q1"] = replace(message, recipients=message.recipients + (
        replace(message.recipients[0], address="b@one.test"),))
    relay.scheduler.push(relay.messages["Q1"])
    relay.scheduler.wake()
    clock.advance(0)
    assert [batch for _, batch in relay.started()] == [[("Q1", ["a@one.test"])],
                                                       [("Q1", ["b@one.test"])]]


def test_a_deferred_recipient_comes_back_at_its_new_time(clock) -> None:
    relay = Relay(clock)
    relay.add("Q1", "a@one.test")
    clock.advance(0)
    relay.end(0, sent=False, retry_at=START + 60)
    assert not relay.scheduler.in_flight("Q1", "a@one.test")
    assert relay.started() == []
    clock.advance(59)
    assert relay.started() == []
    clock.advance(1)
    assert relay.started() == [("one.test", [("Q1", ["a@one.test"])])]


def test_a_message_deleted_meanwhile_is_skipped(clock) -> None:
    relay = Relay(clock)
    relay.add("Q1", "a@one.test", due=START + 60)
    relay.add("Q2", "b@one.test", due=START + 60)
    del relay.messages["Q1"]
    clock.advance(60)
    assert relay.started() == [("one.test", [("Q2", ["b@one.test"])])]


def test_a_failed_session_frees_its_slot_and_recipients(clock) -> None:
    relay = Relay(clock, max_sessions=1)
    relay.add("Q1", "a@one.test")
    relay.add("Q2", "b@two.test")
    clock.advance(0)
    _, _, d = relay.sessions.pop(0)
    d.errback(RuntimeError("bug in a session"))  # logged, not raised
    assert not relay.scheduler.in_flight("Q1", "a@one.test")
    # Q1 is still due (nothing was recorded): it goes again, after Q2, which waited.
    assert [batch for _, batch in relay.started()] == [[("Q2", ["b@two.test"])]]
    relay.end(0)
    clock.advance(0)
    assert [batch for _, batch in relay.started()] == [[("Q1", ["a@one.test"])]]


def test_a_session_that_ends_at_once(clock) -> None:
    """A destination refused without a lookup (an address literal naming this host) ends its
    session before deliver() returns: the next sessions still start, nothing raises."""
    relay = Relay(clock, max_sessions=1)
    ended: list[str] = []

    def deliver(key, batch):
        ended.append(key)
        for queue_id, _ in batch:
            relay.messages.pop(queue_id)  # bounced at once
        return defer.succeed(None)

    relay.scheduler.deliver = deliver
    relay.add("Q1", "x@[127.0.0.1]")
    relay.add("Q2", "y@[127.0.0.1]")
    relay.add("Q3", "z@two.test")
    clock.advance(0)
    assert ended == ["[127.0.0.1]", "two.test"] and relay.scheduler.sessions == 0
    assert clock.getDelayedCalls() == []
