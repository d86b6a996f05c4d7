"""mailsrv.procs: the channel's messages and descriptors, the choice of process, the limits
the parent applies across processes, the restart delays, the counters relayed."""

import os
import socket
import threading

import pytest
from twisted.internet import reactor as real_reactor
from twisted.internet import task
from twisted.logger import LogLevel, eventAsText
from twisted.python.failure import Failure

from mailsrv import replies
from mailsrv.inbound.listener import ConnectionCounter
from mailsrv.metrics import Metrics, snapshot
from mailsrv.procs import channel as ch
from mailsrv.procs.childlog import event_text
from mailsrv.procs.dispatch import (
    Child,
    Dispatcher,
    HandedConnections,
    Route,
    choose,
    network_owner,
    owns_network,
)
from mailsrv.procs.metricsrelay import FLUSH_DELAY, MetricsRelay, replay
from mailsrv.procs.pool import FIRST_DELAY, HEALTHY_AFTER, MAX_DELAY, restart_delay


def test_messages_round_trip_and_bad_ones_are_refused():
    assert ch.decode(ch.encode("conn", 7, 1)) == ("conn", ["7", "1"])
    assert ch.decode(ch.encode("queued", "1xZabc", "-")) == ("queued", ["1xZabc", "-"])
    assert ch.decode(ch.encode("queued", "1xZ", '{"a": "b c"}')) == (
        "queued", ["1xZ", '{"a": "b c"}'])  # the envelope may hold spaces
    assert ch.decode(ch.encode("ready")) == ("ready", [])
    assert ch.decode(ch.encode("metrics", '[["auth", ["a b"], {}]]')) == (
        "metrics", ['[["auth", ["a b"], {}]]'])  # the last field may hold spaces
    for bad in (("conn", 1), ("queued", "a b", "-"), ("queued", "a"), ("nope",),
                ("closed", "")):
        with pytest.raises(ValueError):
            ch.encode(*bad)
    for bad in (b"conn 1", b"queued", b"queued 1xZ", b"closed 1 2", b"what 1", b"queued "):
        with pytest.raises(ValueError):
            ch.decode(bad)


class _Reactor:
    """Enough of a reactor for Channel: it records readers and writers."""

    def __init__(self):
        self.readers, self.writers = set(), set()

    def addReader(self, r):
        self.readers.add(r)

    def removeReader(self, r):
        self.readers.discard(r)

    def addWriter(self, w):
        self.writers.add(w)

    def removeWriter(self, w):
        self.writers.discard(w)


def test_a_descriptor_goes_across_with_its_message():
    a, b = ch.pair()
    got, lost = [], []
    r = _Reactor()
    sender = ch.Channel(a, r, lambda *m: None)
    receiver = ch.Channel(b, r, lambda kind, fields, fd: got.append((kind, fields, fd)),
                          lambda: lost.append(True))
    left, right = socket.socketpair()
    assert sender.send(ch.encode("conn", 1, 0), left.fileno())
    left.close()  # the receiver's copy keeps the connection open
    receiver.doRead()
    [(kind, fields, fd)] = got
    assert (kind, fields) == ("conn", ["1", "0"])
    os.write(fd, b"hello")
    assert right.recv(5) == b"hello"
    os.close(fd)
    right.close()
    sender.close()
    receiver.doRead()
    assert lost == [True] and receiver.closed


def test_a_handler_that_fails_owns_the_descriptor_and_the_channel_goes_on():
    """on_message owns the descriptor even when it raises: the channel closing it again closed
    it twice, and the EBADF ended the channel (and the receiving process)."""
    a, b = ch.pair()
    taken, lost = [], []

    def fails(kind, fields, fd):
        taken.append(fd)
        os.close(fd)
        raise OSError("handler failed")

    r = _Reactor()
    sender = ch.Channel(a, r, lambda *m: None)
    receiver = ch.Channel(b, r, fails, lambda: lost.append(True))
    left, right = socket.socketpair()
    assert sender.send(ch.encode("conn", 1, 0), left.fileno())
    assert sender.send(ch.encode("conn", 2, 0), right.fileno())
    receiver.doRead()
    assert len(taken) == 2 and lost == [] and not receiver.closed
    for sock in (left, right, a, b):
        sock.close()


