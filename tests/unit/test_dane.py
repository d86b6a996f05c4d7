"""DANE's pure parts: TLSA records, matching a chain (mailsrv.outbound.dane), the per-host
decision from the DNS answers and the DNSSEC flags of the queries (danelookup), what an
attempt came to (danetls), and relay.dane's configuration."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.names import dns

from mailsrv.config import ConfigError, parse_config
from mailsrv.outbound.dane import TLSA, check_chain, matches, parse_tlsa, usable
from mailsrv.outbound.danelookup import (
    TLSA_TYPE,
    Answer,
    DaneLookupFailed,
    DanePolicy,
    _ask_for_dnssec,
    decide_host,
)
from mailsrv.outbound.danetls import DaneTLS
from mailsrv.outbound.mx import MXHost
from support.certs import make_ca, self_signed


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER)


def spki(cert_der: bytes) -> bytes:
    return x509.load_der_x509_certificate(cert_der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    work = tmp_path_factory.mktemp("pki")
    ca = make_ca(work)
    (work / "other").mkdir()
    other_ca = make_ca(work / "other")
    leaf = der(ca.issue(["mx.example.net"], work)[0])
    expired = der(ca.issue(["mx.example.net"], work, stem="expired", days=-0.5)[0])
    stranger = der(other_ca.issue(["mx.example.net"], work / "other")[0])
    return {"ca": der(ca.cert_path), "leaf": leaf, "expired": expired, "stranger": stranger,
            "self": der(self_signed(["elsewhere.example"], work)[0]),
            "other_ca": der(other_ca.cert_path)}


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- records ---------------------------------------------------------------------------


def test_parse_and_present_a_record():
    record = parse_tlsa(bytes([3, 1, 1]) + bytes.fromhex("ab" * 32))
    assert record == TLSA(3, 1, 1, bytes.fromhex("ab" * 32))
    assert str(record) == "3 1 1 " + "ab" * 32
    assert parse_tlsa(b"\x03\x01") is None
    assert parse_tlsa(b"\x03\x01\x00") == TLSA(3, 1, 0, b"")


@pytest.mark.parametrize("usage,selector,mtype,ok", [
    (3, 1, 1, True), (2, 1, 1, True), (3, 0, 1, True), (2, 0, 2, True), (3, 1, 0, True),
    (0, 1, 1, False), (1, 1, 1, False),  # PKIX-TA, PKIX-EE: not for SMTP (RFC 7672 §3.1.3)
    (4, 1, 1, False), (3, 2, 1, False), (3, 1, 3, False), (3, 1, 255, False),
])
def test_usable_records(usage, selector, mtype, ok):
    assert TLSA(usage, selector, mtype, b"x").usable is ok
    assert usable([TLSA(usage, selector, mtype, b"x")]) == ((TLSA(usage, selector, mtype, b"x"),)
                                                           if ok else ())


def test_matching_each_selector_and_type(pki):
    cert = pki["self"]
    assert matches(TLSA(3, 1, 1, sha256(spki(cert))), cert)
    assert matches(TLSA(3, 0, 1, sha256(cert)), cert)
    assert matches(TLSA(3, 1, 2, hashlib.sha512(spki(cert)).digest()), cert)
    assert matches(TLSA(3, 0, 0, cert), cert)
    assert matches(TLSA(3, 1, 0, spki(cert)), cert)
    assert not matches(TLSA(3, 1, 1, sha256(cert)), cert)  # the wrong selector's digest
    assert not matches(TLSA(3, 1, 1, sha256(spki(pki["leaf"]))), cert)
    assert not matches(TLSA(1, 1, 1, sha256(spki(cert))), cert)  # unusable: never matches
    assert not matches(TLSA(3, 1, 1, sha256(b"garbage")), b"garbage")


# -- chains ----------------------------------------------------------------------------


def test_dane_ee_ignores_names_and_dates(pki):
    names = ("mx.other.test", "other.test")
    verdict = check_chain([TLSA(3, 1, 1, sha256(spki(pki["self"])))], [pki["self"]], names)
    assert verdict.ok and verdict.result_type is None
    expired = check_chain([TLSA(3, 0, 1, sha256(pki["expired"]))], [pki["expired"], pki["ca"]],
                          names)
    assert expired.ok


def test_dane_ee_checks_only_the_servers_own_certificate(pki):
    # a DANE-EE record for the CA does not vouch for the leaf it signed
    verdict = check_chain([TLSA(3, 1, 1, sha256(spki(pki["ca"])))], [pki["leaf"], pki["ca"]],
                          ("mx.example.net",))
    assert not verdict.ok and verdict.result_type == "certificate-not-trusted"


def test_dane_ta_chain_and_name(pki):
    ta = [TLSA(2, 1, 1, sha256(spki(pki["ca"])))]
    chain = [pki["leaf"], pki["ca"]]
    assert check_chain(ta, chain, ("mx.example.net", "example.net")).ok
    assert check_chain(ta, chain, ("mx2.example.net", "mx.example.net")).ok  # next-hop name
    mismatch = check_chain(ta, chain, ("mx.other.test", "other.test"))
    assert not mismatch.ok and mismatch.result_type == "certificate-host-mismatch"
    full = [TLSA(2, 0, 0, pki["ca"])]
    assert check_chain(full, chain, ("mx.example.net",)).ok


def test_dane_ta_expired_leaf(pki):
    ta = [TLSA(2, 1, 1, sha256(spki(pki["ca"])))]
    verdict = check_chain(ta, [pki["expired"], pki["ca"]], ("mx.example.net",))
    assert not verdict.ok and verdict.result_type == "certificate-expired"


def test_dane_ta_not_signed_by_the_anchor(pki):
    # the server sends the TA after a leaf another CA signed
    ta = [TLSA(2, 1, 1, sha256(spki(pki["ca"])))]
    verdict = check_chain(ta, [pki["stranger"], pki["ca"]], ("mx.example.net",))
    assert not verdict.ok and verdict.result_type == "certificate-not-trusted"
    # the TA is not in the chain at all
    verdict = check_chain(ta, [pki["leaf"], pki["other_ca"]], ("mx.example.net",))
    assert not verdict.ok and verdict.result_type == "certificate-not-trusted"


def test_one_matching_record_of_several_is_enough(pki):
    records = [TLSA(3, 1, 1, b"\0" * 32), TLSA(0, 1, 1, sha256(spki(pki["leaf"]))),
               TLSA(2, 1, 1, sha256(spki(pki["ca"])))]
    verdict = check_chain(records, [pki["leaf"], pki["ca"]], ("mx.example.net",))
    assert verdict.ok and "DANE-TA" in verdict.detail


def test_no_certificate_at_all():
    verdict = check_chain([TLSA(3, 1, 1, b"\0" * 32)], [], ("mx.example.net",))
    assert not verdict.ok and verdict.result_type == "validation-failure"


# -- the per-host decision -------------------------------------------------------------

HOST = MXHost("mx.example.net", 10, ("192.0.2.25",))
SECURE = [Answer(dns.OK, True, []), Answer(dns.OK, True, [])]


def tlsa_answer(*rdatas: bytes, secure: bool = True, rcode: int = dns.OK) -> Answer:
    return Answer(rcode, secure, [dns.RRHeader(b"_25._tcp.mx.example.net", TLSA_TYPE,
                                               payload=dns.UnknownRecord(r)) for r in rdatas])


def test_secure_tlsa_records_make_a_policy():
    policy = decide_host(HOST, SECURE, tlsa_answer(bytes([3, 1, 1]) + b"\1" * 32,
                                                    bytes([0, 0, 1]) + b"\2" * 32))
    assert isinstance(policy, DanePolicy)
    assert policy.authenticated and len(policy.usable) == 1
    assert policy.policy_string == ("3 1 1 " + "01" * 32, "0 0 1 " + "02" * 32)
    unusable = decide_host(HOST, SECURE, tlsa_answer(bytes([1, 1, 1]) + b"\1" * 32))
    assert isinstance(unusable, DanePolicy) and not unusable.authenticated


@pytest.mark.parametrize("addresses", [
    [Answer(dns.OK, False, []), Answer(dns.OK, True, [])],
    [Answer(dns.OK, True, []), Answer(dns.OK, False, [])],
])
def test_insecure_addresses_mean_no_dane(addresses):
    assert decide_host(HOST, addresses, tlsa_answer(bytes([3, 1, 1]) + b"\1" * 32)) is None


def test_no_or_insecure_tlsa_records_mean_no_dane():
    assert decide_host(HOST, SECURE, Answer(dns.OK, True, [])) is None  # NODATA
    assert decide_host(HOST, SECURE, Answer(dns.ENAME, True, [])) is None  # NXDOMAIN
    assert decide_host(HOST, SECURE, tlsa_answer(bytes([3, 1, 1]) + b"\1" * 32,
                                                 secure=False)) is None


def test_failed_lookups_make_the_host_unusable():
    failed = decide_host(HOST, SECURE, None)
    assert isinstance(failed, DaneLookupFailed) and failed.result_type == "dnssec-invalid"
    failed = decide_host(HOST, SECURE, Answer(dns.ESERVER, False, []))
    assert isinstance(failed, DaneLookupFailed) and failed.result_type == "dnssec-invalid"
    failed = decide_host(HOST, [Answer(dns.ESERVER, False, []), SECURE[1]], None)
    assert isinstance(failed, DaneLookupFailed)
    malformed = decide_host(HOST, SECURE, tlsa_answer(b"\3\1"))
    assert isinstance(malformed, DaneLookupFailed) and malformed.result_type == "tlsa-invalid"


def test_queries_ask_for_dnssec():
    """AD (RFC 6840 §5.7) and EDNS0 with DO (RFC 3225) on the wire; answers left alone."""
    query = dns.Message(id=7, recDes=1)
    query.queries = [dns.Query(b"_25._tcp.mx.example.net", TLSA_TYPE)]
    _ask_for_dnssec(query)
    wire = query.toStr()
    parsed = dns.Message()
    parsed.fromStr(wire)
    assert parsed.authenticData == 1 and parsed.recDes == 1
    [opt] = parsed.additional
    assert opt.type == dns.OPT and opt.cls == 1232 and opt.ttl & 0x8000
    answer = dns.Message(id=7, answer=1)
    _ask_for_dnssec(answer)
    assert answer.authenticData == 0 and answer.additional == []


# -- what an attempt came to -----------------------------------------------------------


def test_attempt_results_without_a_handshake():
    policy = DanePolicy("mx.example.net", "mx.example.net", (TLSA(3, 1, 1, b"\1" * 32),))
    tls = DaneTLS(policy, "example.net", "192.0.2.25")
    assert tls.result(greeted=False) is None  # no server: nothing about TLS
    attempt = tls.result(greeted=True)
    assert attempt.result_type == "starttls-not-supported"
    assert (attempt.policy_type, attempt.policy_domain, attempt.mx_host, attempt.ip) == (
        "tlsa", "example.net", "mx.example.net", "192.0.2.25")
    assert attempt.policy_string == ("3 1 1 " + "01" * 32,)
    tls.started = True
    assert tls.result(greeted=True).result_type == "validation-failure"


# -- configuration ---------------------------------------------------------------------

BASE = {"hostname": "mx.example.org", "domains": {"local": ["example.org"]},
        "mailboxes": {"root": "/var/mail/mailsrv"}, "queue": {"path": "/var/spool/mailsrv"}}


def test_dane_is_off_by_default_and_needs_named_resolvers():
    assert parse_config(dict(BASE), None).relay.dane is False
    config = parse_config(dict(BASE, relay={"dane": True, "dns_servers": ["127.0.0.1"]}), None)
    assert config.relay.dane is True
    with pytest.raises(ConfigError) as info:
        parse_config(dict(BASE, relay={"dane": True}), Path("/etc/mailsrv/mailsrv.toml"))
    assert info.value.key == "relay.dns_servers"
    with pytest.raises(ConfigError) as info:
        parse_config(dict(BASE, relay={"dane": "yes", "dns_servers": ["127.0.0.1"]}), None)
    assert info.value.key == "relay.dane"
