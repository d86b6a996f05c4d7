"""The DNS of the authentication checks (ThreadDNS: answers, cache, time limit, failures) and
the libraries plugged into it: pyspf (SPF results, limits) and dkimpy (every signature)."""

from __future__ import annotations

import base64
import threading

import dkim
import nacl.signing
import pytest
import spf
from twisted.internet import defer, task
from twisted.names import dns, error

from mailsrv.checks.auth import spfcheck
from mailsrv.checks.auth.dkimcheck import MAX_SIGNATURES, verify_all
from mailsrv.checks.auth.lookups import MAX_TTL, NEGATIVE_TTL, DNSTempError, Record, ThreadDNS
from mailsrv.checks.auth.spfcheck import check_spf
from support.dkimkey import rsa_key

# -- ThreadDNS on the reactor side ---------------------------------------------------------


class FakeResolver:
    """Answers queries from ``answers``: name -> list of RRHeader, an exception, or None
    (never answers)."""

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def query(self, query, timeout=None):
        name = query.name.name.decode()
        self.asked.append((name, query.type, timeout))
        answer = self.answers.get(name, error.DNSNameError(name))
        if answer is None:
            return defer.Deferred()
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed((answer, [], []))


def rr(name, payload, ttl=300):
    return dns.RRHeader(name=name.encode(), type=payload.TYPE, payload=payload, ttl=ttl)


def result_of(d):
    found = []
    d.addBoth(found.append)
    assert found, "the Deferred has not fired"
    if hasattr(found[0], "raiseException"):
        found[0].raiseException()
    return found[0]


@pytest.fixture
def clock():
    return task.Clock()


def make(answers, clock, timeout=5.0):
    resolver = FakeResolver(answers)
    return ThreadDNS(resolver, clock, timeout=timeout, clock=clock.seconds), resolver


def test_answers_become_records(clock):
    thread_dns, _ = make({"example.com": [
        rr("example.com", dns.Record_TXT(b"v=spf1 ", b"-all")),
        rr("example.com", dns.Record_A("192.0.2.1")),
        rr("example.com", dns.Record_AAAA("2001:db8::1")),
        rr("example.com", dns.Record_MX(10, b"mx.example.com.")),
        rr("alias.example.com", dns.Record_CNAME(b"Example.COM.")),
    ]}, clock)
    records = result_of(thread_dns.query("Example.com.", "TXT"))
    assert records == (
        Record("example.com", "TXT", (b"v=spf1 ", b"-all")),
        Record("example.com", "A", "192.0.2.1"),
        Record("example.com", "AAAA", "2001:db8::1"),
        Record("example.com", "MX", (10, "mx.example.com")),
        Record("alias.example.com", "CNAME", "example.com"),
    )


def test_answers_are_cached_for_their_ttl_at_most_an_hour(clock):
    thread_dns, resolver = make({
        "short.test": [rr("short.test", dns.Record_A("192.0.2.1"), ttl=30)],
        "long.test": [rr("long.test", dns.Record_A("192.0.2.2"), ttl=86400)],
    }, clock)
    for _ in range(3):
        result_of(thread_dns.query("short.test", "A"))
        result_of(thread_dns.query("long.test", "A"))
    assert len(resolver.asked) == 2
    clock.advance(31)
    result_of(thread_dns.query("short.test", "A"))
    result_of(thread_dns.query("long.test", "A"))
    assert len(resolver.asked) == 3
    clock.advance(MAX_TTL)
    result_of(thread_dns.query("long.test", "A"))
    assert len(resolver.asked) == 4


def test_a_cached_answer_is_read_in_the_thread_without_the_reactor(clock):
    """A worker thread's lookup of a fresh cached answer does not go through the reactor (the
    task.Clock here runs nothing from threads: a round trip would never come back)."""
    thread_dns, resolver = make({"cached.test": [rr("cached.test", dns.Record_A("192.0.2.1"),
                                                    ttl=30)]}, clock)
    result_of(thread_dns.query("cached.test", "A"))  # asked once, on "the reactor"
    found = []
    worker = threading.Thread(target=lambda: found.append(thread_dns.lookup("Cached.Test.", "A")))
    worker.start()
    worker.join(5)
    assert found == [(Record("cached.test", "A", "192.0.2.1"),)]


