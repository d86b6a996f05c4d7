"""
DANE's hook in mailsrv.outbound.destination, in-process on a MemoryReactor (as
test_relay_destination.py): which destinations ask for a DANE plan, the TLS a DANE host
gets, a host whose lookups failed skipped for the next, 4.7.5 when DANE failed last, and the
attempts told to the listeners (TLS-RPT's source).
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.python.failure import Failure

from mailsrv.outbound.dane import TLSA
from mailsrv.outbound.danelookup import DaneLookupFailed, DanePolicy
from mailsrv.outbound.danetls import DaneTLS
from mailsrv.outbound.destination import SMARTHOST
from mailsrv.outbound.mx import MXHost
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.replies import Reply
from support import destination

OK = Reply(250, "2.0.0", "Ok")
MX1 = MXHost("mx1.remote.test", 10, ("192.0.2.1",))
MX2 = MXHost("mx2.remote.test", 20, ("192.0.2.2",))
POLICY = DanePolicy("mx2.remote.test", "mx2.remote.test", (TLSA(3, 1, 1, b"\1" * 32),))
FAILED = DaneLookupFailed("mx1.remote.test", "dnssec-invalid",
                          "the TLSA lookup for mx1.remote.test failed")


class FakeDane:
    def __init__(self, plan):
        self.plan_for = plan
        self.asked = []

    def plan(self, domain, hosts):
        self.asked.append(domain)
        return defer.succeed(self.plan_for)


class Session:
    def __init__(self, tmp_path, plan, key="remote.test", hosts=(MX1, MX2), **relay):
        self.destinations = destination.make(
            tmp_path, **dict({"dane": True, "dns_servers": ["127.0.0.1"]}, **relay))
        self.dane = self.destinations._dane = FakeDane(plan)
        self.destinations.route = lambda key: defer.succeed(list(hosts))
        self.reactor = self.destinations.runtime.reactor
        self.attempts = []
        self.destinations.tls_attempts.append(self.attempts.append)
        self.recorded = []
        self.done = self.destinations.deliver(key, [("Q1", ["a@remote.test"])], self.transactions,
                                              self.record)

    def transactions(self, items):
        return [OutboundTransaction(queue_id=q, sender="s@example.org", recipients=list(a),
                                    prefix=b"", body_path=None) for q, a in items]

    def record(self, queue_id, results, where, tls=None, dsn=False, **extra):
        self.recorded.append((queue_id, {a: str(r) for a, r in results.items()}, where, extra))

    def factory(self, index):
        return self.reactor.tcpClients[index][2]

    def end(self, index, greeted=True, delivered=False):
        factory = self.factory(index)
        factory.outcome.greeted = greeted
        if delivered:
            for t in factory.transactions:
                t.results.update({a: OK for a in t.recipients})
                t.attempted = True
        factory.clientConnectionLost(None, Failure(error.ConnectionDone()))


def test_a_failed_lookup_skips_the_host_and_a_policy_requires_dane_tls(tmp_path):
    s = Session(tmp_path, {"mx1.remote.test": FAILED, "mx2.remote.test": POLICY})
    assert [h for h, *_ in s.reactor.tcpClients] == ["192.0.2.2"]  # mx1 never connected to
    args = s.factory(0).client_args
    assert isinstance(args["tls_context"], DaneTLS) and args["require_tls"] is True
    assert args["tls_context"].policy is POLICY and args["tls_context"].names == (
        "mx2.remote.test", "remote.test")
    s.end(0, delivered=True)
    assert s.recorded == [("Q1", {"a@remote.test": "250 2.0.0 Ok"},
                           "mx2.remote.test[192.0.2.2]:25", {"tls_policy": "dane"})]
    # mx1's failed lookup, then mx2's session (greeted, no STARTTLS in this fake)
    assert [(a.mx_host, a.ip, a.result_type) for a in s.attempts] == [
        ("mx1.remote.test", None, "dnssec-invalid"),
        ("mx2.remote.test", "192.0.2.2", "starttls-not-supported")]
    assert s.attempts[1].policy_string == ("3 1 1 " + "01" * 32,)


def test_dane_failing_last_defers_with_4_7_5(tmp_path):
    s = Session(tmp_path, {"mx1.remote.test": FAILED, "mx2.remote.test": POLICY})
    s.end(0)  # greeted, but no TLS: DANE's failure
    [(_, results, where, extra)] = s.recorded
    assert where is None and extra == {"tls_policy": "dane"}
    assert results["a@remote.test"].startswith(
        "451 4.7.5 mx2.remote.test[192.0.2.2]:25: DANE: starttls-not-supported")


def test_a_host_without_dane_after_one_that_failed_it(tmp_path):
    s = Session(tmp_path, {"mx1.remote.test": FAILED})  # mx2: no DANE
    args = s.factory(0).client_args
    assert args["tls_context"] is s.destinations._opportunistic and args["require_tls"] is False
    s.factory(0).clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    [(_, results, _, extra)] = s.recorded
    assert results["a@remote.test"].startswith("451 4.4.1 mx2.remote.test")  # the last problem
    assert extra == {}
    assert [a.result_type for a in s.attempts] == ["dnssec-invalid"]  # none for no connection


def test_only_the_lookups_failing_defers_with_4_7_5(tmp_path):
    s = Session(tmp_path, {"mx1.remote.test": FAILED}, hosts=(MX1,))
    assert s.reactor.tcpClients == []
    [(_, results, _, _)] = s.recorded
    assert results["a@remote.test"] == (
        "451 4.7.5 DANE: the TLSA lookup for mx1.remote.test failed")


def test_who_asks_for_a_plan(tmp_path):
    s = Session(tmp_path, {})
    assert s.dane.asked == ["remote.test"]
    none = Session(tmp_path, {"mx1.remote.test": FAILED}, tls_policy={"remote.test": "none"})
    assert none.dane.asked == [] and none.factory(0).client_args["tls_context"] is None
    smart = Session(tmp_path, {"mx1.remote.test": FAILED}, key=SMARTHOST,
                    smarthost="smtp.example.net")
    assert smart.dane.asked == [] and len(smart.reactor.tcpClients) == 1


def test_no_dane_without_the_key(tmp_path):
    assert destination.make(tmp_path)._dane is None
