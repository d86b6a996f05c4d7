"""DNS blocklists: the query names, what an answer means, the score, the dnsbl check, the
[dnsbl] table, and Blocklists' sharing, caching and failure handling (on a task.Clock; the
real DNS is tests/e2e/test_dnsbl_gate.py's)."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.names import dns, error

from mailsrv import replies
from mailsrv.checks.dnsbl import Dnsbl, Listing, is_listing_answer, query_name, score
from mailsrv.checks.pipeline import ACCEPT, Client, Facts, Reject, Stage
from mailsrv.config import ConfigError, parse_config
from mailsrv.inbound.blocklists import CACHE_SECONDS, Blocklists
from mailsrv.routing.router import Directory


def test_query_names() -> None:
    assert query_name("192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert query_name("::ffff:192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert query_name("2001:db8:1:2::3", "bl.test") == (
        "3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test")


@pytest.mark.parametrize("answers, listed", [
    (["127.0.0.2"], True),
    (["127.0.0.4", "127.0.0.10"], True),
    ([], False),
    (["127.255.255.254"], False),  # the list refuses this resolver: not a listing
    (["10.0.0.1"], False),  # outside 127/8: nonsense, not a listing
    (["127.255.255.252", "127.0.0.2"], True),
])
def test_what_an_answer_means(answers, listed) -> None:
    assert is_listing_answer(answers) is listed


def test_score_keeps_the_configured_order() -> None:
    weights = {"a.test": 2, "b.test": 1, "c.test": 3}
    assert score(weights, ["c.test", "a.test"]) == Listing(("a.test", "c.test"), 5)
    assert score(weights, []) == Listing()
    assert score(weights, ["b.test"], allowed_by="ok.test").allowed_by == "ok.test"


def facts(listing: Listing | None, **client) -> Facts:
    return Facts(Stage.CONNECT, Client(ip="192.0.2.99", name="unknown[192.0.2.99]",
                                       blocklist=listing, **client),
                 Directory(["example.org"], None, {}))


def test_the_check_refuses_at_the_threshold_and_not_one_under() -> None:
    check = Dnsbl(threshold=3)
    assert check.check(facts(Listing(("a.test", "b.test"), 2))) is ACCEPT  # one under
    verdict = check.check(facts(Listing(("a.test", "c.test"), 3)))
    assert verdict == Reject(
        replies.DNSBL_LISTED.format(ip="192.0.2.99", zones="a.test, c.test"),
        reason="dnsbl a.test c.test score 3")
    assert (verdict.reply.code, verdict.reply.status) == (554, "5.7.1")


def test_allowlisted_trusted_authenticated_and_unknown_clients_pass() -> None:
    check = Dnsbl(threshold=1)
    listed = Listing(("a.test",), 5)
    assert check.check(facts(Listing(("a.test",), 5, allowed_by="ok.test"))) is ACCEPT
    assert check.check(facts(listed, trusted_network=True)) is ACCEPT
    assert check.check(facts(listed, authenticated_as="alice@example.org")) is ACCEPT
    assert check.check(facts(None)) is ACCEPT  # not looked up, or no answer by MAIL


def config(**dnsbl):
    return parse_config({"domains": {"local": ["example.org"]},
                         "mailboxes": {"root": "/nonexistent"}, "queue": {"path": "/nonexistent"},
                         "dnsbl": dnsbl}, None)


def test_the_dnsbl_table() -> None:
    c = config(zones={"Zen.Example": 2, "bl.test": 1}, threshold=2, allow_zones=["ok.test"])
    assert c.dnsbl.zones == (("zen.example", 2), ("bl.test", 1))
    assert c.dnsbl.allow_zones == ("ok.test",) and c.dnsbl.enabled
    assert not config().dnsbl.enabled
    for bad, key in (({"zones": {"bl.test": 0}}, "dnsbl.zones.bl.test"),
                     ({"zones": ["bl.test"]}, "dnsbl.zones"),
                     ({"zones": {"bl.test": True}}, "dnsbl.zones.bl.test"),
                     ({"threshold": 0}, "dnsbl.threshold"),
                     ({"allow_zones": "ok.test"}, "dnsbl.allow_zones")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config(**bad)


class Resolver:
    """A scripted resolver: each query name answers the given addresses, NXDOMAIN, or a
    Deferred the test fires (to hold a lookup open)."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def lookupAddress(self, name: str, timeout=None):
        self.asked.append(name)
        answer = self.answers.get(name)
        if isinstance(answer, defer.Deferred):
            return answer
        if isinstance(answer, Exception):
            return defer.fail(answer)
        if answer is None:
            return defer.fail(error.DNSNameError(name))
        records = [dns.RRHeader(name, dns.A, payload=dns.Record_A(a)) for a in answer]
        return defer.succeed((records, [], []))


def results(d: defer.Deferred) -> list:
    out: list = []
    d.addCallback(out.append)
    return out


def test_blocklists_share_cache_and_fail_open() -> None:
    clock = task.Clock()
    held: defer.Deferred = defer.Deferred()
    resolver = Resolver({"9.0.0.127.a.test": ["127.0.0.2"], "9.0.0.127.b.test": held,
                         "9.0.0.127.c.test": error.DNSServerError("SERVFAIL"),
                         "9.0.0.127.ok.test": None})
    lists = Blocklists(resolver, clock, {"a.test": 2, "b.test": 1, "c.test": 5},
                       allow_zones=["ok.test"], timeout=1.0)
    first, second = results(lists.lookup("127.0.0.9")), results(lists.lookup("127.0.0.9"))
    assert first == second == []  # b.test has not answered yet
    assert len(resolver.asked) == 4  # one lookup per zone, shared by both connections
    held.callback(([dns.RRHeader("x", dns.A, payload=dns.Record_A("127.0.0.3"))], [], []))
    assert first == second == [Listing(("a.test", "b.test"), 3)]  # c.test failed: not listed
    assert results(lists.lookup("127.0.0.9")) == first and len(resolver.asked) == 4  # cached
    clock.advance(CACHE_SECONDS + 1)
    resolver.answers["9.0.0.127.b.test"] = None
    assert results(lists.lookup("127.0.0.9")) == [Listing(("a.test",), 2)]  # asked again


def test_a_connection_gone_before_the_answer_does_not_break_the_others() -> None:
    held: defer.Deferred = defer.Deferred()
    lists = Blocklists(Resolver({"9.0.0.127.a.test": held}), task.Clock(), {"a.test": 1})
    gone = lists.lookup("127.0.0.9")
    gone.addErrback(lambda f: None)
    gone.cancel()
    staying = results(lists.lookup("127.0.0.9"))
    held.callback(([dns.RRHeader("x", dns.A, payload=dns.Record_A("127.0.0.2"))], [], []))
    assert staying == [Listing(("a.test",), 1)]
