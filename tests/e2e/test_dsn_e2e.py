"""
DSN (RFC 3461) end to end: smtplib's mail_options and rcpt_options to the real server, the
parameters passed on to a loopback next hop that offers DSN (SMTPSink with ``"dsn": true``),
a ``relayed`` report when it does not, a ``delivered`` report for local delivery, and the
failure reports NOTIFY and RET shape, each arriving in the sender's Maildir and parsed back
with the ``email`` module.
"""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from support.harness import DNSServer, MailServer, SMTPSink, free_port, wait_for
from support.mail import connect

ZONE = {
    "records": {
        "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
        "client.test": [["A", "127.0.0.1"]],
        "dsn.test": [["MX", 10, "mx.dsn.test"]],
        "mx.dsn.test": [["A", "127.0.0.2"]],
        "plain.test": [["MX", 10, "mx.plain.test"]],
        "mx.plain.test": [["A", "127.0.0.3"]],
    },
}
MESSAGE = (b"From: <alice@example.org>\r\nSubject: dsn test\r\nMessage-ID: <t1@example.org>\r\n"
           b"\r\nthe secret body\r\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("dsn")
    dns = DNSServer(work, ZONE)
    port = free_port(["127.0.0.2", "127.0.0.3"])
    sinks = {
        "dsn": SMTPSink(work / "dsn", "127.0.0.2", hostname="mx.dsn.test", port=port,
                        rules={"dsn": True}),
        "plain": SMTPSink(work / "plain", "127.0.0.3", hostname="mx.plain.test", port=port,
                          rules={"rcpt": [["^refuse", "550 5.1.1 no such user"]]}),
    }
    yield {"dns": dns, "port": port, "sinks": sinks}
    for sink in sinks.values():
        sink.stop()
    dns.stop()


@pytest.fixture
def server(env, tmp_path):
    s = MailServer(tmp_path, env["dns"].port, overrides={
        "queue": {"retry_schedule": [1], "max_age": 3600}, "relay": {"port": env["port"]}})
    yield s.start()
    s.stop()


def send(server: MailServer, recipients: dict[str, list[str]], mail_options=()) -> None:
    """One message from alice@example.org, each recipient with its RCPT options."""
    with connect(server.port, timeout=20) as client:
        client.ehlo()
        assert client.has_extn("dsn")
        code, _ = client.mail("alice@example.org", list(mail_options))
        assert code == 250
        for address, options in recipients.items():
            assert client.rcpt(address, options)[0] == 250
        assert client.data(MESSAGE)[0] == 250


def reports(server: MailServer, count: int) -> list[email.message.EmailMessage]:
    """The reports in alice's Maildir, once there are ``count`` of them."""
    def found():
        got = [email.message_from_bytes(m.as_bytes(), policy=email.policy.default)
               for m in server.messages("alice@example.org")]
        got = [m for m in got if m.get_content_type() == "multipart/report"]
        return got if len(got) >= count else None
    return wait_for(found, 20, f"{count} report(s) for alice")


def status(report) -> list:
    [part] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    return part.get_payload()


def queue_empty(server: MailServer) -> bool:
    return not any((server.queue / "messages").iterdir())


def test_ehlo_offers_dsn_and_bad_values_get_501(server):
    with connect(server.port) as client:
        client.ehlo()
        assert client.has_extn("dsn")
        assert client.mail("alice@example.org", ["RET=BODY"]) == (
            501, b"5.5.4 Error: bad value for parameter RET")
        assert client.mail("alice@example.org", ["ENVID=" + "x" * 101])[0] == 501
        assert client.mail("alice@example.org", ["RET=HDRS", "ENVID=" + "x" * 100])[0] == 250
        assert client.rcpt("bob@example.org", ["NOTIFY=NEVER,SUCCESS"]) == (
            501, b"5.5.4 Error: bad value for parameter NOTIFY")
        assert client.rcpt("bob@example.org", ["ORCPT=rfc822;a+2bb"]) == (
            501, b"5.5.4 Error: bad value for parameter ORCPT")
        assert client.rcpt("bob@example.org", ["NOTIFY=NEVER", "NOTIFY=NEVER"]) == (
            501, b"5.5.4 Error: parameter NOTIFY given twice")
        assert client.rcpt("bob@example.org", ["RET=FULL"]) == (
            501, b"5.5.4 Error: unsupported parameter RET")
        assert client.rcpt("bob@example.org", ["NOTIFY=SUCCESS"])[0] == 250


def test_local_delivery_with_notify_success_sends_a_delivered_report(server):
    send(server, {"bob@example.org": ["NOTIFY=SUCCESS", "ORCPT=rfc822;Bob+40example.org"]},
         ["ENVID=QQ+2B1", "RET=HDRS"])
    wait_for(lambda: server.messages("bob@example.org"), 10, "bob's copy")
    [report] = reports(server, 1)
    assert report["Subject"] == "Successful Mail Delivery Report"
    about, r = status(report)
    assert about["Original-Envelope-Id"] == "QQ+1"
    assert (r["Action"], r["Status"], r["Final-Recipient"]) == (
        "delivered", "2.0.0", "rfc822; bob@example.org")
    assert r["Original-Recipient"] == "rfc822;Bob@example.org"
    assert "secret body" not in report.as_string()
    assert "dsn id=" in server.log_text() and "success report delivered to" in server.log_text()


def test_parameters_are_passed_on_to_a_next_hop_that_offers_dsn(env, server):
    sink = env["sinks"]["dsn"]
    before = len(sink.messages())
    send(server, {"x@dsn.test": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;x+2By@dsn.test"],
                  "y@dsn.test": []},
         ["RET=HDRS", "ENVID=env+3D1"])
    [got] = sink.wait_for_messages(before + 1)[before:]
    assert got["rcpt_to"] == ["x@dsn.test", "y@dsn.test"]
    assert got["rcpt_params"] == [{"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;x+2By@dsn.test"},
                                  {}]
    assert sink.mail_commands()[-1].endswith(" RET=HDRS ENVID=env+3D1")
    wait_for(lambda: queue_empty(server), 10, "the queue to empty")
    # The next hop offers DSN: success is its to report, not ours.
    assert server.messages("alice@example.org") == []


def test_a_next_hop_without_dsn_gets_no_parameters_and_we_report_relayed(env, server):
    sink = env["sinks"]["plain"]
    before = len(sink.messages())
    send(server, {"z@plain.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;z@plain.test"]},
         ["ENVID=e1"])
    [got] = sink.wait_for_messages(before + 1)[before:]
    assert got["rcpt_params"] == [{}] and got["mail_params"] == {}
    [report] = reports(server, 1)
    assert report["Subject"] == "Successful Mail Delivery Report"
    about, r = status(report)
    assert about["Original-Envelope-Id"] == "e1"
    assert (r["Action"], r["Final-Recipient"], r["Remote-MTA"]) == (
        "relayed", "rfc822; z@plain.test", "dns; mx.plain.test")
    assert r["Original-Recipient"] == "rfc822;z@plain.test"


