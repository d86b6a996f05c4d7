"""
The relayer service in-process: a real queue in a temporary directory, the results of each
session scripted (mailsrv.outbound.destination is replaced), disk work run on the test's thread
(or held, to see what waits for a write under way), time on a task.Clock.
"""

from __future__ import annotations

import json
import mailbox
import time

import pytest
from twisted.internet import defer

from mailsrv.outbound.relayer import Relayer
from mailsrv.replies import Reply
from mailsrv.storage import queue
from mailsrv.storage.durable import DeliveryError
from support.queue_runtime import enqueue, queue_runtime

WHERE = "mx1.remote.test[192.0.2.25]:25"
OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.3.0", "try again later")
NO_USER = Reply(550, "5.1.1", "no such user")


class Relay:
    def __init__(self, tmp_path, **queue_keys) -> None:
        self.tmp_path = tmp_path
        self.runtime = queue_runtime(tmp_path, retry_schedule=[60], **queue_keys)
        self.relayer = Relayer(self.runtime)
        self.clock = self.runtime.reactor
        self.workers = self.runtime.workers
        self.qdir = self.relayer.qdir
        self.replies: dict[str, Reply] = {}
        self.sessions: list[list[str]] = []
        self.relayer.destinations.deliver = self.deliver

    def deliver(self, key, batch, make_transactions, record):
        """A session in which every recipient gets its scripted reply."""
        for t in make_transactions(batch):
            self.sessions.append(t.recipients)
            record(t.queue_id, {a: self.replies[a] for a in t.recipients}, WHERE,
                   tls="TLSv1.3")
        return defer.succeed(None)

    def queue(self, queue_id: str, sender: str | None, *recipients: str, **keys) -> None:
        enqueue(self.runtime, queue_id, sender, list(recipients), time.time(), **keys)

    def start(self) -> None:
        self.relayer.startService()
        self.clock.advance(0)  # the due recipients go out

    def envelope(self, queue_id: str) -> dict | None:
        path = self.qdir / "messages" / f"{queue_id}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def files(self) -> list[str]:
        return sorted(p.name for p in (self.qdir / "messages").iterdir())

    def maildir(self, user: str) -> list:
        path = self.tmp_path / "mail" / "example.org" / user
        return list(mailbox.Maildir(path, create=False)) if path.exists() else []


@pytest.fixture
def relay(tmp_path):
    relay = Relay(tmp_path)
    yield relay
    relay.relayer.stopService()


def test_a_sent_message_leaves_the_queue(relay) -> None:
    relay.queue("Q1", "alice@example.org", "bob@remote.test", "carol@remote.test")
    relay.replies = {"bob@remote.test": OK, "carol@remote.test": OK}
    relay.start()
    assert relay.sessions == [["bob@remote.test", "carol@remote.test"]]
    assert relay.relayer.messages == {} and relay.files() == []
    assert relay.maildir("alice") == []


def test_a_deferral_is_written_and_waits(relay) -> None:
    relay.queue("Q1", "alice@example.org", "bob@remote.test")
    relay.replies = {"bob@remote.test": LATER}
    started = time.time()
    relay.start()
    (r,) = relay.envelope("Q1")["recipients"]
    assert (r["status"], r["attempts"], r["remote_mta"]) == ("queued", 1, "mx1.remote.test")
    assert r["last_error"] == "451 4.3.0 try again later"
    assert started + 54 <= r["next_attempt"] <= time.time() + 66
    assert relay.relayer.messages["Q1"].recipients[0].attempts == 1
    relay.clock.advance(1)
    assert len(relay.sessions) == 1  # not due again yet


def test_a_refusal_bounces_to_a_local_sender(relay) -> None:
    relay.queue("Q1", "alice@example.org", "bob@remote.test", "carol@remote.test")
    relay.replies = {"bob@remote.test": NO_USER, "carol@remote.test": OK}
    relay.start()
    (dsn,) = relay.maildir("alice")
    assert "no such user" in dsn.as_string() and "bob@remote.test" in dsn.as_string()
    assert relay.files() == [] and relay.relayer.messages == {}


def test_a_bounce_to_a_remote_sender_is_queued_and_relayed(relay) -> None:
    relay.queue("Q1", "dave@remote.test", "bob@remote.test")
    relay.replies = {"bob@remote.test": NO_USER, "dave@remote.test": OK}
    relay.start()
    # The DSN (from <>) entered the queue and the relayer, and went out in its own session.
    assert relay.sessions == [["bob@remote.test"], ["dave@remote.test"]]
    assert relay.files() == [] and relay.relayer.messages == {}