def test_nxdomain_is_empty_and_cached_a_minute(clock):
    thread_dns, resolver = make({}, clock)
    assert result_of(thread_dns.query("nowhere.test", "TXT")) == ()
    assert result_of(thread_dns.query("nowhere.test", "TXT")) == ()
    assert len(resolver.asked) == 1
    clock.advance(NEGATIVE_TTL + 1)
    result_of(thread_dns.query("nowhere.test", "TXT"))
    assert len(resolver.asked) == 2


@pytest.mark.parametrize("failure", [
    error.DNSServerError("SERVFAIL"), error.DNSQueryRefusedError("REFUSED"),
    error.DNSQueryTimeoutError("timeout"),
])
def test_failures_are_temporary_and_not_cached(clock, failure):
    thread_dns, resolver = make({"broken.test": failure}, clock)
    for _ in range(2):
        with pytest.raises(DNSTempError):
            result_of(thread_dns.query("broken.test", "TXT"))
    assert len(resolver.asked) == 2


def test_no_answer_in_time_is_temporary(clock):
    thread_dns, resolver = make({"silent.test": None}, clock, timeout=3)
    d = thread_dns.query("silent.test", "TXT")
    assert not d.called
    assert resolver.asked[0][2] == (3,)
    clock.advance(3)
    with pytest.raises(DNSTempError, match="no answer within 3 s"):
        result_of(d)
    assert clock.getDelayedCalls() == []


def test_an_unencodable_name_is_temporary_not_a_crash(clock):
    thread_dns, _ = make({}, clock)
    with pytest.raises(DNSTempError):
        result_of(thread_dns.query("bücher.test", "TXT"))


# -- libraries with a DNS of their own: pyspf -------------------------------------------


class ZoneDNS:
    """A ThreadDNS stand-in answering from a dict: name -> [(type, value)] or an exception."""

    def __init__(self, zone):
        self.zone = zone
        self.asked = []

    def lookup(self, name, rtype):
        self.asked.append((name, rtype))
        found = self.zone.get(name.lower().rstrip("."), [])
        if isinstance(found, Exception):
            raise found
        return tuple(Record(name.lower().rstrip("."), t, v) for t, v in found if t == rtype)

    def txt(self, name):
        return [b"".join(r.value) for r in self.lookup(name, "TXT")]


def spf_txt(text):
    return ("TXT", (text.encode(),))


SPF_ZONE = {
    "pass.test": [spf_txt("v=spf1 ip4:192.0.2.0/24 -all")],
    "mx.test": [spf_txt("v=spf1 mx -all"), ("MX", (10, "mail.mx.test"))],
    "mail.mx.test": [("A", "192.0.2.7")],
    "fail.test": [spf_txt("v=spf1 -all")],
    "two.test": [spf_txt("v=spf1 -all"), spf_txt("v=spf1 +all")],
    "bad.test": [spf_txt("v=spf1 ip4:192.0.2.300 -all")],
    "loop.test": [spf_txt("v=spf1 include:loop.test -all")],
    "many.test": [spf_txt("v=spf1 " + " ".join(f"a:h{i}.test" for i in range(11)) + " -all")],
    "ten.test": [spf_txt("v=spf1 " + " ".join(f"a:h{i}.test" for i in range(10)) + " -all")],
    **{f"h{i}.test": [("A", "198.51.100.1")] for i in range(11)},
    "temp.test": DNSTempError("SERVFAIL"),
    "helo.test": [spf_txt("v=spf1 ip4:192.0.2.9 -all")],
}


@pytest.mark.parametrize(("sender", "result"), [
    ("a@pass.test", "pass"), ("a@mx.test", "pass"), ("a@fail.test", "fail"),
    ("a@nothing.test", "none"), ("a@two.test", "permerror"), ("a@bad.test", "permerror"),
    ("a@loop.test", "permerror"), ("a@many.test", "permerror"), ("a@ten.test", "fail"),
    ("a@temp.test", "temperror"),
])
def test_spf_results(sender, result):
    found = check_spf(ZoneDNS(SPF_ZONE), "192.0.2.7", sender, "client.test")
    assert (found.result, found.scope, found.identity, found.domain) == (
        result, "mailfrom", sender, sender.split("@")[1])


def test_the_null_sender_checks_helo_and_an_address_literal_is_none():
    found = check_spf(ZoneDNS(SPF_ZONE), "192.0.2.9", None, "helo.test")
    assert (found.result, found.scope, found.identity, found.domain) == (
        "pass", "helo", "helo.test", "helo.test")
    assert check_spf(ZoneDNS(SPF_ZONE), "192.0.2.9", None, "[192.0.2.9]").result == "none"


