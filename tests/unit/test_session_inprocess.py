"""
The SMTP session in-process: the protocol on a StringTransport, time on a task.Clock, DNS from
a scripted twisted.names resolver.  No sockets, no subprocess.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.names import client, dns

from mailsrv.config import prepare_directories
from mailsrv.inbound.session import MAX_ERRORS, RECIPIENT_OVERSHOOT_LIMIT
from mailsrv.inbound.smtp import MAX_HELD_INPUT
from mailsrv.routing.router import Directory
from mailsrv.runtime import Runtime
from mailsrv.storage import queue
from support.config import minimal_config
from support.inprocess import CLIENT, Connection, SyncWorkers


class ScriptedResolver(client.Resolver):
    """twisted.names' own resolver (with its sharing of identical queries in flight); the
    test answers each UDP query by hand."""

    def __init__(self, clock: task.Clock) -> None:
        client.Resolver.__init__(self, servers=[("192.0.2.53", 53)], reactor=clock)
        self.queries: list[tuple[dns.Query, defer.Deferred]] = []

    def queryUDP(self, queries, timeout=None):
        d: defer.Deferred = defer.Deferred()
        self.queries.append((queries[0], d))
        return d

    def asked(self) -> list[str]:
        return [f"{dns.QUERY_TYPES[q.type]} {q.name.name.decode()}" for q, _ in self.queries]

    def answer(self, index: int, payload) -> None:
        query, d = self.queries[index]
        message = dns.Message(answer=1, rCode=dns.OK)
        message.queries = [query]
        message.answers = [dns.RRHeader(name=query.name.name, type=query.type, payload=payload)]
        d.callback(message)


def make_runtime(tmp_path, clock, resolver=None, trusted=("10.0.0.0/8",), **smtp) -> Runtime:
    config = minimal_config(tmp_path, smtp={"listen": ["tcp:2525"], **smtp},
                            relay={"trusted_networks": list(trusted)})
    directory = Directory(["example.org"], frozenset({"alice@example.org"}), {})
    return Runtime(config=config, directory=directory, reactor=clock, resolver=resolver)


@pytest.fixture
def clock():
    return task.Clock()


# -- item 2: junk commands ------------------------------------------------------------------


def test_the_101st_junk_command_counts_as_an_error(tmp_path, clock):
    session = Connection.to(make_runtime(tmp_path, clock))
    session.output()  # the banner
    junk = ["NOOP", "RSET", "VRFY x", "HELP", "EHLO c.test", "HELO c.test"]
    for n in range(99):
        assert session.send(junk[n % len(junk)])[-1][:3] in ("250", "252", "214")
    for _ in range(MAX_ERRORS - 1):
        assert session.send("BOGUS") == ["500 5.5.2 Error: command not recognized"]
    assert session.send("NOOP") == ["250 2.0.0 Ok"]  # the 100th: still no error
    assert not session.closing
    assert session.send("NOOP") == ["421 4.7.0 Error: too many errors; closing connection"]
    assert session.closing


def test_junk_count_restarts_after_a_delivered_message(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock, junk_command_limit=3)
    prepare_directories(runtime.config)
    queue.queue_dirs(runtime.config.queue.path)
    runtime.workers = SyncWorkers()
    session = Connection.to(runtime)
    session.output()
    session.send("EHLO c.test", "NOOP", "NOOP")  # three: the limit
    replies = session.send("MAIL FROM:<a@c.test>", "RCPT TO:<alice@example.org>", "DATA",
                           "Subject: x", "", "x", ".")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    # Three more junk commands are free again, then 19 errors and the 20th closes.
    assert session.send(*["NOOP"] * (3 + MAX_ERRORS - 1)) == ["250 2.0.0 Ok"] * (3 + MAX_ERRORS - 1)
    assert session.send("NOOP") == ["421 4.7.0 Error: too many errors; closing connection"]


# -- item 2: flow control ------------------------------------------------------------------


def test_no_command_runs_while_the_client_reads_no_replies(tmp_path, clock):
    """The transport pauses its producer when its write buffer is full: from then on the
    session executes nothing, and stops reading once 64 KiB of commands wait, until the
    buffer has drained."""
    session = Connection.to(make_runtime(tmp_path, clock, junk_command_limit=10**6))
    session.output()
    assert session.transport.producer is not None and session.transport.streaming
    session.transport.producer.pauseProducing()  # what a full write buffer does
    assert session.send("NOOP", "NOOP", "NOOP") == []
    assert session.transport.producerState == "producing"
    session.send(*["NOOP"] * (MAX_HELD_INPUT // 6))
    assert session.transport.producerState == "paused"  # the socket is not read
    assert session.output() == []
    session.transport.producer.resumeProducing()  # drained
    assert session.output() == ["250 2.0.0 Ok"] * (3 + MAX_HELD_INPUT // 6)
    assert session.transport.producerState == "producing"


def test_closing_unregisters_the_producer_so_the_connection_can_close(tmp_path, clock):
    session = Connection.to(make_runtime(tmp_path, clock))
    session.send("QUIT")
    assert session.transport.producer is None and session.closing


# -- item 8: recipients past the limit ------------------------------------------------------


def test_recipients_past_the_limit_are_no_errors_up_to_the_overshoot_limit(tmp_path, clock):
    session = Connection.to(make_runtime(tmp_path, clock, max_recipients=1))
    session.output()
    session.send("EHLO c.test", "MAIL FROM:<a@c.test>")
    assert session.send("RCPT TO:<alice@example.org>") == ["250 2.1.5 Ok"]
    too_many = "452 4.5.3 Error: too many recipients"
    replies = session.send(*["RCPT TO:<alice@example.org>"] * RECIPIENT_OVERSHOOT_LIMIT)
    assert replies == [too_many] * RECIPIENT_OVERSHOOT_LIMIT
    assert session.protocol.core.errors == 0
    for _ in range(MAX_ERRORS - 1):
        assert session.send("BOGUS")[0].startswith("500 ")
    # One past the overshoot limit: an error, the 20th.
    assert session.send("RCPT TO:<alice@example.org>") == [
        "421 4.7.0 Error: too many errors; closing connection"]


# -- item 13: reverse DNS -------------------------------------------------------------------


def test_no_reverse_lookup_for_loopback_or_trusted_clients(tmp_path, clock):
    resolver = ScriptedResolver(clock)
    runtime = make_runtime(tmp_path, clock, resolver, trusted=["10.0.0.0/8"])
    for ip in ("127.0.0.1", "127.0.0.9", "::1", "10.1.2.3"):
        session = runtime.new_session(ip)
        assert session.client_known(5.0).called
        assert session.client == f"unknown[{ip}]"
    assert resolver.queries == []
    runtime.new_session(CLIENT)
    assert resolver.asked() == ["PTR 7.2.0.192.in-addr.arpa"]


def test_reverse_lookup_survives_another_connection_from_the_address_closing(tmp_path, clock):
    resolver = ScriptedResolver(clock)
    runtime = make_runtime(tmp_path, clock, resolver)
    first, second = runtime.new_session(CLIENT), runtime.new_session(CLIENT)
    waiting = second.client_known(5.0)
    first.close()  # that connection went away at once
    assert resolver.asked() == ["PTR 7.2.0.192.in-addr.arpa"]  # one lookup, shared
    assert not resolver.queries[0][1].called  # not cancelled: the second one waits
    resolver.answer(0, dns.Record_PTR(b"client.test"))
    resolver.answer(1, dns.Record_A(CLIENT))
    assert waiting.called
    assert second.client == f"client.test[{CLIENT}]"
    # The next connection looks the name up afresh (nothing kept in flight).
    runtime.new_session(CLIENT)
    assert len(resolver.queries) == 3


def test_lookup_is_cancelled_once_no_connection_waits(tmp_path, clock):
    resolver = ScriptedResolver(clock)
    runtime = make_runtime(tmp_path, clock, resolver)
    first, second = runtime.new_session(CLIENT), runtime.new_session(CLIENT)
    first.close()
    second.close()
    _, query = resolver.queries[0]
    assert query.called  # cancelled
    assert runtime.reverse_names._in_flight == {}


def test_banner_waits_for_reverse_dns_but_not_for_ever(tmp_path, clock):
    """A DNS server that never answers: the banner comes after the bounded wait (5 s) and
    the client is 'unknown'."""
    session = Connection.to(make_runtime(tmp_path, clock, ScriptedResolver(clock)))
    clock.advance(4.9)
    assert session.output() == []
    clock.advance(0.2)
    assert session.output() == ["220 mx.example.org ESMTP mailsrv"]
    assert session.protocol.core.delivery.client == f"unknown[{CLIENT}]"
    assert session.send("EHLO client.test")[0].startswith("250-mx.example.org Hello")


def test_a_client_that_talks_before_the_banner_is_refused(tmp_path, clock):
    """Postscreen's pregreet test: what a client sends before the banner (spam software that
    does not wait for it) gets 554 5.5.1 instead of the banner, and the connection closes."""
    session = Connection.to(make_runtime(tmp_path, clock, ScriptedResolver(clock)))
    assert session.send_bytes(b"E") == []  # one octet is enough
    clock.advance(5.1)
    assert session.output() == ["554 5.5.1 Error: protocol error: talked before the greeting"]
    assert session.closing


def test_banner_comes_with_the_reverse_name_once_known(tmp_path, clock):
    resolver = ScriptedResolver(clock)
    session = Connection.to(make_runtime(tmp_path, clock, resolver))
    assert session.output() == []
    resolver.answer(0, dns.Record_PTR(b"client.test"))
    assert session.output() == []  # the forward lookup confirms it first
    resolver.answer(1, dns.Record_A(CLIENT))
    assert session.output() == ["220 mx.example.org ESMTP mailsrv"]
    assert session.protocol.core.delivery.client == f"client.test[{CLIENT}]"
