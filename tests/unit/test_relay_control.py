"""
``mailsrv queue flush|delete|bounce`` answered in-process: requests written into a temporary
queue's ``control/`` by mailsrv.storage.queue_control.control_request (as the command does), polling on a
task.Clock, disk work run at once on the test's thread.
"""

from __future__ import annotations

import time

import pytest
from twisted.internet import defer, task

from mailsrv.outbound.control import CONTROL_POLL, ControlChannel
from mailsrv.outbound.relayer import Relayer
from mailsrv.storage import queue, queue_control
from mailsrv.storage.envelope import new_message
from support.queue_runtime import enqueue, maildir_of, queue_runtime


def in_thread(f, *args):
    return defer.maybeDeferred(f, *args)


class Actions:
    """A relayer as the channel sees it; records what it was asked."""

    def __init__(self, *queue_ids: str) -> None:
        self.messages = {
            q: new_message(q, sender="a@example.org", recipients=["b@remote.test"], prefix=b"",
                           created=0.0, received_from="local")
            for q in queue_ids
        }
        self.asked: list[tuple[str, object]] = []
        self.pending: defer.Deferred | None = None

    def flush(self, queue_ids):
        self.asked.append(("flush", list(queue_ids)))

    def delete(self, queue_id):
        self.asked.append(("delete", queue_id))
        self.pending = defer.Deferred()
        return self.pending

    def bounce(self, queue_id):
        if queue_id == "BROKEN":
            raise RuntimeError("the disk is on fire")
        self.asked.append(("bounce", queue_id))
        return defer.succeed(None)


@pytest.fixture
def qdir(tmp_path):
    qdir = tmp_path / "queue"
    queue.queue_dirs(qdir)
    return qdir


def ask(qdir, action, queue_id=None):
    return queue_control.control_request(qdir, action, queue_id)


def channel(qdir, actions, ready=lambda: True):
    clock = task.Clock()
    control = ControlChannel(qdir, clock, actions, in_thread=in_thread, ready=ready)
    control.start()
    return clock, control


def test_requests_are_answered_within_one_poll(qdir) -> None:
    clock, control = channel(qdir, Actions("Q1", "Q2"))
    everything, one, unknown = (ask(qdir, "flush"), ask(qdir, "flush", "Q2"),
                                ask(qdir, "flush", "Q9"))
    clock.advance(CONTROL_POLL - 0.01)
    assert not everything.exists()
    clock.advance(0.01)
    assert everything.read_text() == "ok: 2 message(s) scheduled for delivery now\n"
    assert one.read_text() == "ok: 1 message(s) scheduled for delivery now\n"
    assert unknown.read_text() == "error: no message Q9 in the queue\n"
    assert sorted(p.name for p in (qdir / "control").iterdir()) == sorted(
        p.name for p in (everything, one, unknown))  # the requests are gone
    control.stop()
    assert clock.getDelayedCalls() == []


def test_flush_asks_for_the_messages_named(qdir) -> None:
    actions = Actions("Q1", "Q2")
    clock, _ = channel(qdir, actions)
    ask(qdir, "flush")
    clock.advance(CONTROL_POLL)
    ask(qdir, "flush", "Q2")
    clock.advance(CONTROL_POLL)
    assert actions.asked == [("flush", ["Q1", "Q2"]), ("flush", ["Q2"])]


def test_delete_is_answered_once_the_message_is_gone(qdir) -> None:
    actions = Actions("Q1")
    clock, _ = channel(qdir, actions)
    answer = ask(qdir, "delete", "Q1")
    clock.advance(CONTROL_POLL)
    assert actions.asked == [("delete", "Q1")] and not answer.exists()
    actions.pending.callback(None)
    assert answer.read_text() == "ok: deleted Q1\n"


def test_delete_and_bounce_of_an_unknown_message(qdir) -> None:
    actions = Actions("Q1")
    clock, _ = channel(qdir, actions)
    answers = [ask(qdir, "delete", "Q9"), ask(qdir, "bounce", "Q9")]
    clock.advance(CONTROL_POLL)
    assert [a.read_text() for a in answers] == ["error: no message Q9 in the queue\n"] * 2
    assert actions.asked == []


