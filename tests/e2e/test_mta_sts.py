"""
MTA-STS outbound end to end (RFC 8461): the loopback DNS publishes ``_mta-sts`` records, a
loopback HTTPS server (certificate from the test CA) serves the policies, and the MX hosts
are SMTP sinks on 127.0.0.x: with a valid certificate for their name, with one for another
name, and without STARTTLS.  The relayer resolves mta-sts.<domain> with the loopback DNS and
fetches from ``relay.mta_sts_port`` (the test's port instead of 443).
"""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from support.certs import make_ca, self_signed
from support.harness import DNSServer, MailServer, SMTPSink, free_port, wait_for
from support.mail import send_mail
from support.sts_server import PolicyServer

HOSTS = ["127.0.0.2", "127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9"]


def policy(mode: str, *mx: str, max_age: int = 86400) -> str:
    return "version: STSv1\r\nmode: " + mode + "\r\n" + "".join(
        f"mx: {m}\r\n" for m in mx) + f"max_age: {max_age}\r\n"


def sts_domain(name: str, mx: str, policy_id: str = "1") -> dict:
    return {name: [["MX", 10, mx]], f"_mta-sts.{name}": [["TXT", f"v=STSv1; id={policy_id};"]],
            f"mta-sts.{name}": [["A", "127.0.0.1"]]}


HOST_RECORDS = {
    "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
    "client.test": [["A", "127.0.0.1"]],
    "mx.good.test": [["A", "127.0.0.6"]],
    "mx.wrong.test": [["A", "127.0.0.7"]],
    "mx.plain.test": [["A", "127.0.0.2"]],
    "mx.expired.test": [["A", "127.0.0.8"]],
    "mx.self.test": [["A", "127.0.0.9"]],
}

POLICIES = {
    "enforce.test": ("mx.good.test", policy("enforce", "mx.good.test")),
    "wildcard.test": ("mx.good.test", policy("enforce", "*.good.test")),
    "wrongcert.test": ("mx.wrong.test", policy("enforce", "mx.wrong.test")),
    "notlisted.test": ("mx.good.test", policy("enforce", "mx.other.test")),
    "stripped.test": ("mx.plain.test", policy("enforce", "mx.plain.test")),
    "expired.test": ("mx.expired.test", policy("enforce", "mx.expired.test")),
    "selfsigned.test": ("mx.self.test", policy("enforce", "mx.self.test")),
    "testing.test": ("mx.wrong.test", policy("testing", "mx.wrong.test")),
    "none.test": ("mx.wrong.test", policy("none")),
}
#: Domains whose policy server answers wrongly: (MX, status, content type, body, result type)
BROKEN = {
    "missing.test": (404, "text/plain", b"not found", "sts-policy-fetch-error"),
    "redirect.test": (302, "text/plain", b"", "sts-policy-fetch-error"),
    "html.test": (200, "text/html", policy("enforce", "mx.good.test").encode(),
                  "sts-policy-invalid"),
    "huge.test": (200, "text/plain", policy("enforce", "mx.good.test").encode()
                  + b"x: " + b"y" * 65536 + b"\r\n", "sts-policy-fetch-error"),
    "garbage.test": (200, "text/plain", b"version: STSv1\r\nmode: enforce\r\n",
                     "sts-policy-invalid"),
}


