"""The pure parts of inbound mail authentication: DMARC records, organizational domains,
alignment, the policy decision, the Authentication-Results: text, and the checks acting on
the results (mailsrv.checks.auth)."""

from __future__ import annotations

import authres
import pytest
from zope.interface.verify import verifyObject

from mailsrv.checks.auth import dmarc
from mailsrv.checks.auth.checks import (
    AuthenticationResults,
    DmarcPolicy,
    OwnDomains,
    auth_checks,
)
from mailsrv.checks.auth.dkimcheck import DKIMResult
from mailsrv.checks.auth.lookups import DNSTempError
from mailsrv.checks.auth.results import (
    AuthResults,
    authserv_id,
    header_field,
    rename_fields,
)
from mailsrv.checks.auth.spfcheck import SPFResult
from mailsrv.checks.pipeline import (
    ACCEPT,
    AddHeaders,
    Client,
    Facts,
    FileInto,
    Reject,
    Stage,
    TempFail,
)
from mailsrv.config import parse_config
from mailsrv.interfaces import ICheck
from mailsrv.message.headsection import inspect_head
from mailsrv.routing.address import parse_mail_from
from mailsrv.routing.router import Directory

DIRECTORY = Directory(["example.org", "example.net"], None, {})


# -- DMARC records ------------------------------------------------------------------------


def test_a_record_with_every_tag():
    record = dmarc.parse_record("v=DMARC1; p=Reject; sp=none; adkim=s; aspf=s; pct=20; rua=x")
    assert record == dmarc.DMARCRecord(p="reject", sp="none", adkim="s", aspf="s", pct=20)


def test_defaults_and_bad_optional_tags_keep_their_defaults():
    assert dmarc.parse_record("v=DMARC1; p=none") == dmarc.DMARCRecord(p="none")
    assert dmarc.parse_record("v=DMARC1;p=quarantine;adkim=x;aspf=;pct=101") == (
        dmarc.DMARCRecord(p="quarantine"))
    assert dmarc.parse_record("v=DMARC1; p=reject; pct=-1").pct == 100


def test_a_bad_p_is_none_with_rua_and_no_record_without():
    # RFC 7489 §6.6.3 step 6
    assert dmarc.parse_record("v=DMARC1; p=bogus; rua=mailto:a@b") == dmarc.DMARCRecord("none")
    assert dmarc.parse_record("v=DMARC1; p=bogus") is None
    assert dmarc.parse_record("v=DMARC1; rua=mailto:a@b") == dmarc.DMARCRecord("none")
    assert dmarc.parse_record("v=DMARC1; p=reject; sp=bogus") is None


@pytest.mark.parametrize(("text", "is_dmarc"), [
    ("v=DMARC1; p=none", True), ("v=DMARC1", True), ("v = DMARC1 ;p=none", True),
    ("p=none; v=DMARC1", False), ("v=DMARC10; p=none", False), ("v=spf1 -all", False),
])
def test_v_dmarc1_must_come_first(text, is_dmarc):
    assert dmarc.is_dmarc(text) is is_dmarc


# -- organizational domains and alignment ----------------------------------------------


@pytest.mark.parametrize(("domain", "org"), [
    ("example.com", "example.com"),
    ("a.b.example.com", "example.com"),
    ("Mail.Example.COM.", "example.com"),
    ("x.co.uk", "x.co.uk"),
    ("a.x.co.uk", "x.co.uk"),
    ("a.b.c.ck", "b.c.ck"),  # *.ck: every name under ck is a suffix ...
    ("a.www.ck", "www.ck"),  # ... except www.ck (!www.ck)
    ("a.b.unknown-tld", "b.unknown-tld"),  # no rule: the default rule "*"
    ("localhost", "localhost"),
])
def test_org_domain_from_the_public_suffix_list(domain, org):
    assert dmarc.org_domain(domain) == org


def test_alignment_relaxed_and_strict():
    assert dmarc.aligned("mail.example.com", "example.com", "r")
    assert dmarc.aligned("a.example.com", "b.example.com", "r")
    assert not dmarc.aligned("mail.example.com", "example.com", "s")
    assert dmarc.aligned("EXAMPLE.com", "example.com.", "s")
    assert not dmarc.aligned("example.net", "example.com", "r")
    assert not dmarc.aligned("a.co.uk", "b.co.uk", "r")  # a public suffix is no organization
    assert not dmarc.aligned("", "example.com", "r")


