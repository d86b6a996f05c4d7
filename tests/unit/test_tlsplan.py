"""mailsrv.outbound.tlsplan and DestinationDelivery.tls_for under MTA-STS, REQUIRETLS and
TLS-Required: No: the hosts a policy allows and the TLS each connection gets."""

from __future__ import annotations

import pytest
from twisted.internet import defer, error
from twisted.python.failure import Failure

from mailsrv.outbound.destination import SMARTHOST
from mailsrv.outbound.mtasts.policy import parse_policy
from mailsrv.outbound.mtasts.source import Lookup
from mailsrv.outbound.mx import MXHost
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.replies import Reply
from support.destination import make


def host(name: str) -> MXHost:
    return MXHost(name=name, preference=10, addresses=("192.0.2.25",))


def lookup(mode: str, *mx: str) -> Lookup:
    text = f"version: STSv1\nmode: {mode}\n" + "".join(f"mx: {m}\n" for m in mx) + "max_age: 60\n"
    return Lookup(parse_policy(text, id="1"))


def test_enforce_allows_only_the_hosts_it_names(tmp_path) -> None:
    plan = make(tmp_path).tls_plan
    attempts = []
    plan.on_attempt = attempts.append
    hosts = [host("mx1.a.test"), host("backup.b.test"), host("mx2.a.test")]
    allowed, refusal = plan.allowed("a.test", lookup("enforce", "*.a.test"), hosts)
    assert [h.name for h in allowed] == ["mx1.a.test", "mx2.a.test"] and refusal is None
    [attempt] = attempts
    assert (attempt.mx_host, attempt.result_type) == ("backup.b.test", "validation-failure")
    assert attempt.mx_patterns == ("*.a.test",) and attempt.policy_type == "sts"


def test_enforce_with_no_host_allowed_defers(tmp_path) -> None:
    plan = make(tmp_path).tls_plan
    allowed, refusal = plan.allowed("a.test", lookup("enforce", "mx.c.test"), [host("mx.a.test")])
    assert allowed == [] and str(refusal).startswith("451 4.7.0") and "mx.a.test" in str(refusal)


@pytest.mark.parametrize("found", [lookup("testing", "mx.c.test"), Lookup(None)])
def test_testing_or_no_policy_keeps_every_host(tmp_path, found) -> None:
    plan = make(tmp_path).tls_plan
    hosts = [host("mx.a.test")]
    assert plan.allowed("a.test", found, hosts) == (hosts, None)


def test_enforce_requires_tls_checked_after_the_handshake(tmp_path) -> None:
    destinations = make(tmp_path, tls="none")
    context, required = destinations.tls_for("a.test", host("mx.a.test"), enforce=True)
    assert context is not None and context is not destinations._opportunistic and required


def test_requiretls_asks_for_starttls_even_with_tls_none(tmp_path) -> None:
    destinations = make(tmp_path, tls="none")
    assert destinations.tls_for("a.test", host("mx.a.test")) == (None, False)
    context, required = destinations.tls_for("a.test", host("mx.a.test"), requiretls=True)
    assert context is destinations._opportunistic and not required


def test_tls_required_no_is_opportunistic_whatever_the_policy(tmp_path) -> None:
    destinations = make(tmp_path, tls="verify")
    context, required = destinations.tls_for("a.test", host("mx.a.test"), enforce=False,
                                             opt_out=True)
    assert context is destinations._opportunistic and not required


def test_tls_required_no_never_unverifies_a_smarthost_login(tmp_path) -> None:
    password = tmp_path / "password"
    password.write_text("secret\n")
    destinations = make(tmp_path, smarthost="smtp.example.net:587", smarthost_user="relay",
                        smarthost_password_file=str(password))
    context, required = destinations.tls_for(SMARTHOST, host("smtp.example.net"), opt_out=True)
    assert context is not destinations._opportunistic and required