def zone() -> dict:
    records = dict(HOST_RECORDS)
    for name, (mx, _text) in POLICIES.items():
        records.update(sts_domain(name, mx))
    for name in BROKEN:
        records.update(sts_domain(name, "mx.good.test"))
    records["plain-nosts.test"] = [["MX", 10, "mx.wrong.test"]]
    return {"records": records}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("mtasts")
    ca = make_ca(work)
    names = [f"mta-sts.{d}" for d in list(POLICIES) + list(BROKEN) + ["cached.test"]]
    policies = PolicyServer(ca.issue(names, work, stem="mta-sts"))
    for name, (_mx, text) in POLICIES.items():
        policies.set(name, text)
    for name, (status, kind, body, _result) in BROKEN.items():
        policies.set(name, body, status=status, content_type=kind)
    port = free_port(HOSTS)
    sinks = {
        "good": SMTPSink(work / "good", "127.0.0.6", hostname="mx.good.test", port=port,
                         tls=ca.issue(["mx.good.test"], work)),
        "wrong": SMTPSink(work / "wrong", "127.0.0.7", hostname="mx.wrong.test", port=port,
                          tls=ca.issue(["other.test"], work)),
        "plain": SMTPSink(work / "plain", "127.0.0.2", hostname="mx.plain.test", port=port),
        "expired": SMTPSink(work / "expired", "127.0.0.8", hostname="mx.expired.test", port=port,
                            tls=ca.issue(["mx.expired.test"], work, days=-0.5)),
        "self": SMTPSink(work / "self", "127.0.0.9", hostname="mx.self.test", port=port,
                         tls=self_signed(["mx.self.test"], work)),
    }
    dns = DNSServer(work, zone())
    yield {"ca": ca, "policies": policies, "port": port, "sinks": sinks, "dns": dns,
           "work": work}
    for sink in sinks.values():
        sink.stop()
    dns.stop()
    policies.stop()


def relay_config(env) -> dict:
    return {"port": env["port"], "tls_ca_file": str(env["ca"].cert_path),
            "mta_sts_port": env["policies"].port}


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    s = MailServer(tmp_path_factory.mktemp("mtasts-server"), env["dns"].port, overrides={
        "queue": {"retry_schedule": [1], "max_age": 3600}, "relay": relay_config(env)}).start()
    yield s
    s.stop()


def send(server: MailServer, recipient: str, headers: str = "") -> None:
    message = f"From: <alice@example.org>\r\nSubject: to {recipient}\r\n{headers}\r\nHello.\r\n"
    send_mail(server.port, "alice@example.org", [recipient], message.encode(), timeout=20)


def received_by(sink: SMTPSink, recipient: str) -> list[dict]:
    return [m for m in sink.messages() if recipient in m["rcpt_to"]]


def recipient_state(server: MailServer, address: str) -> dict | None:
    for path in (server.queue / "messages").glob("*.json"):
        for r in json.loads(path.read_text())["recipients"]:
            if r["address"] == address:
                return r
    return None


def wait_deferred(server: MailServer, address: str) -> dict:
    def deferred():
        r = recipient_state(server, address)
        return r if r and r["attempts"] >= 1 and r["status"] == "queued" else None
    return wait_for(deferred, 20, f"a deferral of {address}")


def test_enforce_with_a_matching_mx_and_valid_certificate_delivers(env, server):
    send(server, "a@enforce.test")
    [got] = wait_for(lambda: received_by(env["sinks"]["good"], "a@enforce.test"), 20,
                     "delivery to mx.good.test")
    assert got["tls"] is True
    wait_for(lambda: "tls-policy domain=enforce.test mx=mx.good.test[127.0.0.6] tls_policy=sts "
             "mode=enforce result=success" in server.log_text(), 10, "the policy log line")
    cached = server.queue / "mta-sts" / "enforce.test.json"
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert json.loads(cached.read_text())["id"] == "1"


def test_a_wildcard_mx_pattern_matches_one_label(env, server):
    send(server, "w@wildcard.test")
    wait_for(lambda: received_by(env["sinks"]["good"], "w@wildcard.test"), 20, "delivery")


@pytest.mark.parametrize("recipient, code, detail", [
    ("c@wrongcert.test", "451 4.7.5", "certificate-host-mismatch"),
    ("m@notlisted.test", "451 4.7.0", "allows none of its MX hosts"),
    ("s@stripped.test", "451 4.7.4", "does not offer STARTTLS"),
    ("x@expired.test", "451 4.7.5", "certificate-expired"),
    ("u@selfsigned.test", "451 4.7.5", "certificate-not-trusted"),
])
def test_enforce_defers_what_fails_the_policy(env, server, recipient, code, detail):
    send(server, recipient)
    r = wait_deferred(server, recipient)
    assert r["last_error"].startswith(code) and detail in r["last_error"], r["last_error"]
    time.sleep(1.5)  # a retry or two: still never sent
    for sink in env["sinks"].values():
        assert received_by(sink, recipient) == []


