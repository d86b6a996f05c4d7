"""ARC verification (mailsrv.checks.auth.arccheck): the chain as dkimpy evaluates it through
our DNS, what a trusted sealer vouches for, the override of DMARC and of the own-domain From:
check, and the Authentication-Results: text.  Chains are made here with dkimpy's signer; the
end-to-end tests use Perl's Mail::ARC::Signer as well."""

from __future__ import annotations

import authres
import dkim
import pytest
from test_mail_auth_lookups import ZoneDNS  # sibling test modules (tests/unit)
from test_mail_auth_policy import failure, message_facts, results

from mailsrv.checks.auth.arccheck import ARCResult, has_arc, hop_passes, verify, vouched_domains
from mailsrv.checks.auth.checks import DmarcPolicy, OwnDomains
from mailsrv.checks.auth.lookups import DNSTempError
from mailsrv.checks.auth.results import AuthResults, header_field
from mailsrv.checks.pipeline import ACCEPT, Reject, TempFail
from support.dkimkey import rsa_key

LIST = "lists.example.net"
AR = (b"Authentication-Results: lists.example.net; spf=pass smtp.mailfrom=a@sender.example;\r\n"
      b" dkim=pass header.d=sender.example header.s=s1; dmarc=pass header.from=sender.example\r\n")
MESSAGE = (b"From: A <a@sender.example>\r\nTo: list@lists.example.net\r\nSubject: hello\r\n"
           b"Message-ID: <1@sender.example>\r\n\r\nHello, list.\r\n")


@pytest.fixture(scope="module")
def key():
    pem, public = rsa_key()
    return pem, b"v=DKIM1; k=rsa; p=" + public.encode()


def sealed(key, domain=LIST, message=MESSAGE, ar=AR):
    """``message`` with ``ar`` and an ARC set by ``domain`` (selector arc), LF line ends."""
    signed = ar.replace(b"lists.example.net;", domain.encode() + b";", 1) + message
    fields = dkim.arc_sign(signed, b"arc", domain.encode(), key[0], domain.encode(),
                           include_headers=[b"from", b"to", b"subject", b"message-id"])
    return (b"".join(fields) + message).replace(b"\r\n", b"\n")


def zone(key, domain=LIST):
    return {f"arc._domainkey.{domain}": [("TXT", (key[1],))]}


def test_an_intact_chain_passes_with_its_sealer_and_what_it_recorded(key):
    message = sealed(key)
    assert has_arc(message.split(b"\n\n")[0]) and not has_arc(MESSAGE)
    result = verify(message, ZoneDNS(zone(key)))
    assert (result.result, result.instance, result.sealer, result.selector) == (
        "pass", 1, LIST, "arc")
    assert set(result.passes) == {("spf", "sender.example"), ("dkim", "sender.example"),
                                  ("dmarc", "sender.example")}


def test_a_changed_body_a_missing_key_and_no_chain(key):
    changed = sealed(key).replace(b"Hello, list.", b"Hello, changed list.")
    result = verify(changed, ZoneDNS(zone(key)))
    assert result.result == "fail" and result.sealer == LIST and not result.temporary
    assert verify(sealed(key), ZoneDNS({})).result == "fail"
    assert verify(MESSAGE.replace(b"\r\n", b"\n"), ZoneDNS({})) == ARCResult(
        "none", reason="Message is not ARC signed")


def test_a_dns_failure_fails_the_chain_as_temporary(key):
    result = verify(sealed(key), ZoneDNS({f"arc._domainkey.{LIST}": DNSTempError("timeout")}))
    assert result.result == "fail" and result.temporary and "timeout" in result.reason


