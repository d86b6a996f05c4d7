"""
mailsrv.outbound.destination in-process: the TLS chosen per destination and host, and the
host-by-host loop of one session, on a MemoryReactor (connections recorded, never made) whose
outcomes the test decides.  The SMTP exchange itself is tests/unit/test_smtpclient.py's.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, error
from twisted.python.failure import Failure

from mailsrv.outbound.destination import SMARTHOST
from mailsrv.outbound.mx import DestinationError, MXHost
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.replies import Reply
from mailsrv.storage.envelope import QueuedRecipient
from support.destination import make


def host(name: str, *addresses: str) -> MXHost:
    return MXHost(name=name, preference=10, addresses=addresses)


# --- TLS per destination ---------------------------------------------------------------------


@pytest.mark.parametrize("relay, key, host_name, expected", [
    ({"tls": "none"}, "remote.test", "mx.remote.test", "none"),
    ({}, "remote.test", "mx.remote.test", "opportunistic"),
    ({"tls": "verify"}, "remote.test", "mx.remote.test", "verify"),
    # An address literal has no name to check: TLS is required, the certificate is not.
    ({"tls": "verify"}, "[192.0.2.25]", "[192.0.2.25]", "required"),
    ({"tls": "none", "tls_policy": {"secure.test": "verify"}}, "secure.test", "mx.secure.test",
     "verify"),
    ({"tls": "verify", "tls_policy": {"old.test": "none"}}, "old.test", "mx.old.test", "none"),
    ({"tls": "none", "smarthost": "smtp.example.net:587"}, SMARTHOST, "smtp.example.net", "none"),
    ({"smarthost": "smtp.example.net:587", "tls_policy": {"smtp.example.net": "verify"}},
     SMARTHOST, "smtp.example.net", "verify"),
])
def test_the_tls_each_host_gets(tmp_path, relay, key, host_name, expected) -> None:
    destinations = make(tmp_path, **relay)
    context, required = destinations.tls_for(key, host(host_name, "192.0.2.25"))
    if expected == "none":
        assert (context, required) == (None, False)
    elif expected == "opportunistic":
        assert context is destinations._opportunistic and not required
    elif expected == "required":
        assert context is destinations._opportunistic and required
    else:
        assert context is not None and context is not destinations._opportunistic and required


def test_a_smarthost_with_a_login_is_always_verified(tmp_path) -> None:
    password = tmp_path / "password"
    password.write_text("secret\n")
    destinations = make(tmp_path, tls="none", smarthost="smtp.example.net:587",
                        smarthost_user="relay", smarthost_password_file=str(password))
    context, required = destinations.tls_for(SMARTHOST, host("smtp.example.net", "192.0.2.25"))
    assert context is not None and context is not destinations._opportunistic and required


def test_the_destination_of_a_recipient(tmp_path) -> None:
    recipient = QueuedRecipient("bob@Remote.Test")
    assert make(tmp_path).key(recipient) == "remote.test"
    assert make(tmp_path, smarthost="smtp.example.net").key(recipient) == SMARTHOST


# --- one session, host by host ---------------------------------------------------------------

BATCH = [("Q1", ["a@remote.test", "b@remote.test"]), ("Q2", ["c@remote.test"])]
OK = Reply(250, "2.0.0", "Ok")


class Session:
    """Runs deliver() for BATCH with the given hosts; keeps what was recorded."""

    def __init__(self, tmp_path, hosts, key: str = "remote.test", **relay) -> None:
        self.destinations = make(tmp_path, **relay)
        self.reactor = self.destinations.reactor
        if isinstance(hosts, Exception):
            self.destinations.route = lambda key: defer.fail(hosts)
        else:
            self.destinations.route = lambda key: defer.succeed(hosts)
        self.recorded: list[tuple[str, dict[str, str], str | None, str | None]] = []
        self.still = dict(BATCH)  # what make_transactions still finds queued
        self.done = self.destinations.deliver(key, BATCH, self.transactions, self.record)

    def transactions(self, items):
        return [
            OutboundTransaction(queue_id=q, sender="s@example.org",
                        recipients=[a for a in addresses if a in self.still.get(q, [])],
                        prefix=b"", body_path=None)
            for q, addresses in items if self.still.get(q)
        ]

    def record(self, queue_id, results, where, tls=None, dsn=False):
        self.recorded.append((queue_id, {a: str(r) for a, r in results.items()}, where, tls))

    def connected(self) -> list[tuple[str, int]]:
        return [(h, p) for h, p, *_ in self.reactor.tcpClients]

    def refuse(self, index: int) -> None:
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

    def answer(self, index: int, replies: dict[str, Reply], attempted=(), tls=None) -> None:
        """The server at connection ``index`` answered ``replies``; the session then ends."""
        factory = self.reactor.tcpClients[index][2]
        factory.outcome.greeted = True
        factory.outcome.tls = tls
        for t in factory.transactions:
            t.results.update({a: r for a, r in replies.items() if a in t.recipients})
            t.attempted = t.queue_id in attempted or bool(t.results)
        factory.clientConnectionLost(None, Failure(error.ConnectionDone()))


def test_a_refused_address_passes_the_session_to_the_next(tmp_path) -> None:
    s = Session(tmp_path, [host("mx1.remote.test", "192.0.2.1"),
                           host("mx2.remote.test", "192.0.2.2", "192.0.2.3")])
    assert s.connected() == [("192.0.2.1", 25)]
    s.refuse(0)
    assert s.connected() == [("192.0.2.1", 25), ("192.0.2.2", 25)]
    s.answer(1, {"a@remote.test": OK, "b@remote.test": OK, "c@remote.test": OK}, tls="TLSv1.3")
    assert s.recorded == [
        ("Q1", {"a@remote.test": "250 2.0.0 Ok", "b@remote.test": "250 2.0.0 Ok"},
         "mx2.remote.test[192.0.2.2]:25", "TLSv1.3"),
        ("Q2", {"c@remote.test": "250 2.0.0 Ok"}, "mx2.remote.test[192.0.2.2]:25", "TLSv1.3"),
    ]
    assert s.done.called and len(s.connected()) == 2


def test_a_broken_transaction_is_deferred_not_sent_elsewhere(tmp_path) -> None:
    s = Session(tmp_path, [host("mx1.remote.test", "192.0.2.1", "192.0.2.2")])
    # Q1 got its RCPT replies and MAIL FROM, then the connection dropped; Q2 never started.
    s.answer(0, {"a@remote.test": Reply(550, "5.1.1", "no such user")}, attempted={"Q1"})
    where = "mx1.remote.test[192.0.2.1]:25"
    assert s.recorded == [("Q1", {"a@remote.test": "550 5.1.1 no such user",
                                  "b@remote.test": f"451 4.4.2 {where}: session ended"},
                           where, None)]
    assert s.connected()[-1] == ("192.0.2.2", 25)  # Q2 alone goes on
    assert [t.queue_id for t in s.reactor.tcpClients[-1][2].transactions] == ["Q2"]


def test_no_host_answering_defers_everything(tmp_path) -> None:
    s = Session(tmp_path, [host("mx1.remote.test", "192.0.2.1")])
    s.refuse(0)
    refused = Failure(error.ConnectionRefusedError()).getErrorMessage()
    reply = f"451 4.4.1 mx1.remote.test[192.0.2.1]:25: {refused}"
    assert [(q, set(r.values()), where) for q, r, where, _ in s.recorded] == [
        ("Q1", {reply}, None), ("Q2", {reply}, None)]


def test_no_host_at_all(tmp_path) -> None:
    s = Session(tmp_path, [])
    assert s.recorded[0][1]["a@remote.test"] == "451 4.4.1 no MX host could be reached"


def test_a_mail_loop_stops_the_session(tmp_path) -> None:
    s = Session(tmp_path, [host("mx1.remote.test", "192.0.2.1", "192.0.2.2")])
    factory = s.reactor.tcpClients[0][2]
    factory.outcome.loop = True
    factory.outcome.error = Reply(554, "5.4.6", "mail for remote.test loops back to myself")
    factory.clientConnectionLost(None, Failure(error.ConnectionDone()))
    assert {r for _, results, _, _ in s.recorded for r in results.values()} == {
        "554 5.4.6 mail for remote.test loops back to myself"}
    assert len(s.connected()) == 1


@pytest.mark.parametrize("key, relay, expected", [
    ("remote.test", {}, "550 5.1.10 remote.test has a null MX"),
    (SMARTHOST, {"smarthost": "smtp.example.net"}, "451 4.1.10 remote.test has a null MX"),
])
def test_a_destination_that_takes_no_mail(tmp_path, key, relay, expected) -> None:
    s = Session(tmp_path, DestinationError(Reply(550, "5.1.10", "remote.test has a null MX")), key,
                **relay)
    assert s.recorded == [
        ("Q1", {"a@remote.test": expected, "b@remote.test": expected}, None, None),
        ("Q2", {"c@remote.test": expected}, None, None),
    ]


def test_messages_gone_meanwhile_are_not_sent(tmp_path) -> None:
    s = Session(tmp_path, [host("mx1.remote.test", "192.0.2.1", "192.0.2.2")])
    s.still = {}  # deleted or bounced by the administrator while the first address was tried
    s.refuse(0)
    assert len(s.connected()) == 1 and s.recorded == [] and s.done.called


def test_the_smarthost_port_and_login(tmp_path) -> None:
    password = tmp_path / "password"
    password.write_text("secret\n")
    s = Session(tmp_path, [host("smtp.example.net", "192.0.2.9")], SMARTHOST,
                smarthost="smtp.example.net:587", smarthost_user="relay",
                smarthost_password_file=str(password))
    assert s.connected() == [("192.0.2.9", 587)]
    assert s.reactor.tcpClients[0][2].client_args["auth"] == ("relay", "secret")
