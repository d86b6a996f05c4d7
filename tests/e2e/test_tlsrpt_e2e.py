"""
TLS-RPT end to end: a real server relays to sinks (one with STARTTLS and a certificate from
the test CA, one without, one whose certificate names another host under relay.tls_policy
"verify"), the loopback DNS publishes ``_smtp._tls`` records pointing at a third domain whose
MX is another sink; ``mailsrv tls-report --send-now`` makes the server send its reports, and
the reports arrive at that sink as mail, DKIM-signed, gunzipped and checked there (after a
restart in between: the counts survive it), and at a loopback HTTPS server by POST.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import http.server
import json
import re
import ssl
import threading

import dkim
import pytest

from support.certs import make_ca, self_signed
from support.harness import DNSServer, MailServer, SMTPSink, free_port, wait_for
from support.mail import send_mail

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.6", "127.0.0.7"]
RUA = "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"


def zone(records: dict) -> dict:
    return {"records": records}


RECORDS = {
    "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
    "client.test": [["A", "127.0.0.1"]],
    "tls.test": [["MX", 10, "mx.tls.test"]],
    "mx.tls.test": [["A", "127.0.0.6"]],
    "_smtp._tls.tls.test": [["TXT", RUA]],
    "plain.test": [["MX", 10, "mx.plain.test"]],
    "mx.plain.test": [["A", "127.0.0.2"]],
    "reports.https.test": [["A", "127.0.0.1"]],
    "wrongname.test": [["MX", 10, "mx.wrongname.test"]],
    "mx.wrongname.test": [["A", "127.0.0.6"]],  # its certificate names mx.tls.test
    "_smtp._tls.wrongname.test": [["TXT", RUA]],
    "expired.test": [["MX", 10, "mx.expired.test"]],
    "mx.expired.test": [["A", "127.0.0.4"]],  # a certificate of the test CA, expired
    "_smtp._tls.expired.test": [["TXT", RUA]],
    "untrusted.test": [["MX", 10, "mx.untrusted.test"]],
    "mx.untrusted.test": [["A", "127.0.0.7"]],  # a self-signed certificate
    "_smtp._tls.untrusted.test": [["TXT", RUA]],
    "quiet.test": [["MX", 10, "mx.tls.test"]],  # no _smtp._tls record: no report
    "reports.test": [["MX", 10, "mx.reports.test"]],
    "mx.reports.test": [["A", "127.0.0.3"]],
}


class ReportReceiver(http.server.BaseHTTPRequestHandler):
    """An https: rua: keeps each POST (path, Content-Type, body), answers 201."""

    posted: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posted.append((self.path, self.headers["Content-Type"], body))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args):
        pass


def https_server(ca, workdir, cert=None) -> http.server.HTTPServer:
    cert, key = cert or ca.issue(["reports.https.test"], workdir)
    server = http.server.HTTPServer(("127.0.0.1", 0), ReportReceiver)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def env(tmp_path):
    port = free_port(HOSTS)
    ca = make_ca(tmp_path)
    sinks = {
        "plain": SMTPSink(tmp_path / "plain", "127.0.0.2", hostname="mx.plain.test", port=port),
        "reports": SMTPSink(tmp_path / "reports", "127.0.0.3", hostname="mx.reports.test",
                            port=port),
        "tls": SMTPSink(tmp_path / "tls", "127.0.0.6", hostname="mx.tls.test", port=port,
                        tls=ca.issue(["mx.tls.test"], tmp_path)),
        "expired": SMTPSink(tmp_path / "expired", "127.0.0.4", hostname="mx.expired.test",
                            port=port, tls=ca.issue(["mx.expired.test"], tmp_path, days=-0.5)),
        "untrusted": SMTPSink(tmp_path / "untrusted-mx", "127.0.0.7",
                              hostname="mx.untrusted.test", port=port,
                              tls=self_signed(["mx.untrusted.test"], tmp_path)),
    }
    (tmp_path / "server").mkdir()
    ReportReceiver.posted = []
    web = https_server(ca, tmp_path)
    https_rua = f"https://reports.https.test:{web.server_address[1]}/v1/tlsrpt"
    (tmp_path / "untrusted").mkdir()
    impostor = https_server(ca, tmp_path, self_signed(["reports.https.test"],
                                                      tmp_path / "untrusted"))
    bad_rua = f"https://reports.https.test:{impostor.server_address[1]}/v1/tlsrpt"
    dns = DNSServer(tmp_path, zone(dict(RECORDS, **{
        "_smtp._tls.plain.test": [["TXT", f"{RUA},{https_rua}"]],
        "_smtp._tls.tls.test": [["TXT", f"{RUA},{bad_rua}"]]})))
    server = MailServer(tmp_path / "server", dns.port, overrides={
        "queue": {"retry_schedule": [3600], "max_age": 7200},
        "relay": {"port": port, "tls_policy": {"wrongname.test": "verify", "expired.test": "verify",
                                             "untrusted.test": "verify"},
                  "tls_ca_file": str(ca.cert_path)},
        "tls_reports": {"enabled": True, "organization": "Example Org",
                        "contact": "tls-admin@example.org"},
    })
    keygen = server.cli("dkim", "keygen", "example.org", "--selector", "t1",
                             "--algorithm", "ed25519")
    assert keygen.returncode == 0, keygen.stderr
    text = keygen.stdout[keygen.stdout.index("t1._domainkey."):]
    dkim_record = "".join(re.findall(r'"([^"]*)"', text))
    server.start()
    yield {"server": server, "sinks": sinks, "dkim": dkim_record, "https": https_rua,
           "bad_https": bad_rua}
    server.stop()
    web.shutdown()
    impostor.shutdown()
    for sink in sinks.values():
        sink.stop()
    dns.stop()


def send(server: MailServer, *to: str) -> None:
    message = f"From: <alice@example.org>\r\nTo: <{to[0]}>\r\nSubject: hi\r\n\r\nhello\r\n"
    send_mail(server.port, "alice@example.org", list(to), message.encode(), timeout=20)


def test_reports_of_a_relay_day_reach_the_rua(env):
    server, sinks = env["server"], env["sinks"]
    send(server, "t0@tls.test", "t1@tls.test")  # one session
    send(server, "q@quiet.test")
    send(server, "p@plain.test")
    send(server, "w@wrongname.test")
    send(server, "e@expired.test")
    send(server, "u@untrusted.test")
    sinks["tls"].wait_for_messages(2)
    sinks["plain"].wait_for_messages(1)
    wait_for(lambda: all(f"to=<{a}> relay=none" in server.log_text() for a in (
        "w@wrongname.test", "e@expired.test", "u@untrusted.test")), 20, "the verify failures")

    server.stop()  # a clean stop writes the counts; the restart reads them back
    state = json.loads((server.queue / "tlsrpt.json").read_text())
    assert sorted(p["domain"] for p in state["policies"]) == [
        "expired.test", "plain.test", "quiet.test", "tls.test", "untrusted.test",
        "wrongname.test"]
    server.start()

    done = server.cli("tls-report", "--send-now")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"ok: 6 report(s): expired.test -> mailto:tlsrpt@reports.test; plain.test -> "
        f"mailto:tlsrpt@reports.test; plain.test -> {env['https']}; tls.test -> "
        "mailto:tlsrpt@reports.test; untrusted.test -> mailto:tlsrpt@reports.test; "
        "wrongname.test -> mailto:tlsrpt@reports.test")
    # tls.test's https: rua has a certificate nobody vouches for: nothing is posted there.
    assert re.search(rf"tlsrpt: report \S+ for tls.test to {re.escape(env['bad_https'])} "
                     r"failed: .*certificate verify failed", server.log_text())
    [(path, content_type, body)] = ReportReceiver.posted
    assert (path, content_type) == ("/v1/tlsrpt", "application/tlsrpt+gzip")
    posted = json.loads(gzip.decompress(body))

    got = sinks["reports"].wait_for_messages(5)
    assert all(m["rcpt_to"] == ["tlsrpt@reports.test"] for m in got)
    reports = {}
    for received in got:
        raw = received["data"].encode("latin-1")
        assert received["mail_from"] == ""
        message = email.message_from_bytes(raw, policy=email.policy.default)
        domain = message["TLS-Report-Domain"]
        assert message["TLS-Report-Submitter"] == "mx.example.org"
        assert message.get_content_type() == "multipart/report"
        assert message.get_param("report-type") == "tlsrpt"
        assert str(message["Subject"]).startswith(
            f"Report Domain: {domain} Submitter: mx.example.org Report-ID: <")
        assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: env["dkim"].encode()), \
            "the report is DKIM-signed for example.org"
        [part] = [p for p in message.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
        assert part.get_filename().startswith(f"mx.example.org!{domain}!")
        reports[domain] = json.loads(gzip.decompress(part.get_payload(decode=True)))

    assert sorted(reports) == ["expired.test", "plain.test", "tls.test", "untrusted.test",
                               "wrongname.test"]
    for domain, report in reports.items():
        assert report["organization-name"] == "Example Org"
        assert report["contact-info"] == "tls-admin@example.org"
        [policy] = report["policies"]
        assert policy["policy"] == {"policy-type": "no-policy-found", "policy-domain": domain}
    ok = reports["tls.test"]["policies"][0]
    assert ok["summary"] == {"total-successful-session-count": 1,
                             "total-failure-session-count": 0}
    plain = reports["plain.test"]["policies"][0]
    assert plain["summary"] == {"total-successful-session-count": 0,
                                "total-failure-session-count": 1}
    assert plain["failure-details"] == [{
        "result-type": "starttls-not-supported", "receiving-mx-hostname": "mx.plain.test",
        "receiving-ip": "127.0.0.2", "failed-session-count": 1,
        "failure-reason-code": "STARTTLS not offered"}]
    assert posted == reports["plain.test"]  # the same report, by mail and by POST
    wrong = reports["wrongname.test"]["policies"][0]
    assert wrong["summary"]["total-failure-session-count"] == 1
    [detail] = wrong["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == "mx.wrongname.test"
    for domain, result_type in (("expired.test", "certificate-expired"),
                                ("untrusted.test", "certificate-not-trusted")):
        [detail] = reports[domain]["policies"][0]["failure-details"]
        assert (detail["result-type"], detail["failed-session-count"]) == (result_type, 1)

    # The period restarted: nothing more to say until new sessions.
    again = server.cli("tls-report", "--send-now")
    # (the report mails themselves went to reports.test, which publishes no record)
    assert again.stdout.strip() == "ok: no policy domain with a _smtp._tls record", again
