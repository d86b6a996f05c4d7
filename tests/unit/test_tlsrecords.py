"""mailsrv.tools.tlsrecords: our MTA-STS policy and records, our TLS-RPT record, and the
verdicts of ``mailsrv dns --check`` on them (pure)."""

from __future__ import annotations

import re

import pytest

from mailsrv.tools.dnsrecords import MISSING, OK, WRONG, judge, zone_text
from mailsrv.tools.tlsrecords import policy_id, policy_text, tls_records

HOST = "mx.example.org"
RUA = ("mailto:tlsrpt@example.org", "https://reports.example.org/tlsrpt")


def kinds(mode="enforce", max_age=604800, rua=RUA):
    return {r.kind: r for r in tls_records("example.org", HOST, mode, max_age, rua)}


def test_policy_text_and_its_id():
    text = policy_text("enforce", HOST, 604800)
    assert text == "version: STSv1\nmode: enforce\nmx: mx.example.org\nmax_age: 604800\n"
    assert re.fullmatch(r"[0-9a-f]{20}", policy_id(text))
    # The id changes with the policy, and only with it.
    assert policy_id(text) == policy_id(policy_text("enforce", HOST, 604800))
    assert policy_id(text) != policy_id(policy_text("testing", HOST, 604800))
    assert policy_id(text) != policy_id(policy_text("enforce", HOST, 86400))


def test_records_in_zone_file_form():
    text = zone_text(tls_records("example.org", HOST, "testing", 86400, RUA))
    sts_id = policy_id(policy_text("testing", HOST, 86400))
    assert f'_mta-sts.example.org. IN TXT "v=STSv1; id={sts_id}"\n' in text
    assert "; mta-sts.example.org. IN A <the address of the web server" in text
    assert ('_smtp._tls.example.org. IN TXT "v=TLSRPTv1; '
            'rua=mailto:tlsrpt@example.org,https://reports.example.org/tlsrpt"\n') in text


def test_nothing_without_configuration():
    assert tls_records("example.org", HOST, "none", 604800, ()) == []
    assert set(kinds(mode="none")) == {"TLSRPT"}
    assert set(kinds(rua=())) == {"MTA-STS", "STS-WEB"}


@pytest.mark.parametrize("found, status", [
    (["v=STSv1; id={id}"], OK),
    (["v=spf1 -all", "v=STSv1;id={id}"], OK),
    ([], MISSING),
    (["v=STSv1; id=20260101"], WRONG),  # the policy changed, the id did not
    (["v=STSv1; id={id}", "v=STSv1; id=x"], WRONG),
    (["v=STSv1; id={id}; stray"], WRONG),  # the right id, but senders refuse the record
])
def test_mta_sts_record_judged(found, status):
    record = kinds()["MTA-STS"]
    sts_id = record.value.split("id=")[1]
    assert judge(record, [f.format(id=sts_id) for f in found], HOST).status == status


@pytest.mark.parametrize("found, status", [
    (["v=TLSRPTv1; rua=mailto:tlsrpt@example.org,https://reports.example.org/tlsrpt"], OK),
    (["v=TLSRPTv1;rua=https://reports.example.org/tlsrpt, mailto:tlsrpt@example.org"], OK),
    ([], MISSING),
    (["v=TLSRPTv1; rua=mailto:someone@else.test"], WRONG),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], WRONG),
])
def test_tlsrpt_record_judged(found, status):
    assert judge(kinds()["TLSRPT"], found, HOST).status == status


def test_policy_host_judged():
    web = kinds()["STS-WEB"]
    assert judge(web, ["192.0.2.80"], HOST).status == OK
    missing = judge(web, [], HOST)
    assert missing.status == MISSING
    assert "https://mta-sts.example.org/.well-known/mta-sts.txt" in missing.detail