# -- finding the policy -------------------------------------------------------------------


def txt_of(zone):
    def txt(name):
        value = zone.get(name, [])
        if isinstance(value, Exception):
            raise value
        return [v.encode() for v in value]
    return txt


def test_the_from_domain_record_comes_first_then_the_org_domain():
    zone = {"_dmarc.example.com": ["v=DMARC1; p=reject; sp=quarantine"],
            "_dmarc.own.example.com": ["v=DMARC1; p=none"]}
    own = dmarc.find_policy("own.example.com", txt_of(zone))
    assert (own.policy_domain, own.policy) == ("own.example.com", "none")
    sub = dmarc.find_policy("news.example.com", txt_of(zone))
    assert (sub.policy_domain, sub.org_domain, sub.policy) == (
        "example.com", "example.com", "quarantine")  # sp= for a subdomain
    org = dmarc.find_policy("example.com", txt_of(zone))
    assert org.policy == "reject"  # p= for the domain itself


def test_no_sp_means_p_for_subdomains_and_two_records_mean_none():
    zone = {"_dmarc.example.com": ["v=DMARC1; p=reject"],
            "_dmarc.two.example.com": ["v=DMARC1; p=none", "v=DMARC1; p=none"],
            "_dmarc.other.example.com": ["some other TXT"]}
    assert dmarc.find_policy("a.example.com", txt_of(zone)).policy == "reject"
    # two records: no policy there (§6.6.3 step 5), the organizational domain's applies
    assert dmarc.find_policy("two.example.com", txt_of(zone)).policy_domain == "example.com"
    assert dmarc.find_policy("other.example.com", txt_of(zone)).policy == "reject"
    assert dmarc.find_policy("example.net", txt_of(zone)).record is None


def test_a_dns_failure_is_an_error_not_a_missing_record():
    found = dmarc.find_policy("a.example.com", txt_of({
        "_dmarc.a.example.com": DNSTempError("timeout")}))
    assert found.record is None and found.error == "timeout"
    assert dmarc.evaluate("a.example.com", found, None, (), 0).result == "temperror"


# -- the decision -------------------------------------------------------------------------

SPF_PASS = SPFResult("pass", "mailfrom", "x@mail.example.com", "mail.example.com")
DKIM_PASS = DKIMResult("pass", "example.com", "sel")


def found(record_text, from_domain="example.com", policy_domain="example.com"):
    return dmarc.PolicyFound(from_domain, dmarc.org_domain(from_domain),
                             dmarc.parse_record(record_text), policy_domain)


def test_pass_by_aligned_spf_or_dkim():
    policy = found("v=DMARC1; p=reject")
    by_spf = dmarc.evaluate("example.com", policy, SPF_PASS, (), 0)
    assert (by_spf.result, by_spf.spf_aligned, by_spf.dkim_aligned) == ("pass", True, False)
    by_dkim = dmarc.evaluate("example.com", policy, None, (DKIM_PASS,), 0)
    assert (by_dkim.result, by_dkim.dkim_aligned, by_dkim.disposition) == ("pass", True, "none")


def test_strict_alignment_needs_the_same_name():
    result = dmarc.evaluate("example.com", found("v=DMARC1; p=reject; aspf=s"), SPF_PASS, (), 0)
    assert (result.result, result.disposition) == ("fail", "reject")
    other = DKIMResult("pass", "mail.example.com")
    assert dmarc.evaluate("example.com", found("v=DMARC1; p=reject; adkim=s"), None,
                          (other,), 0).result == "fail"


def test_a_failed_or_unaligned_identity_does_not_pass():
    spf_fail = SPFResult("fail", "mailfrom", "x@example.com", "example.com")
    dkim_fail = DKIMResult("fail", "example.com")
    unaligned = DKIMResult("pass", "example.net")
    result = dmarc.evaluate("example.com", found("v=DMARC1; p=quarantine"), spf_fail,
                            (dkim_fail, unaligned), 0)
    assert (result.result, result.policy, result.disposition, result.unsure) == (
        "fail", "quarantine", "quarantine", False)