def test_mta_sts_off_has_no_policy_source(tmp_path) -> None:
    resolver = object()
    assert make(tmp_path, resolver, mta_sts=False).tls_plan.source is None
    assert make(tmp_path, resolver).tls_plan.source is not None


class Session:
    """deliver() of one REQUIRETLS message over a MemoryReactor, outcomes decided here."""

    def __init__(self, tmp_path, hosts) -> None:
        self.destinations = make(tmp_path)
        self.reactor = self.destinations.reactor
        self.destinations.route = lambda key: defer.succeed(hosts)
        self.recorded: list = []
        self.done = self.destinations.deliver(
            "remote.test", [("Q1", ["a@remote.test"])], self.transactions, self.record)

    def transactions(self, items):
        return [OutboundTransaction(queue_id=q, sender="s@example.org", recipients=list(a),
                                    prefix=b"", body_path=None, requiretls=True)
                for q, a in items]

    def record(self, queue_id, results, where, tls=None, dsn=False):
        self.recorded.append((queue_id, {a: str(r) for a, r in results.items()}))

    def skip(self, index: int, reply: Reply) -> None:
        """The server at ``index`` was greeted; the client left the message for the next host."""
        factory = self.reactor.tcpClients[index][2]
        factory.outcome.greeted = True
        for t in factory.transactions:
            t.refused = reply
        factory.clientConnectionLost(None, Failure(error.ConnectionDone()))

    def refuse(self, index: int) -> None:
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))


NOT_OFFERED = Reply(550, "5.7.30", "REQUIRETLS support required: mx does not offer it")


def test_requiretls_bounces_when_every_host_refused_it(tmp_path) -> None:
    s = Session(tmp_path, [host("mx1.remote.test"), MXHost("mx2.remote.test", 20, ("192.0.2.26",))])
    s.skip(0, NOT_OFFERED)
    s.skip(1, NOT_OFFERED)
    assert s.recorded == [("Q1", {"a@remote.test": str(NOT_OFFERED)})]


def test_requiretls_waits_while_a_host_was_not_reached(tmp_path) -> None:
    s = Session(tmp_path, [host("mx1.remote.test"), MXHost("mx2.remote.test", 20, ("192.0.2.26",))])
    s.skip(0, NOT_OFFERED)
    s.refuse(1)
    [(queue_id, results)] = s.recorded
    assert results["a@remote.test"].startswith("451 4.4.1")  # retried, not bounced


def test_a_host_with_dane_is_exempt_from_the_mx_patterns(tmp_path) -> None:
    """RFC 8461 §2: DANE, not MTA-STS, for a host with TLSA records."""
    plan = make(tmp_path).tls_plan
    hosts = [host("mx.a.test"), host("other.b.test")]
    allowed, refusal = plan.allowed("a.test", lookup("enforce", "mx.a.test"), hosts,
                                    exempt={"other.b.test"})
    assert allowed == hosts and refusal is None


def test_the_host_check_under_dane_and_its_attempt_record(tmp_path) -> None:
    plan = make(tmp_path).tls_plan
    enforce = lookup("enforce", "mx.a.test")
    dane = plan.check("a.test", Lookup(None), host("mx.a.test"), "192.0.2.25", dane=True)
    assert dane.after_handshake(object()) is None and dane.verified  # DANE checked it
    assert dane.attempt(greeted=True, tls=True) is None  # not an MTA-STS attempt
    check = plan.check("a.test", enforce, host("mx.a.test"), "192.0.2.25")
    assert check.enforce and check.attempt(greeted=False, tls=False) is None  # unreachable
    broken = check.attempt(greeted=True, tls=False)  # a handshake that broke
    assert broken.result_type == "validation-failure" and broken.policy_type == "sts"
    assert str(check.without_tls()).startswith("451 4.7.4")
    assert check.attempt(greeted=True, tls=False).result_type == "starttls-not-supported"
    assert check.refusal is not None and not check.verified