def test_a_connection_reset_before_its_adoption_is_reported_closed():
    """The client reset the connection between the parent's accept and the adoption (Twisted
    asks for the peer's name: ENOTCONN): no session, the descriptor closed once, and the
    parent told ``closed`` so that the connection stops counting against the limits."""
    import errno

    from mailsrv.procs.child import Receiver

    class GoneReactor:
        def adoptStreamConnection(self, fd, family, factory):
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))

    sent = []
    receiver = Receiver(1, None, None, GoneReactor())
    receiver.channel = type("Channel", (), {"send": staticmethod(sent.append)})()
    receiver.factories = [object()]
    left, right = socket.socketpair()
    fd = left.detach()
    receiver.message("conn", ["0", "192.0.2.7"], fd)
    assert sent == [ch.encode("closed", "192.0.2.7")]
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    right.close()


def test_a_full_socket_queues_messages_in_order():
    a, b = ch.pair()
    r = _Reactor()
    sender = ch.Channel(a, r, lambda *m: None)
    got = []
    receiver = ch.Channel(b, r, lambda kind, fields, fd: got.append(fields[0]))
    sent = 0
    while not sender._out:  # until the socket refuses one
        sender.send(ch.encode("queued", f"id{sent}", "-"))
        sent += 1
    for n in range(sent, sent + 50):
        sender.send(ch.encode("queued", f"id{n}", "-"))
    assert sender in r.writers
    while sender._out:
        receiver.doRead()
        sender.doWrite()
    while len(got) < sent + 50:
        before = len(got)
        receiver.doRead()
        assert len(got) > before
    assert got == [f"id{n}" for n in range(sent + 50)]
    assert sender not in r.writers


def test_choose_the_process():
    trusted = lambda ip: ip.startswith("127.")  # noqa: E731
    fewest = Route(Route.FEWEST, False, trusted)
    assert choose(fewest, "192.0.2.1", [3, 1, 2]) == 1
    assert choose(fewest, "192.0.2.1", [3, None, 2]) == 2
    assert choose(fewest, "192.0.2.1", [None, None]) is None
    auth = Route(Route.AUTH, True, trusted)
    assert choose(auth, "192.0.2.1", [9, 0]) == 0 and choose(auth, "192.0.2.1", [None, 0]) is None
    grey = Route(Route.FEWEST, True, trusted)
    # A network's connections all go to one process, whichever has fewer open.
    owner = network_owner("198.51.100.7", 2)
    assert {choose(grey, f"198.51.100.{n}", [5, 0]) for n in range(1, 50)} == {owner}
    assert {choose(grey, f"198.51.100.{n}", [0, 5]) for n in range(1, 50)} == {owner}
    assert owns_network("198.51.100.0/24", owner, 2) and not owns_network(
        "198.51.100.0/24", 1 - owner, 2)
    # Its owner down: refused (421) rather than greylisted afresh by another.
    counts = [0, 0]
    counts[owner] = None
    assert choose(grey, "198.51.100.9", counts) is None
    # Trusted clients are not greylisted: fewest.
    assert choose(grey, "127.0.0.1", [4, 2]) == 1
    spread = {network_owner(f"10.{n}.0.1", 2) for n in range(20)}
    assert spread == {0, 1}


class _Refused:
    refusal = ()


class _AdoptingReactor:
    def __init__(self):
        self.adopted = []

    def adoptStreamConnection(self, fd, family, factory):
        self.adopted.append(factory.refusal[0])


class _FakeChannel:
    def __init__(self):
        self.sent = []

    def send(self, data, fd=None):
        self.sent.append(data)
        return True