@pytest.mark.parametrize(("sample", "policy", "disposition"), [
    (0, "reject", "reject"), (49.9, "reject", "reject"), (50, "reject", "quarantine"),
    (99.9, "quarantine", "none"), (10, "none", "none"),
])
def test_pct_applies_the_next_weaker_policy_outside_the_sample(sample, policy, disposition):
    record = found(f"v=DMARC1; p={policy}; pct=50")
    assert dmarc.evaluate("example.com", record, None, (), sample).disposition == disposition


def test_pct_0_and_100():
    assert dmarc.evaluate("example.com", found("v=DMARC1; p=reject; pct=0"), None, (),
                          0).disposition == "quarantine"
    assert dmarc.evaluate("example.com", found("v=DMARC1; p=reject"), None, (),
                          99.99).disposition == "reject"


def test_a_temperror_that_could_have_passed_makes_the_failure_unsure():
    temp = SPFResult("temperror", "mailfrom", "x@example.com", "example.com")
    assert dmarc.evaluate("example.com", found("v=DMARC1; p=reject"), temp, (), 0).unsure
    unrelated = DKIMResult("temperror", "example.net")
    assert not dmarc.evaluate("example.com", found("v=DMARC1; p=reject"), None, (unrelated,),
                              0).unsure


def test_no_record_is_none():
    nothing = dmarc.PolicyFound("example.com", "example.com")
    assert dmarc.evaluate("example.com", nothing, None, (), 0).result == "none"


# -- Authentication-Results: ------------------------------------------------------------

RESULTS = AuthResults(
    spf=SPFResult("softfail", "mailfrom", "x@example.com", "example.com", "not (really)"),
    dkim=(DKIMResult("pass", "example.com", "sel", "@example.com", "abcdefgh"),
          DKIMResult("permerror", "example.net", "gone", reason="no key record at x")),
    dmarc=(dmarc.DMARCResult("pass", "example.com", "reject"),),
    from_domains=("example.com",), dkim_checked=True, dmarc_checked=True,
)


def test_the_field_is_folded_and_authres_reads_it_back():
    field = header_field("mx.example.org", RESULTS)
    assert field.startswith(b"Authentication-Results: mx.example.org;\n\t")
    assert field.endswith(b"\n") and all(len(line) <= 78 for line in field.split(b"\n"))
    AddHeaders((field,))  # one LF-terminated field, as the pipeline wants
    unfolded = field.decode().replace("\n\t", " ").strip()
    parsed = authres.AuthenticationResultsHeader.parse(unfolded)
    assert parsed.authserv_id == "mx.example.org"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "softfail"), ("dkim", "pass"), ("dkim", "permerror"), ("dmarc", "pass")]
    assert "not really" in unfolded  # parentheses of a reason do not break the comment


def test_nothing_checked_and_nothing_found():
    field = header_field("mx.example.org", AuthResults(dkim_checked=True))
    assert field == b"Authentication-Results: mx.example.org;\n\tdkim=none\n"
    assert AuthResults().summary() == "spf=skipped dkim=skipped dmarc=skipped"
    assert RESULTS.summary() == "spf=softfail dkim=pass,permerror dmarc=pass"


@pytest.mark.parametrize(("value", "found"), [
    (b" mx.example.org; spf=pass", "mx.example.org"),
    (b" MX.Example.Org;\n spf=pass", "mx.example.org"),
    (b" (comment (nested)) mx.example.org (c); none", "mx.example.org"),
    (b' "mx.example.org"; none', "mx.example.org"),
    (b" mx.example.org 1; none", "mx.example.org"),
    (b" other.example; none", "other.example"),
    (b"   ", None),
])
def test_authserv_id(value, found):
    assert authserv_id(value) == found


def test_header_facts_locate_every_authentication_results_field():
    head = (b"Received: a\n b\nAuthentication-Results: mx.example.org;\n spf=pass\n"
            b"From: x@example.com\nauthentication-results : other; none\n\nbody\n"
            b"Authentication-Results: in the body\n")
    facts = inspect_head(head)
    assert [value for _, value in facts.auth_results] == [
        b" mx.example.org; spf=pass", b" other; none"]
    assert [head[o:o + 22].lower() for o, _ in facts.auth_results] == [
        b"authentication-results"] * 2