def test_testing_mode_delivers_and_logs_what_would_have_failed(env, server):
    send(server, "t@testing.test")
    [got] = wait_for(lambda: received_by(env["sinks"]["wrong"], "t@testing.test"), 20,
                     "delivery despite the certificate")
    assert got["tls"] is True
    # (logged when the session has ended, which may be after the sink recorded the message)
    for line in ("mta-sts: testing.test: mx.wrong.test[127.0.0.7] would fail the policy "
                 "(testing): certificate-host-mismatch",
                 "tls_policy=sts mode=testing result=certificate-host-mismatch",
                 "to=<t@testing.test> relay=mx.wrong.test[127.0.0.7]"):
        wait_for(lambda line=line: line in server.log_text(), 10, f"the log line {line!r}")
    relay_line = [ln for ln in server.log_text().splitlines() if "to=<t@testing.test>" in ln]
    assert " tls_policy=sts delay=" in relay_line[-1]


def test_mode_none_is_no_policy(env, server):
    send(server, "n@none.test")
    wait_for(lambda: received_by(env["sinks"]["wrong"], "n@none.test"), 20, "delivery")


@pytest.mark.parametrize("domain", sorted(BROKEN))
def test_a_policy_that_cannot_be_had_is_no_policy(env, server, domain):
    """Nothing cached: delivered as without MTA-STS, the failure logged with its TLS-RPT name."""
    recipient = f"b@{domain}"
    send(server, recipient)
    wait_for(lambda: received_by(env["sinks"]["good"], recipient), 20, "delivery")
    result = BROKEN[domain][3]
    wait_for(lambda: f"mta-sts: {domain}: policy 1 not fetched ({result}" in server.log_text(),
             10, "the fetch failure in the log")
    assert not (server.queue / "mta-sts" / f"{domain}.json").exists()


def test_the_policy_fetch_verifies_the_https_certificate(env, tmp_path):
    """A CA bundle that does not hold the test CA: the fetch fails as sts-webpki-invalid
    (and the MX's certificate cannot be trusted either, but that is not enforced then)."""
    other = make_ca(tmp_path)
    relay = dict(relay_config(env), tls_ca_file=str(other.cert_path))
    (tmp_path / "s").mkdir()
    s = MailServer(tmp_path / "s", env["dns"].port, overrides={"relay": relay}).start()
    try:
        send(s, "x@enforce.test")
        wait_for(lambda: "mta-sts: enforce.test: policy 1 not fetched (sts-webpki-invalid"
                 in s.log_text(), 20, "the certificate failure")
        wait_for(lambda: received_by(env["sinks"]["good"], "x@enforce.test"), 20, "delivery")
    finally:
        s.stop()


def test_no_txt_record_no_policy_and_no_fetch(env, server):
    before = env["policies"].requests["plain-nosts.test"]
    send(server, "p@plain-nosts.test")
    wait_for(lambda: received_by(env["sinks"]["wrong"], "p@plain-nosts.test"), 20, "delivery")
    assert env["policies"].requests["plain-nosts.test"] == before


