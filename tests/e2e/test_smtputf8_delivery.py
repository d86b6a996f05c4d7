"""
SMTPUTF8 end to end (issue 16 item 1): smtplib with ``SMTPUTF8`` to a running mailsrv, a
delivery to jörg@example.org (a user ``mailsrv user add`` made) read back from its Maildir,
the refusal without the keyword, and relaying to loopback sinks: with the keyword to one that
offers SMTPUTF8, a bounce (5.6.7, 5.6.9) when the next hop does not.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support.harness import REPO, DNSServer, MailServer, SMTPSink, free_port, wait_for
from support.mail import send_mail

ZONE = {
    "records": {
        "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
        "client.test": [["A", "127.0.0.1"]],
        "utf8.test": [["MX", 10, "mx.utf8.test"]],
        "mx.utf8.test": [["A", "127.0.0.2"]],
        "ascii.test": [["MX", 10, "mx.ascii.test"]],
        "mx.ascii.test": [["A", "127.0.0.3"]],
    },
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("smtputf8")
    dns = DNSServer(work, ZONE)
    port = free_port(["127.0.0.2", "127.0.0.3"])
    sinks = {
        "utf8": SMTPSink(work / "utf8", "127.0.0.2", hostname="mx.utf8.test", port=port,
                         rules={"smtputf8": True}),
        "ascii": SMTPSink(work / "ascii", "127.0.0.3", hostname="mx.ascii.test", port=port),
    }
    yield {"dns": dns, "port": port, "sinks": sinks}
    for sink in sinks.values():
        sink.stop()
    dns.stop()


@pytest.fixture
def server(env, tmp_path):
    s = MailServer(tmp_path, env["dns"].port, overrides={
        "queue": {"retry_schedule": [1], "max_age": 3600}, "relay": {"port": env["port"]}})
    result = subprocess.run(
        [sys.executable, "-m", "mailsrv.tools.cli", "user", "--config", str(s.config_path), "add",
         "Jo\u0308rg@example.org", "--password-stdin"],  # NFD, upper case: stored as jörg
        input="jörgs Passwort\n".encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "jörg@example.org:{BLF-CRYPT}" in (tmp_path / "users").read_text(encoding="utf-8")
    s.start()
    yield s
    s.stop()


DOVEADM = shutil.which("doveadm")


def doveadm_lacks() -> str | None:
    if DOVEADM is None:
        return "doveadm is not installed (apt install dovecot-core)"
    if os.geteuid() != 0:
        return "Dovecot reads mail as a user of its own: the copy is handed over as root"
    try:
        pwd.getpwnam("mail")
    except KeyError:
        return "no 'mail' user on this machine"
    return None


UTF8_MESSAGE = ("From: Anna Müller <müller@client.test>\r\nTo: Jörg <jörg@example.org>\r\n"
                "Subject: Grüße aus Köln\r\n\r\nHallo Jörg,\r\nbis bald.\r\n").encode()


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)


def test_smtplib_with_smtputf8_delivers_to_joerg(server):
    refused = send_mail(server.port, "müller@client.test", ["Jörg@example.org"], UTF8_MESSAGE,
                        mail_options=["SMTPUTF8"])
    assert refused == {}
    box = server.root / "example.org" / "jörg"
    wait_for(lambda: list((box / "new").iterdir()) if (box / "new").exists() else None, 10,
             "the message in jörg's Maildir")
    [key] = server.maildir("jörg@example.org").keys()  # Python's Maildir reader, UTF-8 path
    message = parse(server.maildir("jörg@example.org").get_bytes(key))
    assert message["Subject"] == "Grüße aus Köln"
    assert message["Return-Path"] == "<müller@client.test>"
    assert message["Delivered-To"] == "jörg@example.org"
    assert "with UTF8SMTP id" in " ".join(message["Received"].split())
    assert "Hallo Jörg,\nbis bald.\n".encode() in server.maildir("jörg@example.org").get_bytes(key)
    assert "delivered id=" in server.log_text() and "to=<jörg@example.org>" in server.log_text()


def test_without_the_keyword_a_utf8_address_is_refused_553_5_6_7(server):
    client = server.connect()
    assert client.command("EHLO client.test")[0] == 250
    assert client.command("MAIL FROM:<anna@client.test>") == (250, "2.1.0 Ok")
    assert client.command("RCPT TO:<jörg@example.org>".encode()) == (
        553, "5.6.7 Non-ASCII address without the SMTPUTF8 parameter")
    assert client.command("RSET")[0] == 250
    assert client.command("MAIL FROM:<müller@client.test>".encode()) == (
        553, "5.6.7 Non-ASCII address without the SMTPUTF8 parameter")
    client.close()


def dsn_statuses(server: MailServer, address: str, count: int) -> list[str]:
    def found():
        reports = [m for m in (parse(server.maildir(address).get_bytes(k))
                               for k in server.maildir(address).keys())
                   if m.get_content_type() == "multipart/report"] if server.messages(address) else []
        return reports if len(reports) >= count else None

    reports = wait_for(found, 30, f"{count} bounce(s) to {address}")
    statuses = []
    for report in reports:
        [part] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
        statuses += [f"{r['Final-Recipient']} {r['Status']}" for r in part.get_payload()[1:]]
    return sorted(statuses)


def test_relayed_with_smtputf8_when_offered_bounced_when_not(env, server):
    utf8, ascii_ = env["sinks"]["utf8"], env["sinks"]["ascii"]
    before = len(utf8.messages()), len(ascii_.messages())
    message = ("From: alice@example.org\r\nTo: jörg@utf8.test\r\nSubject: Grüße\r\n\r\n"
               "Hallo\r\n").encode()
    assert send_mail(server.port, "alice@example.org",
                     ["jörg@utf8.test", "jörg@ascii.test", "bob@ascii.test"], message,
                     mail_options=["SMTPUTF8"]) == {}
    [got] = utf8.wait_for_messages(before[0] + 1)[before[0]:]
    assert got["rcpt_to"] == ["jörg@utf8.test"] and "SMTPUTF8" in got["mail_params"]
    assert "Subject: Grüße".encode().decode("latin-1") in got["data"]
    assert dsn_statuses(server, "alice@example.org", 1) == [
        "rfc822; bob@ascii.test 5.6.9", "utf-8; j\\x{F6}rg@ascii.test 5.6.7"]  # RFC 6533 §3
    assert len(ascii_.messages()) == before[1]
    # An ASCII message from a client that said SMTPUTF8 goes to the sink without it as it is.
    assert send_mail(server.port, "alice@example.org", ["carl@ascii.test"],
                     b"Subject: plain\r\n\r\nplain\r\n", mail_options=["SMTPUTF8"]) == {}
    [got] = ascii_.wait_for_messages(before[1] + 1)[before[1]:]
    assert got["rcpt_to"] == ["carl@ascii.test"] and "SMTPUTF8" not in got["mail_params"]


@pytest.mark.skipif(doveadm_lacks() is not None, reason=str(doveadm_lacks()))
def test_dovecot_reads_joergs_maildir(server):
    """Dovecot's own reader (doveadm fetch, no daemon: the mail location from the config,
    the user from USER) on a copy of the Maildir tree, handed to Debian's ``mail`` user:
    Dovecot never reads mail as root, and pytest's directories are root's alone."""
    assert send_mail(server.port, "müller@client.test", ["jörg@example.org"], UTF8_MESSAGE,
                     mail_options=["SMTPUTF8"]) == {}
    wait_for(lambda: server.messages("jörg@example.org"), 10, "the message in jörg's Maildir")
    mail = pwd.getpwnam("mail")
    work = Path(tempfile.mkdtemp(prefix="mailsrv-utf8-dovecot-"))
    try:
        work.chmod(0o755)
        shutil.copytree(server.root, work / "mailboxes")
        for sub in ("run", "state"):
            (work / sub).mkdir()
        conf = work / "dovecot.conf"
        conf.write_text(
            f"mail_location = maildir:{work}/mailboxes/%d/%n\nbase_dir = {work}/run\n"
            f"state_dir = {work}/state\nlog_path = /dev/stderr\nssl = no\n"
            "mail_uid = mail\nmail_gid = mail\nfirst_valid_uid = 1\n"
            "passdb {\n  driver = static\n}\nuserdb {\n  driver = static\n}\n")
        for path in [work, *work.rglob("*")]:
            os.chown(path, mail.pw_uid, mail.pw_gid)
        home = work / "mailboxes" / "example.org" / "jörg"
        result = subprocess.run(
            ["setpriv", f"--reuid={mail.pw_uid}", f"--regid={mail.pw_gid}", "--clear-groups",
             "env", "USER=jörg@example.org", f"HOME={home}", DOVEADM, "-c", str(conf),
             "fetch", "hdr.subject hdr.from hdr.delivered-to body", "mailbox", "INBOX", "all"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        out = result.stdout.decode("utf-8", "replace")
        assert result.returncode == 0, out
        assert "hdr.subject: Grüße aus Köln" in out, out
        assert "hdr.from: Anna Müller <müller@client.test>" in out
        assert "hdr.delivered-to: jörg@example.org" in out
        assert "Hallo Jörg," in out
    finally:
        shutil.rmtree(work, ignore_errors=True)