@pytest.mark.parametrize("mangle", [
    lambda m: m.replace(b"ARC-Seal: i=1", b"ARC-Seal: i=1; i=x; b=;;;", 1),  # bad tags
    lambda m: m.replace(b"ARC-Message-Signature: i=1", b"X-Gone: i=1", 1),  # incomplete set
    lambda m: m.replace(b"cv=none", b"cv=pass", 1),  # a first seal claiming a chain
    lambda m: m.replace(b"ARC-Seal: i=1", b"ARC-Seal: i=1\nARC-Seal: i=1; cv=none", 1),
    lambda m: b"ARC-Seal: \xff\xfe garbage\n" + m,
    lambda m: b"ARC-Seal: i=99999999999999999999999; cv=pass\n" + m,
])
def test_malformed_arc_fields_are_fail_never_an_exception(key, mangle):
    assert verify(mangle(sealed(key)), ZoneDNS(zone(key))).result == "fail"


def test_a_second_hop_passes_and_its_sealer_is_the_latest(key):
    other = "fwd.example.com"
    first = sealed(key).replace(b"\n", b"\r\n")
    ar = f"Authentication-Results: {other}; arc=pass; spf=fail smtp.mailfrom=x@a.test\r\n"
    message = sealed(key, other, first, ar.encode())
    result = verify(message, ZoneDNS({**zone(key), **zone(key, other)}))
    assert (result.result, result.instance, result.sealer) == ("pass", 2, other)
    assert result.passes == ()  # the latest hop recorded no pass for the From: domain


@pytest.mark.parametrize(("value", "found"), [
    (b"i=1; mx.test; dmarc=pass header.from=Sender.Example",
     (("dmarc", "sender.example"),)),
    ("i=2; mx.test; dkim=pass header.i=@sub.sender.example; spf=pass smtp.mailfrom=x@b.test",
     (("dkim", "sub.sender.example"), ("spf", "b.test"))),
    ("i=1; mx.test; dkim=fail header.d=sender.example; spf=softfail smtp.mailfrom=x@b.test",
     ()),
    ("i=1; mx.test; none", ()),
    ("i=1; not an ; = authentication results (", ()),
    (b"\xff\xfe", ()),
])
def test_what_a_hop_recorded_as_passing(value, found):
    assert hop_passes(value) == found


def test_a_trusted_passing_chain_vouches_for_aligned_from_domains():
    arc = ARCResult("pass", 1, LIST, "arc", passes=(
        ("dmarc", "sender.example"), ("dkim", "mail.other.example"), ("spf", "b.test")))
    froms = ("sender.example", "other.example", "b.test", "unrelated.example")
    assert vouched_domains(arc, froms, (LIST,)) == {"sender.example", "other.example",
                                                    "b.test"}
    assert vouched_domains(arc, froms, ("lists.example.org",)) == frozenset()
    assert vouched_domains(arc, froms, ()) == frozenset()
    failed = ARCResult("fail", 1, LIST, "arc", passes=arc.passes)
    assert vouched_domains(failed, froms, (LIST,)) == frozenset()
    assert vouched_domains(None, froms, (LIST,)) == frozenset()
    # a dmarc=pass counts for its own domain only, not for its organization's others
    only_dmarc = ARCResult("pass", 1, LIST, passes=(("dmarc", "sender.example"),))
    assert vouched_domains(only_dmarc, ("sub.sender.example",), (LIST,)) == frozenset()


def vouched(auth, domains=("example.com",)):
    return AuthResults(**{**auth.__dict__, "arc": ARCResult("pass", 1, LIST),
                          "arc_vouched": frozenset(domains)})


def test_the_override_of_dmarc_reject_and_quarantine():
    for disposition in ("reject", "quarantine"):
        auth = results(spf="fail", dmarc_results=[failure(disposition)],
                       from_domains=["example.com"])
        assert DmarcPolicy().check(message_facts(auth)) is not ACCEPT
        assert DmarcPolicy().check(message_facts(vouched(auth))) is ACCEPT
        # another From: domain's failure still counts
        assert DmarcPolicy().check(message_facts(vouched(auth, ["x.example"]))) is not ACCEPT
    auth = results(spf="fail", dmarc_results=[failure("reject")], from_domains=["example.com"])
    unsure = AuthResults(**{**auth.__dict__, "arc_unsure": True})
    verdict = DmarcPolicy().check(message_facts(unsure))
    assert isinstance(verdict, TempFail) and (verdict.reply.code, verdict.reply.status) == (
        451, "4.7.1")