def _dispatcher(max_total, max_ip, processes=2):
    counter = ConnectionCounter(max_total, max_ip)
    children = [Child(i) for i in range(processes)]
    for child in children:
        child.channel, child.ready = _FakeChannel(), True
    refused = _Refused()
    reactor = _AdoptingReactor()
    d = Dispatcher(counter, children, reactor, Metrics(), [(refused, refused)],
                   [Route(Route.FEWEST, False, lambda ip: False)])
    return d, children, reactor


def _accept(d, ip):
    a, b = socket.socketpair()
    b.close()
    d.accepted(0, a, (ip, 1234))


def test_limits_in_total_hold_across_processes_one_past():
    d, children, reactor = _dispatcher(4, 10)
    for n in range(4):
        _accept(d, f"192.0.2.{n}")
    assert [c.connections for c in children] == [2, 2]  # spread: fewest first
    _accept(d, "192.0.2.99")
    assert reactor.adopted == [replies.TOO_MANY_CONNECTIONS]
    # One closes in process 2: one more is admitted, and no more.
    d.closed(children[1], next(iter(children[1].open)))
    _accept(d, "192.0.2.50")
    _accept(d, "192.0.2.51")
    assert reactor.adopted == [replies.TOO_MANY_CONNECTIONS] * 2


def test_limits_per_address_hold_across_processes_one_past():
    d, children, reactor = _dispatcher(100, 3)
    for _ in range(3):
        _accept(d, "192.0.2.1")
    assert sorted(c.connections for c in children) == [1, 2]
    _accept(d, "192.0.2.1")
    assert reactor.adopted == [replies.TOO_MANY_CONNECTIONS_FROM_IP]
    _accept(d, "192.0.2.2")  # another address is admitted
    assert reactor.adopted == [replies.TOO_MANY_CONNECTIONS_FROM_IP]


def test_a_process_reports_its_closed_connections_by_address():
    """The parent counts a process's connections per client address; the process says
    ``closed <address>`` from its connection counter, keeping nothing per connection."""
    d, children, reactor = _dispatcher(10, 2)
    _accept(d, "192.0.2.1")
    _accept(d, "192.0.2.1")  # one in each process (the fewest first)
    assert children[0].channel.sent == [ch.encode("conn", 0, "192.0.2.1")]
    sent = []
    handed = HandedConnections(sent.append)
    assert handed.admit("192.0.2.1") is None and handed.admit("") is None
    handed.release("192.0.2.1")
    handed.release("")
    assert sent == [ch.encode("closed", "192.0.2.1"), ch.encode("closed", "-")]
    d.closed(children[0], "192.0.2.1")
    assert d.counter.connections == 1
    d.closed(children[0], "192.0.2.1")  # it had one only: nothing more released
    d.closed(children[1], "198.51.100.1")  # never given
    assert d.counter.connections == 1 and children[1].connections == 1
    _accept(d, "192.0.2.1")  # the per-address limit (2) counts the one still open
    _accept(d, "192.0.2.1")
    assert reactor.adopted == [replies.TOO_MANY_CONNECTIONS_FROM_IP]


def test_a_dead_process_releases_its_connections_and_gets_none():
    d, children, reactor = _dispatcher(3, 3)
    for _ in range(3):
        _accept(d, "192.0.2.1")
    held = children[0].connections
    d.lost(children[0])
    assert d.counter.connections == 3 - held
    sent_before = len(children[1].channel.sent)
    _accept(d, "192.0.2.1")
    assert len(children[1].channel.sent) == sent_before + 1
    d.lost(children[1])
    _accept(d, "192.0.2.1")
    assert reactor.adopted == [replies.PROCESS_UNAVAILABLE]
    assert d.counter.connections == 0


def test_restart_delay_doubles_while_a_process_dies_young():
    assert restart_delay(None, 0.1) == FIRST_DELAY
    assert restart_delay(FIRST_DELAY, 1.0) == 2 * FIRST_DELAY
    assert restart_delay(MAX_DELAY, 1.0) == MAX_DELAY
    assert restart_delay(MAX_DELAY, HEALTHY_AFTER) == FIRST_DELAY


