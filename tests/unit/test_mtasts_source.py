"""mailsrv.outbound.mtasts.source: which policy applies (RFC 8461 §5), the DNS and HTTPS
halves replaced by scripted answers (their own behaviour is tests/e2e/test_mta_sts.py's)."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface.verify import verifyObject

from mailsrv.outbound.mtasts import fetch, source
from mailsrv.outbound.mtasts.cache import PolicyCache
from mailsrv.outbound.mtasts.fetch import FetchError
from mailsrv.outbound.mtasts.policy import parse_policy


def text(mode: str = "enforce", max_age: int = 100) -> str:
    return f"version: STSv1\nmode: {mode}\nmx: mx.a.test\nmax_age: {max_age}\n"


class Script:
    """The answers of the TXT lookup and the fetch, and what was asked."""

    def __init__(self, monkeypatch, clock) -> None:
        self.txt: object = "1"  # an id, None (no record) or a FetchError
        self.policy: object = text()  # the policy text served, or a FetchError
        self.fetches = 0
        self.clock = clock

        def lookup_id(resolver, domain, timeout):
            if isinstance(self.txt, Exception):
                return defer.fail(self.txt)
            return defer.succeed(self.txt)

        def fetch_policy(reactor, resolver, domain, *, policy_id, **kwargs):
            self.fetches += 1
            if isinstance(self.policy, Exception):
                return defer.fail(self.policy)
            return defer.succeed(parse_policy(self.policy, id=policy_id, fetched=self.clock()))

        monkeypatch.setattr(source, "lookup_id", lookup_id)
        monkeypatch.setattr(source, "fetch_policy", fetch_policy)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    script = Script(monkeypatch, clock)

    def make():
        return source.PolicySource(
            reactor=None, resolver=None, cache=PolicyCache(tmp_path / "sts"),
            in_thread=lambda f, *a: defer.maybeDeferred(f, *a), trust_root=None, clock=clock)
    return make, script, now


def lookup(src, domain="a.test"):
    results = []
    src.lookup(domain).addCallback(results.append)
    assert results, "the lookup did not fire"
    return results[0]


def test_fetched_once_then_cached_while_the_id_stays(setup) -> None:
    make, script, now = setup
    src = make()
    assert lookup(src).policy.mode == "enforce"
    assert lookup(src).policy.mode == "enforce"
    assert script.fetches == 1
    now[0] += 99
    lookup(src)
    assert script.fetches == 1
    now[0] += 1  # max_age reached: fetched again
    lookup(src)
    assert script.fetches == 2


def test_a_new_id_fetches_again(setup) -> None:
    make, script, _ = setup
    src = make()
    lookup(src)
    script.txt, script.policy = "2", text("testing")
    assert lookup(src).policy.mode == "testing" and script.fetches == 2


def test_no_record_or_a_failed_lookup_keeps_the_cached_policy(setup) -> None:
    make, script, now = setup
    lookup(make())
    script.txt = None
    assert lookup(make()).policy.mode == "enforce"  # a new instance: read from disk
    script.txt = FetchError("sts-policy-fetch-error", "SERVFAIL")
    result = lookup(make())
    assert result.policy.mode == "enforce" and result.failure is None  # not a policy failure
    script.txt = FetchError("sts-policy-invalid", "two v=STSv1 records")
    result = lookup(make())
    assert result.policy.mode == "enforce" and result.failure.result_type == "sts-policy-invalid"
    now[0] += 100  # expired: nothing applies
    assert lookup(make()).policy is None


def test_a_failed_refresh_keeps_the_cached_policy_until_it_expires(setup) -> None:
    make, script, now = setup
    src = make()
    lookup(src)
    script.txt, script.policy = "2", FetchError("sts-webpki-invalid", "bad certificate")
    result = lookup(src)
    assert result.policy.id == "1" and result.failure.result_type == "sts-webpki-invalid"
    now[0] += 100
    result = lookup(src)
    assert result.policy is None and result.failure.result_type == "sts-webpki-invalid"


def test_no_record_and_nothing_cached_is_no_policy_without_a_fetch(setup) -> None:
    make, script, _ = setup
    script.txt = None
    assert lookup(make()).policy is None and script.fetches == 0


def test_mode_none_replaces_the_cached_policy_and_is_no_policy(setup) -> None:
    make, script, _ = setup
    lookup(make())
    script.txt, script.policy = "2", text("none")
    assert lookup(make()).policy is None
    script.txt = None
    assert lookup(make()).policy is None  # the cache holds mode none now


def test_one_fetch_at_a_time_per_domain(setup, monkeypatch) -> None:
    make, script, _ = setup
    pending: defer.Deferred = defer.Deferred()
    monkeypatch.setattr(source, "lookup_id", lambda *a: pending)
    src = make()
    first, second = [], []
    src.lookup("a.test").addCallback(first.append)
    src.lookup("A.test.").addCallback(second.append)
    pending.callback("1")
    assert first[0] == second[0] and script.fetches == 1


def test_the_agent_endpoint_factory_provides_its_interface() -> None:
    factory = fetch._OneAddress(None, "192.0.2.1", 443, "mta-sts.a.test", None, 10.0)
    assert verifyObject(IAgentEndpointFactory, factory)
