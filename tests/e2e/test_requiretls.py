"""
REQUIRETLS and ``TLS-Required: No`` end to end (RFC 8689): smtplib over STARTTLS into mailsrv,
SMTP sinks on 127.0.0.x as the next hops (a valid certificate with REQUIRETLS, one without
REQUIRETLS, one with a certificate for another name), and an MTA-STS ``enforce`` domain
whose MX has the wrong certificate for the opt-out header.
"""

from __future__ import annotations

import email
import email.policy
import json
import time

import pytest

from support.certs import make_ca
from support.harness import DNSServer, MailServer, SMTPSink, free_port, wait_for
from support.mail import connect
from support.sts_server import PolicyServer

HOSTS = ["127.0.0.6", "127.0.0.7", "127.0.0.8"]

ZONE = {"records": {
    "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
    "client.test": [["A", "127.0.0.1"]],
    "good.test": [["MX", 10, "mx.good.test"]],
    "mx.good.test": [["A", "127.0.0.6"]],
    "wrong.test": [["MX", 10, "mx.wrong.test"]],
    "mx.wrong.test": [["A", "127.0.0.7"]],
    "nort.test": [["MX", 10, "mx.nort.test"]],
    "mx.nort.test": [["A", "127.0.0.8"]],
    "strict.test": [["MX", 10, "mx.wrong.test"]],
    "mixed.test": [["MX", 10, "mx.nort.test"], ["MX", 20, "mx.good.test"]],
    "_mta-sts.strict.test": [["TXT", "v=STSv1; id=1"]],
    "mta-sts.strict.test": [["A", "127.0.0.1"]],
}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("requiretls")
    ca = make_ca(work)
    policies = PolicyServer(ca.issue(["mta-sts.strict.test"], work, stem="mta-sts"))
    policies.set("strict.test", "version: STSv1\nmode: enforce\nmx: mx.wrong.test\n"
                 "max_age: 86400\n")
    port = free_port(HOSTS)
    sinks = {
        "good": SMTPSink(work / "good", "127.0.0.6", hostname="mx.good.test", port=port,
                         tls=ca.issue(["mx.good.test"], work), rules={"requiretls": True}),
        "wrong": SMTPSink(work / "wrong", "127.0.0.7", hostname="mx.wrong.test", port=port,
                          tls=ca.issue(["other.test"], work), rules={"requiretls": True}),
        "nort": SMTPSink(work / "nort", "127.0.0.8", hostname="mx.nort.test", port=port,
                         tls=ca.issue(["mx.nort.test"], work)),
    }
    dns = DNSServer(work, ZONE)
    cert, key = ca.issue(["mx.example.org"], work, ips=("127.0.0.1",))
    (work / "server").mkdir()
    server = MailServer(work / "server", dns.port, overrides={
        "tls": {"cert": str(cert), "key": str(key)},
        "queue": {"retry_schedule": [1], "max_age": 3600},
        "relay": {"port": port, "tls_ca_file": str(ca.cert_path),
                  "mta_sts_port": policies.port}},
    ).start()
    yield {"ca": ca, "sinks": sinks, "server": server}
    server.stop()
    for sink in sinks.values():
        sink.stop()
    dns.stop()
    policies.stop()


def send_requiretls(env, recipient: str, sender: str = "alice@example.org",
                    headers: str = "", requiretls: bool = True) -> None:
    server = env["server"]
    message = f"From: <{sender}>\r\nSubject: to {recipient}\r\n{headers}\r\nsecret\r\n"
    with connect(server.port, timeout=20) as client:
        client.starttls(context=env["ca"].client_context())
        client.ehlo()
        assert client.has_extn("requiretls")
        client.sendmail(sender, [recipient], message.encode(),
                        mail_options=["REQUIRETLS"] if requiretls else [])


def received_by(sink: SMTPSink, recipient: str) -> list[dict]:
    return [m for m in sink.messages() if recipient in m["rcpt_to"]]


def dsn_status(server: MailServer, recipient: str) -> tuple[str, str]:
    """(Status, Diagnostic-Code) of the failure report to alice about ``recipient``."""
    def find():
        for message in server.messages("alice@example.org"):
            parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
            if parsed.get_content_type() != "multipart/report":
                continue
            for part in parsed.walk():
                if part.get_content_type() == "message/delivery-status":
                    for block in part.get_payload()[1:]:
                        if recipient in str(block.get("Final-Recipient")):
                            return str(block["Status"]), str(block["Diagnostic-Code"])
        return None
    return wait_for(find, 20, f"a failure report about {recipient}")


def test_requiretls_is_offered_over_tls_only_and_refused_in_clear(env):
    server = env["server"]
    with connect(server.port) as client:
        client.ehlo()
        assert not client.has_extn("requiretls")
        assert client.mail("alice@example.org", ["REQUIRETLS"]) == (
            530, b"5.7.10 Error: REQUIRETLS needs a TLS session")
        client.rset()
        client.starttls(context=env["ca"].client_context())
        client.ehlo()
        assert client.has_extn("requiretls")
        assert client.mail("alice@example.org", ["REQUIRETLS=YES"])[0] == 501
        client.rset()
        assert client.mail("alice@example.org", ["REQUIRETLS"])[0] == 250


def test_relayed_over_verified_tls_with_requiretls(env):
    send_requiretls(env, "r@good.test")
    [got] = wait_for(lambda: received_by(env["sinks"]["good"], "r@good.test"), 20, "delivery")
    assert got["tls"] is True and "REQUIRETLS" in got["mail_params"]


def test_a_plain_message_is_not_relayed_with_requiretls(env):
    send_requiretls(env, "p@good.test", requiretls=False)
    [got] = wait_for(lambda: received_by(env["sinks"]["good"], "p@good.test"), 20, "delivery")
    assert "REQUIRETLS" not in got["mail_params"]


@pytest.mark.parametrize("recipient, sink, status, detail", [
    ("n@nort.test", "nort", "5.7.30", "does not offer REQUIRETLS"),
    ("w@wrong.test", "wrong", "5.7.10", "certificate-host-mismatch"),
])
def test_bounced_when_no_host_will_do(env, recipient, sink, status, detail):
    send_requiretls(env, recipient)
    got_status, diagnostic = dsn_status(env["server"], recipient)
    assert got_status == status and detail in diagnostic, diagnostic
    assert received_by(env["sinks"][sink], recipient) == []


def test_a_host_that_will_not_do_passes_the_message_to_the_next(env):
    """The best MX lacks REQUIRETLS: not a bounce yet, the next MX has it."""
    send_requiretls(env, "m@mixed.test")
    [got] = wait_for(lambda: received_by(env["sinks"]["good"], "m@mixed.test"), 20, "delivery")
    assert "REQUIRETLS" in got["mail_params"]
    assert received_by(env["sinks"]["nort"], "m@mixed.test") == []


def test_the_report_about_a_requiretls_message_goes_with_requiretls(env):
    """A remote sender's bounce is queued with REQUIRETLS and relayed with it (RFC 8689 §5)."""
    send_requiretls(env, "n2@nort.test", sender="bob@good.test")
    [report] = wait_for(lambda: received_by(env["sinks"]["good"], "bob@good.test"), 20,
                        "the bounce at the sender's MX")
    assert report["mail_from"] == "" and "REQUIRETLS" in report["mail_params"]
    assert "5.7.30" in report["data"]


def test_tls_required_no_overrides_an_enforce_policy(env):
    server = env["server"]
    send_requiretls(env, "o@strict.test", headers="TLS-Required: No\r\n", requiretls=False)
    [got] = wait_for(lambda: received_by(env["sinks"]["wrong"], "o@strict.test"), 20,
                     "delivery despite the policy")
    assert "TLS-Required: No" in got["data"]
    # Without the header, the same destination waits (the policy is enforced).
    send_requiretls(env, "e@strict.test", requiretls=False)

    def deferred():
        for path in (server.queue / "messages").glob("*.json"):
            for r in json.loads(path.read_text())["recipients"]:
                if r["address"] == "e@strict.test" and r["attempts"] >= 1:
                    return r
        return None
    r = wait_for(deferred, 20, "a deferral")
    assert r["last_error"].startswith("451 4.7.5")
    time.sleep(1)
    assert received_by(env["sinks"]["wrong"], "e@strict.test") == []


def test_requiretls_wins_over_the_opt_out_header(env):
    send_requiretls(env, "both@wrong.test", headers="TLS-Required: No\r\n")
    status, _ = dsn_status(env["server"], "both@wrong.test")
    assert status == "5.7.10"
    assert received_by(env["sinks"]["wrong"], "both@wrong.test") == []