def test_counters_of_a_process_are_counted_in_the_parents_metrics():
    sent = []
    clock = task.Clock()
    relay = MetricsRelay(sent.append, clock)
    relay.connection_opened("smtp")
    relay.accepted("smtp", 120, 1, 0, 0.0 + __import__("time").monotonic() - 0.004,
                   sender="<a@b.test>", recipients=iter(["<c@d.test>"]))
    relay.refused("rcpt", "greylist")
    relay.auth("failure")
    relay.add_state(object())
    with pytest.raises(AttributeError):
        relay.registry  # noqa: B018
    assert sent == [] and len(clock.getDelayedCalls()) == 1  # one flush for them all
    clock.advance(FLUSH_DELAY)
    [payload] = sent
    parent = Metrics()
    counts = replay(parent, payload)
    assert counts["accepted"] == 1 and counts["connection_opened"] == 1
    figures = snapshot(parent.registry)
    assert figures[("mailsrv_messages_accepted_total", (("listener", "smtp"),))] == 1
    assert figures[("mailsrv_refused_total", (("reason", "greylist"), ("stage", "rcpt")))] == 1
    assert figures[("mailsrv_auth_total", (("result", "failure"),))] == 1
    assert figures[("mailsrv_delivery_latency_seconds_count", ())] == 1
    # The latency is the time it took in the process, not the wait for the message.
    assert figures[("mailsrv_delivery_latency_seconds_sum", ())] < 0.5
    assert parent.senders.take() == {"<a@b.test>": (1, 120)}
    # A name that is not an event is not called.
    assert replay(parent, '[["__init__", [], {}]]')["__init__"] == 0
    relay.stop()


def test_events_wait_for_one_message_per_flush_delay():
    """The events of FLUSH_DELAY go in one message (not one per turn of the reactor); stop
    sends what is left at once, and its timer is gone."""
    sent = []
    clock = task.Clock()
    relay = MetricsRelay(sent.append, clock)
    relay.auth("failure")
    clock.advance(FLUSH_DELAY / 2)
    relay.auth("success")
    assert sent == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(FLUSH_DELAY / 2)
    assert len(sent) == 1 and sent[0].count('"auth"') == 2
    assert clock.getDelayedCalls() == []
    relay.refused("rcpt", "unknown")  # a new flush after the last
    assert len(clock.getDelayedCalls()) == 1
    relay.stop()
    assert len(sent) == 2 and '"refused"' in sent[1] and clock.getDelayedCalls() == []


def test_an_event_from_a_worker_thread_schedules_its_flush_on_the_reactor():
    sent, calls = [], []
    clock = task.Clock()
    clock.callFromThread = lambda f, *args: calls.append(f)  # the reactor's queue
    relay = MetricsRelay(sent.append, clock)
    worker = threading.Thread(target=relay.auth, args=("failure",))
    worker.start()
    worker.join()
    assert clock.getDelayedCalls() == [] and len(calls) == 1
    calls[0]()  # on the reactor thread
    clock.advance(FLUSH_DELAY)
    assert len(sent) == 1


def test_the_same_verdicts_are_sent_once_with_their_amount():
    sent = []
    relay = MetricsRelay(sent.append)
    for n in range(1000):
        relay.decision("local_recipient", "rcpt", "accept" if n % 10 else "reject")
    relay.refused("rcpt", "unknown")
    relay.flush()
    [payload] = sent
    assert payload.count('"decision"') == 2 and len(payload) < 300
    parent = Metrics()
    counts = replay(parent, payload)
    assert counts["decision"] == 1000 and counts["refused"] == 1
    figures = snapshot(parent.registry)

    def decisions(decision: str) -> float:
        return figures[("mailsrv_check_decisions_total", (
            ("check", "local_recipient"), ("decision", decision), ("stage", "rcpt")))]

    assert decisions("accept") == 900 and decisions("reject") == 100


