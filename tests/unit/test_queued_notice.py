"""
A receiving process tells the parent of each message it queued (``queued <id> <envelope>``
over a real channel pair): the parent's relayer takes the envelope that came along without
reading the file, reads the file when none came (too long) or it does not decode, and never
takes again a message it finished (a notice read after the start-up scan had it).
"""

from __future__ import annotations

import time

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher

from mailsrv.inbound.listener import ConnectionCounter
from mailsrv.outbound import relayer as relayer_module
from mailsrv.outbound.relayer import Relayer
from mailsrv.procs import channel as ch
from mailsrv.procs.child import ParentRelayer
from mailsrv.procs.dispatch import Child
from mailsrv.procs.pool import ReceiverPool
from mailsrv.replies import Reply
from mailsrv.storage import queue
from support.queue_runtime import enqueue, queue_runtime

NON_ASCII = "j\u00f6rg@b\u00fccher.example"


class _Reactor:
    """Enough of a reactor for two Channel ends: reading is the test's ``doRead``."""

    def addReader(self, r):
        pass

    def removeReader(self, r):
        pass

    def addWriter(self, w):
        pass

    def removeWriter(self, w):
        pass


class Parent:
    """A real Relayer (not started: it holds what it is given) behind a ReceiverPool reading
    one receiving process's channel; the files the parent reads are counted."""

    def __init__(self, tmp_path, monkeypatch):
        self.runtime = queue_runtime(tmp_path)
        self.runtime.relayer = self.relayer = Relayer(self.runtime)
        self.pool = ReceiverPool(self.runtime, ConnectionCounter(10, 10), [], 1)
        self.reads = []
        real_read = queue.read_message

        def counted(path):
            self.reads.append(str(path))
            return real_read(path)

        monkeypatch.setattr(queue, "read_message", counted)
        child = Child(0)
        mine, theirs = ch.pair()
        self.channel = ch.Channel(
            mine, _Reactor(), lambda kind, fields, fd: self.pool._message(child, kind, fields, fd))
        self.child_end = ch.Channel(theirs, _Reactor(), lambda *m: None)

    def notice(self, message) -> None:
        """The receiving process's side: what it sends once the message is durable."""
        ParentRelayer(self.child_end.send).add(message)
        self.channel.doRead()

    def close(self) -> None:
        self.channel.close()
        self.child_end.close()


@pytest.fixture
def parent(tmp_path, monkeypatch):
    parent = Parent(tmp_path, monkeypatch)
    yield parent
    parent.close()


def test_the_envelope_comes_with_the_notice_and_no_file_is_read(parent) -> None:
    message = enqueue(parent.runtime, "Q1", "a@example.org", [NON_ASCII, "b@remote.test"],
                      time.time())
    parent.notice(message)
    assert parent.relayer.messages == {"Q1": message}
    assert parent.reads == []


def test_an_envelope_too_long_for_a_message_is_read_from_its_file(parent) -> None:
    rcpts = [f"recipient-number-{n:05d}@remote-domain-{n}.test" for n in range(1500)]
    message = enqueue(parent.runtime, "Q2", "a@example.org", rcpts, time.time())
    sent = []
    ParentRelayer(sent.append).add(message)
    assert ch.decode(sent[0]) == ("queued", ["Q2", "-"])
    parent.notice(message)
    assert parent.relayer.messages == {"Q2": message}
    assert parent.reads == [str(parent.relayer.qdir / "messages" / "Q2.json")]


def test_the_envelope_comes_along_up_to_one_byte_under_the_limit(parent, monkeypatch) -> None:
    from mailsrv.storage.envelope import encode_line

    message = enqueue(parent.runtime, "Q5", "a@example.org", ["b@remote.test"], time.time())
    size = len(encode_line(message))
    for limit, expected in ((size + 1, encode_line(message)), (size, "-")):
        monkeypatch.setattr(ch, "SEND_BYTES", limit)
        sent = []
        ParentRelayer(sent.append).add(message)
        assert ch.decode(sent[0]) == ("queued", ["Q5", expected])


@pytest.mark.parametrize("line", ['{"version": 1, "id": "Q3"', '{"version": 1, "id": "OTHER", '
                                  '"created": 1, "sender": "", "prefix": "", '
                                  '"recipients": [{"address": "x@y.test", "status": "queued", '
                                  '"attempts": 0, "next_attempt": 1}]}'])
def test_an_envelope_that_does_not_decode_is_logged_and_read_from_its_file(
        parent, line) -> None:
    message = enqueue(parent.runtime, "Q3", "a@example.org", ["b@remote.test"], time.time())
    errors = []
    observer = lambda e: errors.append(e) if e["log_level"] == LogLevel.error else None  # noqa
    globalLogPublisher.addObserver(observer)
    try:
        parent.child_end.send(ch.encode("queued", "Q3", line))
        parent.channel.doRead()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert parent.relayer.messages == {"Q3": message}
    assert len(parent.reads) == 1
    assert [e["id"] for e in errors] == ["Q3"]
    assert "does not decode" in errors[0]["log_format"]


def test_a_notice_of_a_message_the_relayer_finished_is_not_taken_again(
        parent, monkeypatch) -> None:
    """The start-up scan found the message (queued while it ran); the relayer sent it and
    removed it; the receiving process's notice is read only then."""
    message = enqueue(parent.runtime, "Q4", "a@example.org", ["b@remote.test"], time.time())
    relayer = parent.relayer

    def deliver(key, batch, make_transactions, record):
        for t in make_transactions(batch):
            record(t.queue_id, {a: Reply(250, "2.0.0", "Ok") for a in t.recipients}, "mx")
        return defer.succeed(None)

    relayer.destinations.deliver = deliver
    relayer.startService()
    parent.runtime.reactor.advance(0)
    assert relayer.messages == {} and not queue.body_path(relayer.qdir, "Q4").exists()
    parent.notice(message)
    assert relayer.messages == {}
    relayer.stopService()


def test_the_relayer_remembers_a_bounded_number_of_finished_messages(
        parent, monkeypatch) -> None:
    monkeypatch.setattr(relayer_module, "FINISHED_REMEMBERED", 3)
    relayer = parent.relayer
    messages = [enqueue(parent.runtime, f"Q{n}", "a@example.org", ["b@remote.test"], 0.0)
                for n in range(5)]
    for message in messages:
        relayer.add(message)
        relayer.delete(message.id)
    assert relayer.messages == {}
    for message in messages:
        relayer.add(message)
    # The oldest two are forgotten (taken as new); the last three are still known finished.
    assert sorted(relayer.messages) == ["Q0", "Q1"]
    assert len(relayer._finished) == len(relayer._finished_order) == 3