def test_rename_fields_in_place(tmp_path):
    path = tmp_path / "spool"
    data = b"Authentication-Results: mx; none\nSubject: x\n\nAuthentication-Results: body\n"
    path.write_bytes(data)
    rename_fields(path, [0, 33], b"Authentication-Results", b"Untrusted-Auth-Results")
    assert path.read_bytes() == data.replace(
        b"Authentication-Results: mx", b"Untrusted-Auth-Results: mx")  # 33 is no such field


# -- the checks ---------------------------------------------------------------------------


def message_facts(auth, sender="x@relay.test", ip="192.0.2.9"):
    mailbox = parse_mail_from(f"FROM:<{sender}>".encode())[0] if sender else None
    return Facts(Stage.MESSAGE, Client(ip=ip, name=f"unknown[{ip}]"), DIRECTORY,
                 sender=mailbox, auth=auth)


def results(spf="pass", spf_domain="relay.test", dkim=(), dmarc_results=(), from_domains=()):
    return AuthResults(
        spf=SPFResult(spf, "mailfrom", f"x@{spf_domain}", spf_domain) if spf else None,
        dkim=tuple(dkim), dmarc=tuple(dmarc_results), from_domains=tuple(from_domains),
        dkim_checked=True, dmarc_checked=True)


def test_checks_verify_and_skip_unchecked_clients():
    config = parse_config({"domains": {"local": ["example.org"]},
                           "mailboxes": {"root": "/x"}, "queue": {"path": "/x"}}, None)
    checks = auth_checks(config)
    assert [c.name for c in checks] == ["own_domains", "dmarc_policy", "authentication_results"]
    for check in checks:
        verifyObject(ICheck, check)
        assert check.stage is Stage.MESSAGE
        assert check.check(message_facts(None)) is ACCEPT
    off = parse_config({"domains": {"local": ["example.org"]}, "mailboxes": {"root": "/x"},
                        "queue": {"path": "/x"},
                        "checks": {"spf": False, "dkim_verify": False, "dmarc": False,
                                   "arc": False}}, None)
    assert auth_checks(off) == []


def test_our_domain_as_envelope_sender_needs_our_spf_pass():
    check = OwnDomains()
    for result in ("fail", "softfail", "neutral", "none", "permerror"):
        verdict = check.check(message_facts(results(result, "example.org"), "ceo@example.org"))
        assert isinstance(verdict, Reject), result
        assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
        assert f"(spf={result})" in verdict.reply.text and "[192.0.2.9]" in verdict.reply.text
    temp = check.check(message_facts(results("temperror", "example.org"), "ceo@example.org"))
    assert isinstance(temp, TempFail) and (temp.reply.code, temp.reply.status) == (451, "4.7.1")
    assert check.check(message_facts(results("pass", "example.org"), "ceo@example.org")) is ACCEPT
    # not our domain, or <>: nothing to protect
    assert check.check(message_facts(results("fail", "relay.test"))) is ACCEPT
    assert check.check(message_facts(results(None), None)) is ACCEPT


def test_our_domain_in_from_needs_an_aligned_identity():
    check = OwnDomains()
    forged = check.check(message_facts(results(from_domains=["example.net"])))
    assert isinstance(forged, Reject) and forged.reply.code == 550
    assert "example.net" in forged.reply.text
    signed = results(dkim=[DKIMResult("pass", "example.net")], from_domains=["example.net"])
    assert check.check(message_facts(signed)) is ACCEPT
    subdomain_spf = results(spf_domain="mail.example.net", from_domains=["example.net"])
    assert check.check(message_facts(subdomain_spf, "x@mail.example.net")) is ACCEPT
    temp = results(dkim=[DKIMResult("temperror", "example.net")], from_domains=["example.net"])
    assert isinstance(check.check(message_facts(temp)), TempFail)
    # another domain's From: is DMARC's business, not this check's
    assert check.check(message_facts(results(from_domains=["example.com"]))) is ACCEPT


def failure(disposition, unsure=False, domain="example.com"):
    return dmarc.DMARCResult("fail", domain, disposition, disposition, unsure=unsure,
                             reason="neither SPF nor DKIM aligned with the From: domain")