def test_a_large_batch_is_split_into_messages_that_fit():
    sent = []
    relay = MetricsRelay(sent.append)
    for n in range(3000):
        relay.refused("rcpt", f"reason-{n:05d}-" + "x" * 40)
    relay.flush()
    assert len(sent) > 1 and all(len(p) <= 61000 for p in sent)
    parent = Metrics()
    assert sum(sum(replay(parent, p).values()) for p in sent) == 3000


def test_the_real_reactor_is_a_channel_reactor():
    # Channel needs addReader/addWriter: the server's reactor has them.
    for name in ("addReader", "removeReader", "addWriter", "removeWriter",
                 "adoptStreamConnection"):
        assert hasattr(real_reactor, name)


def _config(processes, source="/etc/mailsrv/mailsrv.toml"):
    from types import SimpleNamespace

    server = SimpleNamespace(process_count=processes)
    return SimpleNamespace(server=server, source=source)


def test_an_interpreter_the_servers_user_cannot_run_is_a_configuration_error(tmp_path):
    from mailsrv.config import ConfigError
    from mailsrv.procs.pool import check_interpreter

    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    check_interpreter(_config(2), str(python))
    python.chmod(0o644)  # no x bit at all: not even root may run it
    with pytest.raises(ConfigError, match=r"server\.processes: 2 receiving processes"):
        check_interpreter(_config(2), str(python))
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o000)
    try:
        with pytest.raises(ConfigError, match=str(hidden / "python")):
            check_interpreter(_config(2), str(hidden / "python"))
        check_interpreter(_config(1), str(hidden / "python"))  # one process: none spawned
    finally:
        hidden.chmod(0o700)


def test_a_process_that_cannot_be_spawned_is_retried_with_backoff_not_fatal():
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    from mailsrv.procs.pool import ReceiverPool

    class SpawnFails(Clock):
        spawned = 0

        def spawnProcess(self, *args, **kwargs):
            self.spawned += 1
            raise PermissionError(13, "Permission denied")

        def addReader(self, r):
            pass

        def removeReader(self, r):
            pass

    clock = SpawnFails()
    config = SimpleNamespace(smtp=SimpleNamespace(auth=False),
                             greylist=SimpleNamespace(enabled=False))
    runtime = SimpleNamespace(reactor=clock, tls=None, config=config, metrics=Metrics(),
                              may_relay=lambda ip: False)
    pool = ReceiverPool(runtime, ConnectionCounter(10, 10), [], 2)
    pool.startService()
    assert clock.spawned == 2
    clock.advance(FIRST_DELAY)
    assert clock.spawned == 4
    clock.advance(FIRST_DELAY)
    assert clock.spawned == 4  # the delay doubled
    clock.advance(FIRST_DELAY)
    assert clock.spawned == 6
    pool.stopService()


@pytest.mark.parametrize("event", [
    {"log_format": "accepted id={id} size={size} time={time:.3f} from={sender!r}",
     "id": "1xZ", "size": 5065, "time": 0.01234, "sender": "<a@b.test>"},
    {"log_format": "no fields at all"},
    {"log_format": "braces {{kept}} {n}", "n": 3},
    {"log_format": "a call {f()}", "f": lambda: "made"},  # twisted.logger's own syntax
    {"log_format": "a field missing {gone}"},
    {"log_format": "failed {what}", "what": "this", "log_failure": Failure(ValueError("x"))},
    {"message": ("a legacy event",), "isError": 0, "log_format": None},
])
def test_a_process_writes_an_event_as_twisted_logger_would(event):
    """The plain formats go through str.format_map; the text is twisted.logger's all the same
    (calls, failures, missing fields and legacy events are left to it)."""
    event = {"log_level": LogLevel.info, "log_namespace": "mailsrv", "log_source": None,
             "log_time": 0.0, **event}
    if event["log_format"] is None:
        del event["log_format"]
    assert event_text(event) == eventAsText(event, includeTimestamp=False, includeSystem=False)
