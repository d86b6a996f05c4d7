"""
The protocol adapter (smtp.SMTPServerProtocol) in process: what it does around the session
core's replies (timers, connection limits, STARTTLS, closing, one command at a time) on a
StringTransport, time on a task.Clock.
"""

from __future__ import annotations

import re

import pytest
from twisted.internet import defer, task

from mailsrv.inbound.listener import ConnectionCounter, SMTPServerFactory
from mailsrv.inbound.smtp import CLOSE_GRACE
from support.inprocess import CLIENT, Connection, StringTransport, factory_for, make_runtime


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS (what it was asked to negotiate with)."""

    tls_context = None
    aborted = False

    def startTLS(self, context):
        self.tls_context = context

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


class TLSConnection(Connection):
    """A Connection on a TLSStringTransport, for what STARTTLS and aborts did."""

    def __init__(self, factory: SMTPServerFactory, ip: str = CLIENT) -> None:
        super().__init__(factory, ip, TLSStringTransport)


@pytest.fixture
def clock():
    return task.Clock()


def connect(runtime, **kwargs) -> TLSConnection:
    connection = TLSConnection(factory_for(runtime, **kwargs))
    assert connection.output() == ["220 mx.example.org ESMTP mailsrv"]
    return connection


TIMEOUT = "421 4.4.2 Error: timeout exceeded; closing connection"


def test_idle_client_421_4_4_2_after_idle_timeout(tmp_path, clock):
    connection = connect(make_runtime(tmp_path, clock, idle_timeout=30))
    clock.advance(20)
    assert connection.send("NOOP") == ["250 2.0.0 Ok"]  # a whole command: the timer restarts
    clock.advance(29.5)
    assert connection.output() == [] and not connection.closing
    clock.advance(0.5)
    assert connection.output() == [TIMEOUT]
    assert connection.closing


def test_trickling_command_does_not_keep_the_session_alive(tmp_path, clock):
    connection = connect(make_runtime(tmp_path, clock, idle_timeout=30))
    for byte in b"NO":
        clock.advance(10)
        assert connection.send_bytes(bytes([byte])) == []
    clock.advance(9.5)
    assert connection.output() == []
    clock.advance(0.5)  # 30 s after the banner: bytes without a whole command do not count
    assert connection.output() == [TIMEOUT]
    assert connection.closing


def test_data_phase_has_a_deadline_of_its_own_421_4_4_2(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock, idle_timeout=30, data_timeout=100)
    connection = connect(runtime)
    connection.send("EHLO client.test", "MAIL FROM:<a@client.test>",
                    "RCPT TO:<alice@example.org>", "DATA")
    for _ in range(9):
        clock.advance(10)
        assert connection.send("a line of the message") == []  # each chunk resets idle
    clock.advance(9.5)
    assert connection.output() == []
    clock.advance(0.5)  # 100 s after the 354
    assert connection.output() == [TIMEOUT]
    assert connection.closing
    connection.lose()
    assert list((tmp_path / "queue" / "incoming").iterdir()) == []  # nothing kept


def test_too_many_connections_in_total_or_from_one_address_421_4_7_0(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock)
    counter = ConnectionCounter(max_connections=3, max_per_ip=2, exempt=runtime.may_relay)
    factory = factory_for(runtime, counter)
    first, second = TLSConnection(factory), TLSConnection(factory)
    assert first.output() == second.output() == ["220 mx.example.org ESMTP mailsrv"]
    third = TLSConnection(factory)  # one past the per-address limit
    assert third.output() == [
        "421 4.7.0 Error: too many connections from your address; try again later"]
    assert third.closing
    third.lose()  # (a refused connection was never counted)
    assert counter.connections == 2
    trusted = TLSConnection(factory, ip="10.0.0.1")  # held to the total only
    assert trusted.output() == ["220 mx.example.org ESMTP mailsrv"]
    other = TLSConnection(factory, ip="192.0.2.99")  # one past the total
    assert other.output() == ["421 4.7.0 Error: too many connections; try again later"]
    other.lose()
    first.send("QUIT")
    first.lose()
    assert TLSConnection(factory).output() == ["220 mx.example.org ESMTP mailsrv"]


def test_a_session_whose_cleanup_fails_still_frees_its_slot(tmp_path, clock, monkeypatch):
    """The slot is released whatever the session's cleanup raised: with receiving processes
    that release is what tells the parent, which would otherwise count it for ever."""
    counter = ConnectionCounter(max_connections=1, max_per_ip=1)
    factory = factory_for(make_runtime(tmp_path, clock), counter)
    connection = TLSConnection(factory)
    assert connection.output() == ["220 mx.example.org ESMTP mailsrv"]

    def fails(self) -> None:
        raise RuntimeError("cleanup failed")

    monkeypatch.setattr(type(connection.protocol.core), "connection_lost", fails)
    with pytest.raises(RuntimeError):
        connection.lose()
    assert counter.connections == 0
    monkeypatch.undo()
    assert TLSConnection(factory).output() == ["220 mx.example.org ESMTP mailsrv"]


def test_a_refused_connection_is_cut_if_it_does_not_go_away(tmp_path, clock):
    factory = factory_for(make_runtime(tmp_path, clock), ConnectionCounter(0, 0))
    connection = TLSConnection(factory)
    assert connection.output()[0].startswith("421 4.7.0 ")
    assert connection.send("EHLO client.test") == []  # nothing it says is read
    clock.advance(CLOSE_GRACE)
    assert connection.transport.aborted


def test_closing_cuts_after_the_grace_period_but_quit_does_not(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock)
    closed = connect(runtime)
    assert closed.send_bytes(b"NOOP\n") == [
        "421 4.5.2 Error: bare CR or LF in command; closing connection"]
    assert closed.transport.producer is None  # unregistered: the close is not held up
    clock.advance(CLOSE_GRACE)
    assert closed.transport.aborted
    quitting = connect(runtime)
    assert quitting.send("QUIT") == ["221 2.0.0 Bye"]
    clock.advance(CLOSE_GRACE)
    assert quitting.closing and not quitting.transport.aborted


def test_starttls_starts_tls_after_its_reply_and_drops_what_was_pipelined(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock)
    runtime.tls = object()  # stands for the server's context factory
    connection = connect(runtime)
    connection.send("EHLO client.test")
    connection.transport.producer.pauseProducing()  # the plain socket's buffer is full
    connection.transport.producer.resumeProducing()
    assert connection.send("STARTTLS", "MAIL FROM:<evil@client.test>") == [
        "220 2.0.0 Ready to start TLS"]
    assert connection.transport.tls_context is runtime.tls
    assert connection.send("MAIL FROM:<a@client.test>") == [
        "503 5.5.1 Error: send HELO/EHLO first"]


class HeldWorkers:
    """Runtime.workers whose jobs finish when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[defer.Deferred, object, tuple]] = []

    def run(self, f, *args):
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((d, f, args))
        return d

    def finish(self) -> None:
        d, f, args = self.jobs.pop(0)
        d.callback(f(*args))