def test_pyspf_never_asks_another_resolver():
    assert spf.DNSLookup is spfcheck._lookup
    # outside a check (no resolver set for this thread) every lookup is a temporary error
    with pytest.raises(spf.TempError):
        spf.DNSLookup("pass.test", "TXT", True, 5)
    errors = []

    def other_thread():
        try:
            spf.DNSLookup("pass.test", "TXT", True, 5)
        except spf.TempError as e:
            errors.append(e)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1


# -- dkimpy ------------------------------------------------------------------------------

MESSAGE = (b"From: a@signer.test\r\nTo: b@example.org\r\nSubject: s\r\n"
           b"Date: Thu, 03 Dec 2026 06:00:00 +0000\r\n\r\nHello.\r\n")


@pytest.fixture(scope="module")
def keys():
    pem, public = rsa_key()
    ed = nacl.signing.SigningKey.generate()
    return {
        "rsa": (pem, b"v=DKIM1; k=rsa; p=" + public.encode()),
        "ed": (base64.b64encode(bytes(ed)),
               b"v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(ed.verify_key))),
    }


def signed(keys, which="rsa", selector="sel", domain="signer.test", message=MESSAGE):
    algorithm = b"ed25519-sha256" if which == "ed" else b"rsa-sha256"
    signature = dkim.sign(message, selector.encode(), domain.encode(), keys[which][0],
                          signature_algorithm=algorithm, include_headers=[b"from", b"subject"])
    return (signature + message).replace(b"\r\n", b"\n")  # as spooled: LF line ends


def verify(message, zone):
    head = message.split(b"\n\n")[0] + b"\n"
    return verify_all(message, head, ZoneDNS(zone))


def test_rsa_and_ed25519_signatures_pass_each_on_its_own(keys):
    zone = {"rsa._domainkey.signer.test": [("TXT", (keys["rsa"][1],))],
            "ed._domainkey.signer.test": [("TXT", (keys["ed"][1],))]}
    both = signed(keys, "ed", "ed", message=signed(keys, "rsa", "rsa").replace(b"\n", b"\r\n"))
    results = verify(both, zone)
    assert [(r.result, r.selector, r.domain) for r in results] == [
        ("pass", "ed", "signer.test"), ("pass", "rsa", "signer.test")]
    assert all(len(r.b) == 8 for r in results)


def test_a_changed_body_fails_and_a_missing_key_is_permerror(keys):
    zone = {"sel._domainkey.signer.test": [("TXT", (keys["rsa"][1],))]}
    changed = signed(keys).replace(b"Hello.", b"Goodbye.")
    [result] = verify(changed, zone)
    assert (result.result, result.reason) == ("fail", "body hash mismatch")
    [result] = verify(signed(keys, selector="gone"), zone)
    assert result.result == "permerror" and "no key record" in result.reason
    [result] = verify(signed(keys), {"sel._domainkey.signer.test": [("TXT", (b"p=AAAA",))]})
    assert result.result == "permerror"


def test_a_dns_failure_is_temperror(keys):
    [result] = verify(signed(keys), {"sel._domainkey.signer.test": DNSTempError("SERVFAIL")})
    assert result.result == "temperror" and result.domain == "signer.test"


@pytest.mark.parametrize("signature", [
    b"DKIM-Signature: v=1; a=rsa-sha256; d=signer.test; nonsense\n",
    b"DKIM-Signature: garbage without tags\n",
    b"DKIM-Signature: v=1; a=rsa-md5; d=signer.test; s=sel; h=from; bh=AA==; b=AA==\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=signer.test; s=sel; h=subject; bh=AA==; b=AA==\n",
    b"DKIM-Signature: \xff\xfe\n",
])
def test_a_signature_that_does_not_parse_is_neutral_never_a_crash(signature):
    message = signature + MESSAGE.replace(b"\r\n", b"\n")
    [result] = verify(message, {})
    assert result.result in ("neutral", "permerror")


def test_unsigned_and_too_many_signatures(keys):
    assert verify(MESSAGE.replace(b"\r\n", b"\n"), {}) == ()
    zone = {"sel._domainkey.signer.test": [("TXT", (keys["rsa"][1],))]}
    message = MESSAGE
    for _ in range(MAX_SIGNATURES + 1):
        message = signed(keys, message=message).replace(b"\n", b"\r\n")
    results = verify(message.replace(b"\r\n", b"\n"), zone)
    assert [r.result for r in results] == ["pass"] * MAX_SIGNATURES + ["policy"]


# -- the Authenticator: everything for one message ----------------------------------------


def test_the_authenticator_checks_spf_dkim_and_dmarc_per_from_domain(tmp_path, keys):
    from mailsrv.checks.auth.evaluate import MAX_FROM_DOMAINS, Authenticator
    from mailsrv.message.headsection import inspect_head

    domains = [f"d{i}.test" for i in range(MAX_FROM_DOMAINS + 1)]
    zone = {"sel._domainkey.signer.test": [("TXT", (keys["rsa"][1],))],
            "_dmarc.signer.test": [spf_txt("v=DMARC1; p=reject")],
            "pass.test": [spf_txt("v=spf1 ip4:192.0.2.0/24 -all")],
            **{f"_dmarc.{d}": [spf_txt("v=DMARC1; p=quarantine")] for d in domains}}
    thread_dns = ZoneDNS(zone)
    authenticator = Authenticator(thread_dns, sample=lambda: 0.0)
    message = signed(keys)
    path = tmp_path / "spool"
    path.write_bytes(message)
    auth = authenticator.evaluate("192.0.2.7", "client.test", "x@pass.test",
                                  inspect_head(message), path)
    assert auth.summary() == "spf=pass dkim=pass dmarc=pass arc=none"
    assert auth.from_domains == ("signer.test",)

    many = ("From: " + ", ".join(f"a@{d}" for d in domains) + "\nSubject: s\n\nbody\n").encode()
    path.write_bytes(many)
    thread_dns.asked.clear()
    auth = authenticator.evaluate("192.0.2.7", "client.test", "x@pass.test",
                                  inspect_head(many), path)
    assert len(auth.from_domains) == MAX_FROM_DOMAINS + 1
    assert [r.from_domain for r in auth.dmarc] == domains[:MAX_FROM_DOMAINS]  # one past: left
    assert {r.disposition for r in auth.dmarc} == {"quarantine"}
    assert auth.dkim == () and not any("_domainkey" in name for name, _ in thread_dns.asked)


def test_the_authenticator_does_only_what_is_turned_on(tmp_path):
    from mailsrv.checks.auth.evaluate import Authenticator
    from mailsrv.message.headsection import inspect_head

    message = b"From: a@signer.test\nSubject: s\n\nbody\n"
    path = tmp_path / "spool"
    path.write_bytes(message)
    thread_dns = ZoneDNS({})
    auth = Authenticator(thread_dns, spf=False, dkim=False, dmarc=False, arc=False).evaluate(
        "192.0.2.7", "client.test", "x@pass.test", inspect_head(message), path)
    assert auth.summary() == "spf=skipped dkim=skipped dmarc=skipped"
    assert thread_dns.asked == []


def test_spf_already_checked_before_rcpt_is_not_checked_again(tmp_path):
    """Greylisting checked SPF for a big provider's sender before RCPT: the end of DATA uses
    that result for the same client, HELO and sender instead of asking DNS again; with
    [checks] spf off it is not reported."""
    from mailsrv.checks.auth.evaluate import Authenticator
    from mailsrv.checks.auth.spfcheck import SPFResult
    from mailsrv.message.headsection import inspect_head

    message = b"From: x@pass.test\nSubject: s\n\nbody\n"
    path = tmp_path / "spool"
    path.write_bytes(message)
    thread_dns = ZoneDNS({"pass.test": [spf_txt("v=spf1 ip4:192.0.2.0/24 -all")]})
    known = SPFResult("pass", "mailfrom", "x@pass.test", "pass.test")
    auth = Authenticator(thread_dns, dkim=False, dmarc=False, arc=False).evaluate(
        "192.0.2.7", "client.test", "x@pass.test", inspect_head(message), path, spf_known=known)
    assert auth.spf is known and thread_dns.asked == []
    auth = Authenticator(thread_dns, spf=False, dkim=False, dmarc=False, arc=False).evaluate(
        "192.0.2.7", "client.test", "x@pass.test", inspect_head(message), path, spf_known=known)
    assert auth.spf is None