def test_bounce_from_null_says_no_dsn_went(qdir) -> None:
    actions = Actions("Q1", "Q2")
    actions.messages["Q2"] = new_message("Q2", sender=None, recipients=["b@remote.test"],
                                         prefix=b"", created=0.0, received_from="local")
    clock, _ = channel(qdir, actions)
    answers = [ask(qdir, "bounce", "Q1"), ask(qdir, "bounce", "Q2")]
    clock.advance(CONTROL_POLL)
    assert [a.read_text() for a in answers] == ["ok: bounced Q1\n",
                                                "ok: bounced Q2 (from <>: no DSN sent)\n"]


def test_a_failing_request_is_answered_and_polling_goes_on(qdir) -> None:
    actions = Actions("BROKEN", "Q1")
    clock, _ = channel(qdir, actions)
    broken = ask(qdir, "bounce", "BROKEN")
    clock.advance(CONTROL_POLL)
    assert broken.read_text() == "error: the disk is on fire\n"
    later = ask(qdir, "bounce", "Q1")
    clock.advance(CONTROL_POLL)
    assert later.read_text() == "ok: bounced Q1\n"


def test_no_answer_before_the_queue_is_loaded(qdir) -> None:
    ready = [False]
    clock, _ = channel(qdir, Actions("Q1"), ready=lambda: ready[0])
    answer = ask(qdir, "flush")
    clock.advance(CONTROL_POLL * 3)
    assert not answer.exists() and answer.with_suffix(".req").exists()
    ready[0] = True
    clock.advance(CONTROL_POLL)
    assert answer.read_text() == "ok: 1 message(s) scheduled for delivery now\n"


# --- the relayer's side: the same requests acting on a real queue ----------------------------


@pytest.fixture
def relayer(tmp_path):
    relayer = Relayer(queue_runtime(tmp_path))
    relayer.sessions = []
    relayer.scheduler.deliver = (
        lambda key, batch: relayer.sessions.append(batch) or defer.Deferred())
    relayer.clock = relayer.reactor
    yield relayer
    relayer.stopService()


def test_the_relayer_bounces_deletes_and_flushes(relayer, tmp_path) -> None:
    qdir = relayer.qdir
    future = time.time() + 3600  # not due: nothing goes out by itself
    for queue_id in ("QBOUNCE", "QDELETE", "QFLUSH"):
        enqueue(relayer.runtime, queue_id, "alice@example.org", ["bob@remote.test"], future)
    enqueue(relayer.runtime, "QNULL", None, ["bob@remote.test"], future)
    relayer.startService()
    assert relayer.loaded and sorted(relayer.messages) == ["QBOUNCE", "QDELETE", "QFLUSH", "QNULL"]
    answers = [ask(qdir, "bounce", "QBOUNCE"), ask(qdir, "delete", "QDELETE"),
               ask(qdir, "bounce", "QNULL")]
    relayer.clock.advance(CONTROL_POLL)
    assert [a.read_text() for a in answers] == [
        "ok: bounced QBOUNCE\n", "ok: deleted QDELETE\n",
        "ok: bounced QNULL (from <>: no DSN sent)\n"]
    assert sorted(relayer.messages) == ["QFLUSH"]
    assert sorted(p.name for p in (qdir / "messages").iterdir()) == ["QFLUSH.body", "QFLUSH.json"]
    (dsn,) = maildir_of(tmp_path)
    assert "returned to the sender by the administrator" in dsn.as_string()
    assert relayer.sessions == []
    answer = ask(qdir, "flush")
    relayer.clock.advance(CONTROL_POLL)
    assert answer.read_text() == "ok: 1 message(s) scheduled for delivery now\n"
    assert relayer.messages["QFLUSH"].recipients[0].next_attempt <= time.time()
    relayer.clock.advance(0)
    assert relayer.sessions == [[("QFLUSH", ["bob@remote.test"])]]