def test_the_override_of_our_own_domain_in_from_not_in_mail_from():
    auth = results(spf="pass", spf_domain="lists.example.net", from_domains=["example.org"])
    assert isinstance(OwnDomains().check(message_facts(auth)), Reject)
    assert OwnDomains().check(message_facts(vouched(auth, ["example.org"]))) is ACCEPT
    unsure = AuthResults(**{**auth.__dict__, "arc_unsure": True})
    assert isinstance(OwnDomains().check(message_facts(unsure)), TempFail)
    # the envelope in our domain still needs our SPF's pass
    forged = results(spf="fail", spf_domain="example.org", from_domains=["example.org"])
    verdict = OwnDomains().check(message_facts(vouched(forged, ["example.org"]),
                                               "ceo@example.org"))
    assert isinstance(verdict, Reject)


def parsed(field: bytes):
    return authres.AuthenticationResultsHeader.parse(
        field.decode().replace("\n\t", " ").strip())


def test_the_arc_result_in_the_field():
    auth = results(spf="fail", dmarc_results=[failure("reject")], from_domains=["example.com"])
    field = header_field("mx.example.org", vouched(auth))
    header = parsed(field)
    assert [(r.method, r.result) for r in header.results][-2:] == [
        ("dmarc", "fail"), ("arc", "pass")]
    text = " ".join(field.decode().split())
    assert "dmarc=fail (p=reject dis=none arc=pass override=local_policy)" in text
    assert f"arc=pass (i=1) header.as-d={LIST}" in text
    none = header_field("mx.example.org", AuthResults(arc=ARCResult("none")))
    assert none == b"Authentication-Results: mx.example.org;\n\tarc=none\n"
    broken = header_field("mx.example.org", AuthResults(
        arc=ARCResult("fail", 2, "x.test", "s", reason="ARC-Seal[1] did not (validate)")))
    assert " ".join(broken.decode().split()).endswith(
        "arc=fail (i=2 ARC-Seal[1] did not validate) header.as-d=x.test header.as-s=s")
    assert vouched(auth).summary() == (
        "spf=fail dkim=none dmarc=fail arc=pass arc_override=example.com")


def test_the_authenticator_verifies_the_chain_and_names_what_it_vouches_for(tmp_path, key):
    from mailsrv.checks.auth.evaluate import Authenticator
    from mailsrv.message.headsection import inspect_head

    # the list recorded dmarc=pass on arrival, changed the message (the author's DKIM
    # signature, not kept here, broke) and sealed it
    message = sealed(key)
    path = tmp_path / "spool"
    path.write_bytes(message)
    records = {**zone(key), "_dmarc.sender.example": [("TXT", (b"v=DMARC1; p=reject",))]}
    for trusted, vouched_for in (((LIST,), {"sender.example"}), ((), set())):
        auth = Authenticator(ZoneDNS(records), spf=False, dkim=False,
                             trusted_sealers=trusted).evaluate(
            "192.0.2.7", "client.test", None, inspect_head(message), path)
        assert auth.arc is not None and auth.arc.result == "pass" and auth.arc.instance == 1
        assert auth.arc_vouched == vouched_for and not auth.arc_unsure
        assert [r.result for r in auth.dmarc] == ["fail"]
    # a trusted sealer whose key does not answer: open, not refused
    records[f"arc._domainkey.{LIST}"] = DNSTempError("timeout")
    auth = Authenticator(ZoneDNS(records), spf=False, dkim=False,
                         trusted_sealers=(LIST,)).evaluate(
        "192.0.2.7", "client.test", None, inspect_head(message), path)
    assert auth.arc.result == "fail" and auth.arc_unsure and not auth.arc_vouched
    # ARC turned off: nothing asked, no result
    dns = ZoneDNS(records)
    auth = Authenticator(dns, spf=False, dkim=False, dmarc=False, arc=False).evaluate(
        "192.0.2.7", "client.test", None, inspect_head(message), path)
    assert auth.arc is None and dns.asked == []