def test_the_cache_survives_a_restart_and_a_new_id_is_fetched(env, tmp_path):
    """Fetched once (id 1, enforce, mx.good.test); then the policy server fails and the
    domain's MX moves to a host the policy does not name: after a restart the cached policy
    still holds (deferred, not sent); a new id in the TXT record fetches the new policy."""
    work = tmp_path
    records = dict(HOST_RECORDS, **sts_domain("cached.test", "mx.good.test"))
    dns = DNSServer(work, {"records": records})
    policies = env["policies"]
    policies.set("cached.test", policy("enforce", "mx.good.test"))
    (work / "s").mkdir()
    s = MailServer(work / "s", dns.port, overrides={
        "queue": {"retry_schedule": [1], "max_age": 3600}, "relay": relay_config(env)})
    try:
        s.start()
        send(s, "one@cached.test")
        wait_for(lambda: received_by(env["sinks"]["good"], "one@cached.test"), 20, "delivery")
        s.stop()
        assert policies.requests["cached.test"] == 1

        policies.set("cached.test", "gone", status=500)
        dns.stop()
        records.update(sts_domain("cached.test", "mx.wrong.test"))
        dns = DNSServer(work, {"records": records}, port=dns.port)
        s.start()
        send(s, "two@cached.test")
        r = wait_deferred(s, "two@cached.test")
        assert r["last_error"].startswith("451 4.7.0"), r["last_error"]
        assert received_by(env["sinks"]["wrong"], "two@cached.test") == []
        assert policies.requests["cached.test"] == 1  # same id: the cache answers

        # A new id: fetched again; the new policy names the new MX (testing) and the message
        # that waited goes out.
        policies.set("cached.test", policy("testing", "mx.wrong.test"))
        dns.stop()
        records.update(sts_domain("cached.test", "mx.wrong.test", policy_id="2"))
        dns = DNSServer(work, {"records": records}, port=dns.port)
        wait_for(lambda: received_by(env["sinks"]["wrong"], "two@cached.test"), 30,
                 "delivery under the new policy")
        assert policies.requests["cached.test"] >= 2
        cached = json.loads((s.queue / "mta-sts" / "cached.test.json").read_text())
        assert cached["id"] == "2" and "mode: testing" in cached["text"]
    finally:
        s.stop()
        dns.stop()


def test_mta_sts_off_ignores_policies(env, tmp_path):
    relay = dict(relay_config(env), mta_sts=False)
    (tmp_path / "s").mkdir()
    s = MailServer(tmp_path / "s", env["dns"].port, overrides={"relay": relay}).start()
    try:
        send(s, "off@wrongcert.test")
        wait_for(lambda: received_by(env["sinks"]["wrong"], "off@wrongcert.test"), 20,
                 "delivery without MTA-STS")
        assert not os.path.exists(s.queue / "mta-sts")
    finally:
        s.stop()


def test_sessions_under_a_policy_are_counted_for_tls_rpt(env, tmp_path):
    """With [tls_reports] on, a session under an MTA-STS policy is counted under policy-type
    sts with the policy's lines and mx patterns (RFC 8460 §4.4), as `mailsrv tls-report`
    shows them: a success for enforce.test, a certificate-host-mismatch for wrongcert.test."""
    s = MailServer(tmp_path, env["dns"].port, overrides={
        "queue": {"retry_schedule": [3600], "max_age": 7200}, "relay": relay_config(env),
        "tls_reports": {"enabled": True}})
    try:
        s.start()
        send(s, "rpt@enforce.test")
        send(s, "rpt@wrongcert.test")
        wait_for(lambda: received_by(env["sinks"]["good"], "rpt@enforce.test"), 20, "delivery")
        wait_deferred(s, "rpt@wrongcert.test")
    finally:
        s.stop()  # a clean stop writes the counts
    shown = s.cli("tls-report")
    assert shown.returncode == 0, shown.stderr
    reports = json.loads(shown.stdout)
    for domain, mx, successes, failures in (("enforce.test", "mx.good.test", 1, 0),
                                            ("wrongcert.test", "mx.wrong.test", 0, 1)):
        [entry] = reports[domain]["policies"]
        assert entry["policy"] == {
            "policy-type": "sts", "policy-domain": domain, "mx-host": [mx],
            "policy-string": POLICIES[domain][1].rstrip("\r\n").split("\r\n")}
        assert entry["summary"] == {"total-successful-session-count": successes,
                                    "total-failure-session-count": failures}
    [detail] = reports["wrongcert.test"]["policies"][0]["failure-details"]
    assert (detail["result-type"], detail["receiving-mx-hostname"], detail["receiving-ip"]) == (
        "certificate-host-mismatch", "mx.wrong.test", "127.0.0.7")
