"""
DANE outbound (RFC 7672) end to end: mailsrv with ``relay.dane`` against the loopback DNS
server, which sets the AD bit for the names the zone lists as secure (as a validating
resolver does for a signed zone), and sinks offering STARTTLS with a self-signed certificate
(for DANE-EE, 3 1 1) or a test CA's chain (for DANE-TA, 2 1 1).

Three sinks share the relay port: 127.0.0.2 (self-signed, mx.ee.test), 127.0.0.3 (leaf for
mx.ta.test and the CA, sent as a chain) and 127.0.0.4 (no STARTTLS).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support.certs import make_ca, self_signed
from support.harness import DNSServer, MailServer, SMTPSink, _env, free_port, wait_for
from support.mail import send_mail

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def spki_sha256(cert_path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def zone_for(port: int, ee_hash: str, ca_hash: str) -> dict:
    def tlsa(host):
        return f"_{port}._tcp.{host}"

    wrong = "00" * 32
    records = {
        # DANE-EE matching / not matching; DANE-TA through the chain / with a wrong name
        "ee-ok.test": [["MX", 10, "mx.ee.test"]],
        "mx.ee.test": [["A", "127.0.0.2"]],
        tlsa("mx.ee.test"): [["TLSA", 3, 1, 1, ee_hash]],
        "ee-bad.test": [["MX", 10, "bad.ee.test"]],
        "bad.ee.test": [["A", "127.0.0.2"]],
        tlsa("bad.ee.test"): [["TLSA", 3, 1, 1, wrong]],
        "ta-ok.test": [["MX", 10, "mx.ta.test"]],
        "mx.ta.test": [["A", "127.0.0.3"]],
        tlsa("mx.ta.test"): [["TLSA", 2, 1, 1, ca_hash], ["TLSA", 3, 1, 1, wrong]],
        "ta-name.test": [["MX", 10, "other.ta.test"]],
        "other.ta.test": [["A", "127.0.0.3"]],
        tlsa("other.ta.test"): [["TLSA", 2, 1, 1, ca_hash]],
        # TLSA at a host without STARTTLS
        "notls.test": [["MX", 10, "mx.plain.test"]],
        "mx.plain.test": [["A", "127.0.0.4"]],
        tlsa("mx.plain.test"): [["TLSA", 3, 1, 1, wrong]],
        # the same host, its MX RRset insecure: no DANE, plain text as before
        "insecure-mx.test": [["MX", 10, "mx.plain.test"]],
        # secure MX and addresses, insecure TLSA: no DANE either
        "insecure-tlsa.test": [["MX", 10, "tlsa-insecure.plain.test"]],
        "tlsa-insecure.plain.test": [["A", "127.0.0.4"]],
        tlsa("tlsa-insecure.plain.test"): [["TLSA", 3, 1, 1, wrong]],
        # only unusable records (PKIX-TA, PKIX-EE, unknown matching type): TLS, unauthenticated
        "unusable.test": [["MX", 10, "unusable.ee.test"]],
        "unusable.ee.test": [["A", "127.0.0.2"]],
        tlsa("unusable.ee.test"): [["TLSA", 0, 1, 1, wrong], ["TLSA", 1, 0, 1, wrong],
                                   ["TLSA", 3, 1, 9, wrong]],
        "unusable-plain.test": [["MX", 10, "unusable.plain.test"]],
        "unusable.plain.test": [["A", "127.0.0.4"]],
        tlsa("unusable.plain.test"): [["TLSA", 1, 1, 1, wrong]],
        # the first MX fails DANE, the second passes: delivered there
        "two-mx.test": [["MX", 10, "bad.ee.test"], ["MX", 20, "mx.ta.test"]],
        # an RRset too large for UDP (TC): asked again over TCP
        "big.test": [["MX", 10, "big.ee.test"]],
        "big.ee.test": [["A", "127.0.0.2"]],
        tlsa("big.ee.test"): [["TLSA", 3, 1, 2, f"{n:02x}" * 64] for n in range(30)]
        + [["TLSA", 3, 1, 1, ee_hash]],
        # the TLSA lookup fails (SERVFAIL, as for bogus data)
        "servfail.test": [["MX", 10, "servfail.ee.test"]],
        "servfail.ee.test": [["A", "127.0.0.2"]],
    }
    insecure = {"insecure-mx.test", tlsa("tlsa-insecure.plain.test")}
    secure = [name for name in records if name not in insecure]
    secure.append("servfail.test")
    return {"records": records, "secure": secure, "servfail": [tlsa("servfail.ee.test")]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("dane")
    port = free_port(HOSTS)
    ca = make_ca(work)
    ee_cert = self_signed(["mx.ee.test"], work)
    ta_leaf, ta_key = ca.issue(["mx.ta.test"], work)
    ta_chain = work / "ta-chain.pem"
    ta_chain.write_bytes(ta_leaf.read_bytes() + ca.cert_path.read_bytes())
    dns = DNSServer(work, zone_for(port, spki_sha256(ee_cert[0]), spki_sha256(ca.cert_path)))
    sinks = {
        "ee": SMTPSink(work / "ee", "127.0.0.2", hostname="mx.ee.test", port=port, tls=ee_cert),
        "ta": SMTPSink(work / "ta", "127.0.0.3", hostname="mx.ta.test", port=port,
                       tls=(ta_chain, ta_key)),
        "plain": SMTPSink(work / "plain", "127.0.0.4", hostname="mx.plain.test", port=port),
    }
    yield {"dns": dns, "port": port, "sinks": sinks}
    for sink in sinks.values():
        sink.stop()
    dns.stop()


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    """One server for the module: each test sends to a domain of its own."""
    workdir = tmp_path_factory.mktemp("dane-server")
    s = MailServer(workdir, env["dns"].port, overrides={
        "queue": {"retry_schedule": [600], "max_age": 3600},
        "relay": {"port": env["port"], "dane": True},
    })
    s.start()
    yield s
    s.stop()


def send(server: MailServer, recipient: str) -> None:
    message = f"From: <alice@example.org>\r\nSubject: dane {recipient}\r\n\r\nHello.\r\n"
    send_mail(server.port, "alice@example.org", [recipient], message.encode(), timeout=20)


def relay_line(server: MailServer, recipient: str) -> str:
    pattern = re.compile(rf"relay id=\S+ from=<[^>]*> to=<{re.escape(recipient)}> .*")
    return wait_for(lambda: (lambda m: m.group(0) if m else None)(pattern.search(server.log_text())),
                    20, f"the relay line for {recipient}")


def dane_line(server: MailServer, domain: str) -> str:
    pattern = re.compile(rf"dane: {re.escape(domain)} .*")
    return wait_for(lambda: (lambda m: m.group(0) if m else None)(pattern.search(server.log_text())),
                    20, f"the dane line for {domain}")


def received_by(env, sink: str, recipient: str) -> dict:
    found = wait_for(lambda: [m for m in env["sinks"][sink].messages()
                              if m["rcpt_to"] == [recipient]], 20, f"{recipient} at {sink}")
    return found[0]


def never_received(env, recipient: str) -> None:
    for sink in env["sinks"].values():
        assert all(m["rcpt_to"] != [recipient] for m in sink.messages())


def test_dane_ee_matching_delivers_over_tls(env, server):
    send(server, "u@ee-ok.test")
    got = received_by(env, "ee", "u@ee-ok.test")
    assert got["tls"] is True
    line = relay_line(server, "u@ee-ok.test")
    assert "status=sent" in line and "tls_policy=dane" in line and "tls=TLSv1." in line
    assert "result=success (DANE-EE 3 1 1)" in dane_line(server, "ee-ok.test")


def test_dane_ee_not_matching_defers(env, server):
    send(server, "u@ee-bad.test")
    line = relay_line(server, "u@ee-bad.test")
    assert "status=deferred" in line and "4.7.5" in line and "certificate-not-trusted" in line
    assert "tls_policy=dane" in line
    assert "result=certificate-not-trusted" in dane_line(server, "ee-bad.test")
    never_received(env, "u@ee-bad.test")


def test_dane_ta_through_the_chain_delivers(env, server):
    send(server, "u@ta-ok.test")
    assert received_by(env, "ta", "u@ta-ok.test")["tls"] is True
    assert "tls_policy=dane" in relay_line(server, "u@ta-ok.test")
    assert "result=success (DANE-TA 2 1 1)" in dane_line(server, "ta-ok.test")


def test_dane_ta_with_a_name_not_in_the_certificate_defers(env, server):
    send(server, "u@ta-name.test")
    line = relay_line(server, "u@ta-name.test")
    assert "status=deferred" in line and "4.7.5" in line
    assert "result=certificate-host-mismatch" in dane_line(server, "ta-name.test")
    never_received(env, "u@ta-name.test")


def test_tlsa_without_starttls_defers_never_clear_text(env, server):
    send(server, "u@notls.test")
    line = relay_line(server, "u@notls.test")
    assert "status=deferred" in line and "4.7.5" in line
    assert "result=starttls-not-supported" in dane_line(server, "notls.test")
    never_received(env, "u@notls.test")


def test_insecure_mx_falls_back_to_the_normal_policy(env, server):
    got = None
    send(server, "u@insecure-mx.test")
    got = received_by(env, "plain", "u@insecure-mx.test")
    assert got["tls"] is False
    line = relay_line(server, "u@insecure-mx.test")
    assert "status=sent" in line and "tls_policy" not in line


def test_insecure_tlsa_falls_back_to_the_normal_policy(env, server):
    send(server, "u@insecure-tlsa.test")
    assert received_by(env, "plain", "u@insecure-tlsa.test")["tls"] is False
    assert "tls_policy" not in relay_line(server, "u@insecure-tlsa.test")


def test_unusable_records_only_require_tls_without_authentication(env, server):
    send(server, "u@unusable.test")
    assert received_by(env, "ee", "u@unusable.test")["tls"] is True
    assert "tls_policy=dane" in relay_line(server, "u@unusable.test")
    assert "result=success (no usable TLSA record" in dane_line(server, "unusable.test")
    send(server, "u@unusable-plain.test")
    line = relay_line(server, "u@unusable-plain.test")
    assert "status=deferred" in line and "4.7.5" in line
    assert "result=starttls-not-supported" in dane_line(server, "unusable-plain.test")
    never_received(env, "u@unusable-plain.test")


def test_tlsa_lookup_failure_defers(env, server):
    send(server, "u@servfail.test")
    line = relay_line(server, "u@servfail.test")
    assert "status=deferred" in line and "4.7.5" in line
    assert "result=dnssec-invalid" in dane_line(server, "servfail.test")
    never_received(env, "u@servfail.test")


def doctor_dane_finding(config_path) -> dict:
    done = subprocess.run([sys.executable, "-m", "mailsrv.tools.cli", "doctor", "--json",
                           "--config", str(config_path)], capture_output=True, text=True,
                          timeout=120, env=_env())
    report = json.loads(done.stdout)
    [found] = [f for f in report["findings"] if f["check"] == "dane"]
    return found


def test_doctor_tells_whether_the_resolver_validates(env, server, tmp_path):
    # the test zone has no root: no AD bit for it, as from a resolver that does not validate
    found = doctor_dane_finding(server.config_path)
    assert found["level"] == "warning" and "not validating" in found["detail"]
    assert "relay.dane = false" in found["fix"]
    validating = DNSServer(tmp_path, {"records": {".": [["A", "127.0.0.9"]]}, "secure": ["."]})
    try:
        config = tmp_path / "mailsrv.toml"
        config.write_text(server.config_path.read_text().replace(
            f"127.0.0.1:{env['dns'].port}", f"127.0.0.1:{validating.port}"))
        found = doctor_dane_finding(config)
        assert found["level"] == "ok" and "AD bit is set" in found["detail"], found
    finally:
        validating.stop()


def test_the_next_mx_after_one_that_fails_dane(env, server):
    send(server, "u@two-mx.test")
    assert received_by(env, "ta", "u@two-mx.test")["tls"] is True
    line = relay_line(server, "u@two-mx.test")
    assert "status=sent" in line and "relay=mx.ta.test" in line and "tls_policy=dane" in line
    log = server.log_text()
    assert re.search(r"dane: two-mx.test bad.ee.test\[127.0.0.2\] .* result=certificate-not-trusted",
                     log)
    assert re.search(r"dane: two-mx.test mx.ta.test\[127.0.0.3\] .* result=success", log)


def test_a_tlsa_rrset_too_large_for_udp_comes_over_tcp(env, server):
    send(server, "u@big.test")
    assert received_by(env, "ee", "u@big.test")["tls"] is True
    assert "tls_policy=dane" in relay_line(server, "u@big.test")
    assert "result=success (DANE-EE 3 1 1)" in dane_line(server, "big.test")
    # The TCP connection to the resolver logs nothing of its own ("Starting factory <...>").
    assert "_StreamFactory" not in server.log_text()