def test_pipelined_commands_wait_for_the_end_of_data_reply(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock, idle_timeout=30)
    workers = runtime.workers = HeldWorkers()
    connection = connect(runtime)
    replies = connection.send("EHLO client.test", "MAIL FROM:<a@client.test>",
                              "RCPT TO:<alice@example.org>", "DATA", "Subject: x", "", "x", ".",
                              "MAIL FROM:<b@client.test>", "QUIT")
    assert replies[-1] == "354 End data with <CR><LF>.<CR><LF>"  # nothing after it yet
    clock.advance(60)  # no idle timeout while the delivery is under way
    assert connection.output() == [] and not connection.closing
    workers.finish()
    replies = connection.output()
    assert re.match(r"^250 2\.0\.0 Ok: queued as \w{14}$", replies[0])
    assert replies[1:] == ["250 2.1.0 Ok", "221 2.0.0 Bye"]


def test_connection_lost_during_delivery_writes_nothing_after(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock)
    workers = runtime.workers = HeldWorkers()
    connection = connect(runtime)
    connection.send("EHLO client.test", "MAIL FROM:<a@client.test>",
                    "RCPT TO:<alice@example.org>", "DATA", "Subject: x", "", "x", ".")
    connection.lose()
    workers.finish()  # delivered (the client may retry: a duplicate, never a loss)
    assert connection.output() == []
