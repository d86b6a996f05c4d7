"""mailsrv.tools.dnsrecords: the records a domain needs, in zone-file form, and the verdict on
what is published (pure; tests/e2e/test_dns_command.py runs the command against a DNS server)."""

from __future__ import annotations

import pytest

from mailsrv.tools.dnsrecords import (
    MISSING,
    OK,
    UNKNOWN,
    WRONG,
    Verdict,
    judge,
    needed_records,
    only_record,
    zone_text,
)

HOST = "mx.example.org"
KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "A" * 340 + "IDAQAB"


def records(dkim=(("202612-rsa", "rsa", KEY),)):
    return {r.kind: r for r in needed_records("example.org", HOST, dkim)}


def test_what_a_domain_needs_in_zone_file_form() -> None:
    text = zone_text(needed_records("example.org", HOST, [("202612-rsa", "rsa", KEY),
                                                          ("202612-ed25519", "ed25519", "x" * 44)]))
    assert "example.org. IN MX 10 mx.example.org.\n" in text
    assert '; mx.example.org. IN A <this server' in text  # an address we cannot know
    assert "; <that address>.in-addr.arpa IN PTR mx.example.org." in text
    assert 'example.org. IN TXT "v=spf1 mx -all"\n' in text
    assert '_dmarc.example.org. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@example.org"' in text
    # A long key is cut into strings of at most 255 octets, which a verifier joins again.
    rsa = text.split("202612-rsa._domainkey.example.org. IN TXT (\n", 1)[1].split(" )", 1)[0]
    strings = [line.strip().strip('"') for line in rsa.splitlines()]
    assert all(len(s) <= 255 for s in strings) and len(strings) == 2
    assert "".join(strings) == f"v=DKIM1; k=rsa; p={KEY}"
    assert '202612-ed25519._domainkey.example.org. IN TXT "v=DKIM1; k=ed25519; p=' in text


@pytest.mark.parametrize("found, status", [
    (["mx.example.org."], OK),
    (["backup.example.net", "MX.Example.org"], OK),
    ([], MISSING),
    (["mail.provider.test"], WRONG),
    (None, UNKNOWN),
])
def test_mx(found, status) -> None:
    assert judge(records()["MX"], found, HOST).status == status


@pytest.mark.parametrize("found, status", [
    (["v=spf1 mx -all"], OK),
    (["google-site-verification=abc", "v=spf1 a:mx.example.org ~all"], OK),
    (["v=spf1 include:_spf.provider.test -all"], OK),  # not followed: said so
    ([], MISSING),
    (["some other text"], MISSING),
    (["v=spf1 mx -all", "v=spf1 a -all"], WRONG),  # two records: permerror everywhere
    (["v=spf1 mx"], WRONG),  # no all
    (["v=spf1 mx +all"], WRONG),
    (["v=spf1 mx all"], WRONG),  # all with no qualifier is +all
    (["v=spf1 ip4:192.0.2.1 -all"], OK),
    (["v=spf1 a -all"], WRONG),  # the domain's own A, which is not this host
    (["v=spf1x mx -all"], MISSING),
])
def test_spf(found, status) -> None:
    assert judge(records()["SPF"], found, HOST).status == status


@pytest.mark.parametrize("found, status", [
    ([f"v=DKIM1; k=rsa; p={KEY}"], OK),
    ([f"v=DKIM1; k=rsa; p={KEY[:100]} {KEY[100:]}"], OK),  # spaces inside p= are ignored
    ([], MISSING),
    (["v=DKIM1; k=rsa; p="], WRONG),  # revoked
    (["v=DKIM1; k=rsa; p=AAAAB3NzaC1yc2E"], WRONG),
    (["not a tag list;;=="], WRONG),
])
def test_dkim(found, status) -> None:
    assert judge(records()["DKIM"], found, HOST).status == status


@pytest.mark.parametrize("found, status", [
    (["v=DMARC1; p=none; rua=mailto:postmaster@example.org"], OK),
    (["v=DMARC1;p=reject"], OK),
    ([], MISSING),
    (["v=DMARC1; p=none", "v=DMARC1; p=reject"], WRONG),
    (["v=DMARC1; p=maybe"], WRONG),
    (["v=DMARC1; rua=mailto:x@example.org"], WRONG),  # no p=
])
def test_dmarc(found, status) -> None:
    assert judge(records()["DMARC"], found, HOST).status == status


@pytest.mark.parametrize("found, status", [
    (["192.0.2.1=mx.example.org."], OK),
    (["192.0.2.1=mx.example.org", "2001:db8::1=mx.example.org"], OK),
    (["192.0.2.1="], MISSING),
    (["192.0.2.1=host-192-0-2-1.isp.test"], WRONG),
    (["192.0.2.1=mx.example.org", "2001:db8::1="], MISSING),
    ([], MISSING),  # the host name has no address at all
])
def test_ptr(found, status) -> None:
    assert judge(records()["PTR"], found, HOST).status == status


def test_address() -> None:
    assert judge(records()["A"], ["192.0.2.1"], HOST).status == OK
    assert judge(records()["A"], [], HOST).status == MISSING


def test_only_record_picks_the_one_or_says_none_or_how_many():
    def spf(t: str) -> bool:
        return t.startswith("v=spf1")

    assert only_record(["google-site-verification=x", "v=spf1 mx -all"], spf, "none",
                       "SPF records") == "v=spf1 mx -all"
    assert only_record(["google-site-verification=x"], spf, "none", "SPF records") == (
        Verdict(MISSING, "none"))
    assert only_record(["v=spf1 mx -all", "v=spf1 -all"], spf, "none", "SPF records") == (
        Verdict(WRONG, "2 SPF records"))