def test_dmarc_policy_dispositions():
    check = DmarcPolicy()
    reject = check.check(message_facts(results(dmarc_results=[failure("reject")])))
    assert isinstance(reject, Reject) and (reject.reply.code, reject.reply.status) == (
        550, "5.7.1")
    assert "DMARC policy of example.com" in reject.reply.text
    assert check.check(message_facts(results(dmarc_results=[failure("quarantine")]))) == (
        FileInto("Junk"))
    assert check.check(message_facts(results(dmarc_results=[failure("none")]))) is ACCEPT
    unsure = check.check(message_facts(results(dmarc_results=[failure("reject", True)])))
    assert isinstance(unsure, TempFail) and unsure.reply.code == 451
    passed = dmarc.DMARCResult("pass", "example.com", "reject")
    assert check.check(message_facts(results(dmarc_results=[passed]))) is ACCEPT
    # [checks] dmarc_reject = false: into Junk instead
    assert DmarcPolicy(dmarc_reject=False).check(
        message_facts(results(dmarc_results=[failure("reject")]))) == FileInto("Junk")


def test_the_field_is_added_with_our_hostname():
    verdict = AuthenticationResults("mx.example.org").check(message_facts(RESULTS))
    assert isinstance(verdict, AddHeaders) and len(verdict.fields) == 1
    assert verdict.fields[0].startswith(b"Authentication-Results: mx.example.org;")


def test_which_clients_are_checked_and_the_demo_asks_no_dns(tmp_path):
    from mailsrv.checks.auth.evaluate import is_checked
    from mailsrv.config import demo_config

    assert is_checked(trusted_network=False, authenticated_as=None)
    assert not is_checked(trusted_network=True, authenticated_as=None)
    assert not is_checked(trusted_network=False, authenticated_as="alice@example.org")
    assert not demo_config(tmp_path).checks.enabled
    assert auth_checks(demo_config(tmp_path)) == []


def test_checks_keys_are_checked_at_start_up():
    from mailsrv.config import ConfigError

    base = {"domains": {"local": ["example.org"]}, "mailboxes": {"root": "/x"},
            "queue": {"path": "/x"}}
    with pytest.raises(ConfigError, match="checks.dmarc_reject: expected"):
        parse_config({**base, "checks": {"dmarc_reject": "yes"}}, None)
    with pytest.raises(ConfigError, match="checks.dns_timeout: expected"):
        parse_config({**base, "checks": {"dns_timeout": 0}}, None)
    with pytest.raises(ConfigError, match="checks.arc_seal: unknown key"):
        parse_config({**base, "checks": {"arc_seal": True}}, None)
    with pytest.raises(ConfigError, match="checks.arc_trusted_sealers"):
        parse_config({**base, "checks": {"arc_trusted_sealers": "lists.example.net"}}, None)
    with pytest.raises(ConfigError, match=r"checks.arc_trusted_sealers\[1\]"):
        parse_config({**base, "checks": {"arc_trusted_sealers": ["a.example", "a b"]}}, None)
    sealers = parse_config({**base, "checks": {"arc_trusted_sealers": ["Lists.Example.NET"]}},
                           None).checks.arc_trusted_sealers
    assert sealers == ("lists.example.net",)
    assert parse_config(base, None).checks.arc_trusted_sealers == ()
    config = parse_config({**base, "checks": {"dmarc_reject": False, "dns_timeout": 1.5}}, None)
    assert (config.checks.dmarc_reject, config.checks.dns_timeout, config.checks.spf) == (
        False, 1.5, True)


def test_odd_identities_never_break_the_field_syntax():
    odd = AuthResults(
        spf=SPFResult("none", "mailfrom", '"a b;c"@example.com', "example.com"),
        dkim=(DKIMResult("neutral", "ex ample.com", "s;el", "@x (y)", "ab\"cd"),),
        dmarc=(dmarc.DMARCResult("none", "exa mple.com;x"),),
        dkim_checked=True, dmarc_checked=True)
    field = header_field("mx.example.org", odd)
    AddHeaders((field,))
    unfolded = field.decode().replace("\n\t", " ").strip()
    parsed = authres.AuthenticationResultsHeader.parse(unfolded)
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "none"), ("dkim", "neutral"), ("dmarc", "none")]
    assert "smtp.mailfrom=example.com" in unfolded