def test_never_means_no_failure_report_and_ret_full_returns_the_message(env, server):
    send(server, {"refuse-never@plain.test": ["NOTIFY=NEVER"]}, ["RET=FULL"])
    wait_for(lambda: "NOTIFY leaves FAILURE out" in server.log_text(), 20, "the dropped bounce")
    assert server.messages("alice@example.org") == []
    send(server, {"refuse-full@plain.test": ["NOTIFY=FAILURE"]}, ["RET=FULL"])
    [report] = reports(server, 1)
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert status(report)[1]["Action"] == "failed"
    [returned] = [p for p in report.walk() if p.get_content_type() == "message/rfc822"]
    original = returned.get_payload()[0]
    assert original["Subject"] == "dsn test"
    assert "the secret body" in original.get_content()


def test_hdrs_returns_the_headers_only(env, server):
    send(server, {"refuse-hdrs@plain.test": []}, ["RET=HDRS"])
    [report] = reports(server, 1)
    assert [p for p in report.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert "dsn test" in report.as_string() and "secret body" not in report.as_string()


def test_smtplib_sendmail_options(server):
    """What a client library sends as is: smtplib.sendmail's mail_options and rcpt_options."""
    with connect(server.port) as client:
        refused = client.sendmail("alice@example.org", ["bob@example.org"], MESSAGE,
                                  mail_options=["RET=HDRS"], rcpt_options=["NOTIFY=SUCCESS"])
    assert refused == {}
    [report] = reports(server, 1)
    assert status(report)[1]["Action"] == "delivered"
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        with connect(server.port) as client:
            client.sendmail("alice@example.org", ["bob@example.org"], MESSAGE,
                            rcpt_options=["NOTIFY=ALWAYS"])