def test_a_failed_bounce_goes_to_the_postmaster_once(relay) -> None:
    relay.queue("Q1", None, "bob@remote.test")
    relay.replies = {"bob@remote.test": NO_USER}
    relay.start()
    (notice,) = relay.maildir("alice")  # the postmaster
    assert notice["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert relay.files() == [] and relay.relayer.messages == {}


def test_a_failed_double_bounce_is_only_logged(relay) -> None:
    relay.queue("Q1", None, "pm@remote.test", double_bounce=True)
    relay.replies = {"pm@remote.test": NO_USER}
    relay.start()
    assert relay.files() == [] and relay.relayer.messages == {}
    assert relay.sessions == [["pm@remote.test"]]  # nothing else was sent
    assert relay.maildir("alice") == []


def test_when_the_disk_refuses_the_recipients_stay_queued(relay, monkeypatch) -> None:
    relay.queue("Q1", "alice@example.org", "bob@remote.test")
    before = relay.envelope("Q1")
    relay.replies = {"bob@remote.test": OK}

    def full(qdir, queue_ids):
        return [DeliveryError("cannot remove: [Errno 28] No space left on device",
                              disk_full=True, errno=28) for _ in queue_ids]

    monkeypatch.setattr(queue, "remove_many", full)
    relay.start()
    assert relay.envelope("Q1") == before  # the disk is as it was
    (r,) = relay.relayer.messages["Q1"].recipients
    assert r.status == "queued" and r.attempts == 0  # as before the attempt ...
    assert time.time() + 54 <= r.next_attempt <= time.time() + 60  # ... tried again later


def test_a_delete_waits_for_the_write_under_way(relay) -> None:
    relay.queue("Q1", "alice@example.org", "bob@remote.test")
    relay.replies = {"bob@remote.test": LATER}
    relay.relayer.startService()
    relay.workers.hold()
    relay.clock.advance(0)  # the deferral's write is held
    answers: list = []
    relay.relayer.delete("Q1").addCallback(answers.append)
    assert answers == [] and relay.files() == ["Q1.body", "Q1.json"]
    relay.workers.release()
    assert len(answers) == 1 and relay.files() == []  # the write did not bring it back


def test_stopping_waits_for_the_writes_under_way(relay) -> None:
    relay.queue("Q1", "alice@example.org", "bob@remote.test")
    relay.replies = {"bob@remote.test": LATER}
    relay.relayer.startService()
    relay.workers.hold()
    relay.clock.advance(0)
    stopped = relay.relayer.stopService()
    assert not stopped.called
    relay.workers.release()
    assert stopped.called and relay.envelope("Q1")["recipients"][0]["attempts"] == 1


def test_the_writes_of_one_message_never_overlap(relay) -> None:
    """A message with recipients in two domains gets two sessions, hence two state writes,
    and an administrator's bounce a third: each starts when the one before has finished."""
    relay.queue("Q1", "alice@example.org", "bob@one.test", "carol@two.test")
    relay.replies = {"bob@one.test": LATER, "carol@two.test": LATER}
    relay.relayer.startService()
    relay.workers.hold()
    relay.clock.advance(0)
    assert relay.sessions == [["bob@one.test"], ["carol@two.test"]]
    assert len(relay.workers.held) == 1  # the first session's write; the second's waits
    relay.workers.release_one()
    assert len(relay.workers.held) == 1  # the second session's write
    answers: list = []
    relay.relayer.bounce("Q1").addCallback(answers.append)
    assert len(relay.workers.held) == 1  # the bounce waits for it
    relay.workers.release_one()
    assert relay.envelope("Q1")["recipients"][1]["attempts"] == 1  # both results written
    assert len(relay.workers.held) == 1 and answers == []  # now the bounce
    relay.workers.release()
    assert len(answers) == 1 and relay.files() == []
    (dsn,) = relay.maildir("alice")
    assert "returned to the sender by the administrator" in dsn.as_string()


def test_messages_finishing_during_a_removal_are_removed_together(relay) -> None:
    """One thread hand-off and one fsync of messages/ for the messages finished meanwhile."""
    for n in range(4):
        relay.queue(f"Q{n}", "alice@example.org", f"bob{n}@remote.test")
    relay.replies = {f"bob{n}@remote.test": OK for n in range(4)}
    relay.relayer.scheduler.per_session = 1  # a session per message: they finish one by one
    relay.relayer.startService()
    relay.workers.hold()
    relay.clock.advance(0)
    held = lambda: [(f, args[1]) for _, f, args in relay.workers.held]  # noqa: E731
    assert held() == [(queue.remove_many, ["Q0"])]  # the first removal, under way
    stopped = relay.relayer.stopService()
    assert not stopped.called  # it waits for the removals
    relay.workers.release_one()  # the first ends; the three finished meanwhile go together
    assert held() == [(queue.remove_many, ["Q1", "Q2", "Q3"])]
    relay.workers.release()
    assert relay.files() == [] and relay.relayer.messages == {} and stopped.called
