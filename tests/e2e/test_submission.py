"""
TLS, submission and AUTH end to end: the real server, real clients (smtplib, raw sockets over
``ssl``, and Debian's msmtp, swaks, openssl and doveadm where installed), a DNS server and a
remote MX on loopback.

The server trusts only 127.0.0.1 for relaying; clients that must look untrusted connect from
127.0.0.9, so only AUTH can give them the right to send to other domains.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import os
import re
import select
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support.certs import make_ca
from support.harness import (
    REPO,
    DNSServer,
    MailServer,
    RawClient,
    SMTPSink,
    free_port,
    wait_for,
)
from support.mail import connect, connect_tls
from support.sasl import b64, plain

sys.path.insert(0, str(REPO))
from mailsrv.accounts.auth import hash_password  # noqa: E402  (the checkout's code, like the server)

USERS_PASSWORDS = {"alice@example.org": "alice pw 1", "bob@example.org": "bob:pw 2",
                   "dora@example.org": "pässwörd"}
ALIASES = [
    "postmaster: alice@example.org",
    "sales@example.org: alice@example.org, bob@example.org",
    "bob-only@example.org: bob@example.org",
]
UNTRUSTED = "127.0.0.9"
ZONE = {
    "records": {
        "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
        "client.test": [["A", "127.0.0.1"]],
        "remote.test": [["MX", 10, "mx.remote.test"]],
        "mx.remote.test": [["A", "127.0.0.2"]],
    }
}


def users_lines(cost: int = 4) -> list[str]:
    lines = [f"{a}:{hash_password(p, cost=cost)}" for a, p in USERS_PASSWORDS.items()]
    return lines + ["carol@example.org"]  # a mailbox without a password: no login


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("submission")
    dns = DNSServer(work, ZONE)
    sink_port = free_port(["127.0.0.2"])
    sink = SMTPSink(work / "sink", "127.0.0.2", hostname="mx.remote.test", port=sink_port)
    ca = make_ca(work)
    cert, key = ca.issue(["mx.example.org", "localhost"], work, ips=("127.0.0.1",))
    yield {"dns": dns, "sink": sink, "sink_port": sink_port, "ca": ca, "cert": cert,
           "key": key, "work": work}
    sink.stop()
    dns.stop()


def make_server(env, workdir: Path, auth: dict | None = None, **tables) -> MailServer:
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = {
        "smtp": {"listen": ["tcp:0:interface=127.0.0.1"], "auth": True},
        "tls": {"cert": str(env["cert"]), "key": str(env["key"])},
        "submission": {"listen": ["tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"]},
        "auth": {"max_failures": 1000, "failure_delay": 0.05, **(auth or {})},
        "relay": {"trusted_networks": ["127.0.0.1/32"], "port": env["sink_port"],
                  "dns_servers": [f"127.0.0.1:{env['dns'].port}"]},
    }
    for table, values in tables.items():
        overrides.setdefault(table, {}).update(values)
    return MailServer(workdir, env["dns"].port, users=users_lines(), aliases=ALIASES,
                      overrides=overrides)


@pytest.fixture(scope="module")
def server(env):
    s = make_server(env, env["work"] / "server").start()
    yield s
    s.stop()


def client_context(env) -> ssl.SSLContext:
    return env["ca"].client_context()


def submit_starttls(env, server, *, user="alice@example.org", password=None) -> smtplib.SMTP:
    client = connect(server.port_of("submission"), timeout=20)
    client.starttls(context=client_context(env))
    client.ehlo()
    client.login(user, password or USERS_PASSWORDS[user])
    return client


def raw_client(port: int, source: str = "127.0.0.1", implicit: bool = False,
                 context: ssl.SSLContext | None = None) -> RawClient:
    """A raw client from ``source``; over implicit TLS when ``implicit``."""
    return RawClient(port, timeout=20, source=source, context=context if implicit else None)


def received_of(server: MailServer, address: str, marker: str):
    for message in server.messages(address):
        if marker in message.get_payload():
            return message
    return None


# --------------------------------------------------------------------------- TLS


def test_ehlo_offers_starttls_then_auth_only_inside_tls(env, server):
    for kind in ("smtp", "submission"):
        client = raw_client(server.port_of(kind))
        code, text = client.command("EHLO client.test")
        assert code == 250 and "STARTTLS" in text and "AUTH" not in text
        assert client.command("STARTTLS") == (220, "2.0.0 Ready to start TLS")
        client.starttls(client_context(env))
        code, text = client.command("EHLO client.test")
        assert "STARTTLS" not in text
        assert "AUTH PLAIN LOGIN" in text
        client.close()


def test_commands_pipelined_after_starttls_are_discarded(env, server):
    client = raw_client(server.port_of("smtp"))
    client.command("EHLO client.test")
    # In one packet: STARTTLS and a plain-text command that an attacker in the middle added.
    client.send(b"STARTTLS\r\nMAIL FROM:<mallory@example.net>\r\n")
    assert client.reply() == (220, "2.0.0 Ready to start TLS")
    client.starttls(client_context(env))
    # The first reply inside TLS answers our NOOP: the injected MAIL was never executed.
    assert client.command("NOOP") == (250, "2.0.0 Ok")
    # The session restarted: EHLO is required again, and there is no transaction.
    assert client.command("MAIL FROM:<x@client.test>")[0] == 503
    assert client.command("EHLO client.test")[0] == 250
    assert client.command("RCPT TO:<alice@example.org>")[:1] == (503,)
    assert client.command("STARTTLS") == (503, "5.5.1 Error: TLS already active")
    client.close()


def test_starttls_needs_ehlo_and_takes_no_argument(server):
    client = raw_client(server.port_of("smtp"))
    assert client.command("STARTTLS")[0] == 503
    client.command("EHLO client.test")
    assert client.command("STARTTLS now") == (501, "5.5.4 Syntax: STARTTLS takes no arguments")
    client.close()


def test_received_header_records_tls_and_auth(env, server):
    client = submit_starttls(env, server)
    client.sendmail("alice@example.org", ["bob@example.org"],
                    "From: alice@example.org\r\nSubject: tls\r\n\r\nmarker-received-tls\r\n")
    client.quit()
    message = wait_for(lambda: received_of(server, "bob@example.org", "marker-received-tls"),
                       10, "the message")
    received = " ".join(message["Received"].split())
    assert re.search(r"with ESMTPSA \(TLSv1\.[23] [A-Z0-9_-]+\) id ", received), received
    assert "Date" in message and "Message-ID" in message  # RFC 6409 §8: added when missing
    email.utils.parsedate_to_datetime(message["Date"])
    log = server.log_text()
    assert re.search(r"accepted id=\S+ .*from=<alice@example.org> .*tls=\"TLSv1\.[23] .*"
                     r"user=alice@example.org", log)


def test_port_25_with_starttls_without_auth_says_esmtps(env, server):
    client = connect(server.port_of("smtp"), timeout=20)
    client.starttls(context=client_context(env))
    client.sendmail("x@client.test", ["bob@example.org"],
                    "Subject: s\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\nmarker-esmtps\r\n")
    client.quit()
    message = wait_for(lambda: received_of(server, "bob@example.org", "marker-esmtps"), 10,
                       "the message")
    assert "with ESMTPS (TLSv1." in " ".join(message["Received"].split())
    assert message["Date"] == "Tue, 01 Dec 2026 10:00:00 +0000"  # the client's own stays


def test_implicit_tls_presents_the_configured_certificate(env, server):
    context = client_context(env)
    with socket.create_connection(("127.0.0.1", server.port_of("submission", tls=True))) as raw:
        with context.wrap_socket(raw, server_hostname="mx.example.org") as tls:
            der = tls.getpeercert(binary_form=True)
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert tls.recv(100).startswith(b"220 mx.example.org ESMTP")
    configured = ssl.PEM_cert_to_DER_cert(Path(env["cert"]).read_text().split(
        "-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    assert hashlib.sha256(der).digest() == hashlib.sha256(configured).digest()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused_python(env, server, version):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.minimum_version = version
        context.maximum_version = version
        context.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip(f"this OpenSSL cannot even offer {version.name}")
    with socket.create_connection(("127.0.0.1", server.port_of("submission", tls=True))) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw).recv(10)


OPENSSL = shutil.which("openssl")


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
@pytest.mark.parametrize("flag, works", [("-tls1", False), ("-tls1_1", False),
                                         ("-tls1_2", True), ("-tls1_3", True)])
def test_openssl_s_client_versions(env, server, flag, works):
    result = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port_of('smtp')}",
         "-starttls", "smtp", "-name", "client.test", "-ign_eof", flag, "-cipher", "DEFAULT:@SECLEVEL=0",
         "-CAfile", str(env["ca"].cert_path), "-verify_return_error",
         "-verify_hostname", "mx.example.org"],
        input=b"QUIT\r\n", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30,
    )
    output = result.stdout.decode(errors="replace")
    if works:
        assert result.returncode == 0, output
        assert "Verify return code: 0 (ok)" in output
        assert "221 2.0.0 Bye" in output
    else:
        assert result.returncode != 0, output
        assert "221 2.0.0 Bye" not in output


# --------------------------------------------------------------------------- AUTH


def test_auth_plain_and_login_with_smtplib(env, server):
    for method in ("PLAIN", "LOGIN"):
        client = connect(server.port_of("submission"), timeout=20)
        client.starttls(context=client_context(env))
        client.ehlo()
        client.user, client.password = "bob@example.org", USERS_PASSWORDS["bob@example.org"]
        code, text = client.auth(method, getattr(client, f"auth_{method.lower()}"))
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        client.quit()


def test_auth_with_implicit_tls_smtp_ssl(env, server):
    client = connect_tls(server.port_of("submission", tls=True), client_context(env), timeout=20)
    client.login("alice@example.org", USERS_PASSWORDS["alice@example.org"])
    client.sendmail("alice+news@example.org", ["bob@example.org"],
                    "From: Alice <alice+news@example.org>\r\nSubject: x\r\n\r\nmarker-465\r\n")
    client.quit()
    wait_for(lambda: received_of(server, "bob@example.org", "marker-465"), 10, "the message")


def test_auth_sequencing_errors(env, server):
    client = raw_client(server.port_of("submission"))
    assert client.command("AUTH PLAIN " + plain("alice@example.org", "x"))[0] == 503  # no EHLO
    client.command("EHLO client.test")
    assert client.command("AUTH PLAIN " + plain("alice@example.org", "x")) == (
        538, "5.7.11 Error: encryption required for authentication (STARTTLS)")
    assert client.command("MAIL FROM:<alice@example.org>") == (
        530, "5.7.0 Error: authentication required")
    client.command("STARTTLS")
    client.starttls(client_context(env))
    assert client.command("AUTH PLAIN")[0] == 503  # EHLO again first
    client.command("EHLO client.test")
    assert client.command("AUTH CRAM-MD5") == (504, "5.5.4 Error: unrecognized authentication type")
    assert client.command("AUTH") == (501, "5.5.4 Syntax: AUTH mechanism [initial-response]")
    assert client.command("AUTH PLAIN not-base64!") == (501, "5.5.2 Error: cannot decode response")
    assert client.command("AUTH LOGIN") == (334, "VXNlcm5hbWU6")
    assert client.command("*") == (501, "5.7.0 Error: authentication cancelled")
    # PLAIN without an initial response: an empty challenge, then the response.
    assert client.command("AUTH PLAIN") == (334, "")
    password = USERS_PASSWORDS["alice@example.org"]
    assert client.command(plain("alice@example.org", password)) == (
        235, "2.7.0 Authentication successful")
    assert client.command("AUTH PLAIN " + plain("alice@example.org", password)) == (
        503, "5.5.1 Error: already authenticated")
    client.close()


def test_auth_refused_inside_a_transaction(env, server):
    client = raw_client(server.port_of("smtp"))
    client.command("EHLO client.test")
    client.command("STARTTLS")
    client.starttls(client_context(env))
    client.command("EHLO client.test")
    assert client.command("MAIL FROM:<x@client.test>")[0] == 250
    assert client.command("AUTH PLAIN " + plain("alice@example.org", "x")) == (
        503, "5.5.1 Error: MAIL transaction in progress")
    client.close()


def test_auth_login_and_wrong_passwords(env, server):
    client = raw_client(server.port_of("submission", tls=True), implicit=True,
                          context=client_context(env))
    client.command("EHLO client.test")
    for user, password in (("alice@example.org", "wrong"), ("nobody@example.org", "x"),
                           ("carol@example.org", "")):
        assert client.command("AUTH LOGIN " + b64(user)) == (334, "UGFzc3dvcmQ6")
        code, text = client.command(b64(password) if password else "=")
        assert (code, text[:5]) in ((535, "5.7.8"), (501, "5.5.2")), (user, code, text)
    client.close()
    log = server.log_text()
    assert "auth failed client=unknown[127.0.0.1] user=alice@example.org mechanism=LOGIN" in log
    assert "user=unknown mechanism=LOGIN" in log  # a name that is no account is not logged
    assert "nobody@example.org" not in log
    assert "wrong" not in log and b64("wrong") not in log  # credentials never in the log


def test_utf8_password(env, server):
    # smtplib cannot send one; the SASL PLAIN message is UTF-8 (RFC 4616).
    client = raw_client(server.port_of("submission", tls=True), implicit=True,
                          context=client_context(env))
    client.command("EHLO client.test")
    assert client.command("AUTH PLAIN " + plain("dora@example.org", "pässwörd"))[0] == 235
    client.close()


def test_plain_authzid_for_another_user_is_refused(env, server):
    client = raw_client(server.port_of("submission", tls=True), implicit=True,
                          context=client_context(env))
    client.command("EHLO client.test")
    password = USERS_PASSWORDS["alice@example.org"]
    code, _ = client.command(
        "AUTH PLAIN " + plain("alice@example.org", password, authzid="bob@example.org"))
    assert code == 501
    client.close()


def test_sasl_line_limit_is_12288_octets(env, server):
    client = raw_client(server.port_of("submission", tls=True), implicit=True,
                          context=client_context(env))
    client.command("EHLO client.test")
    filler = "x" * 9000
    ok_line = "AUTH PLAIN " + plain("alice@example.org", filler)
    ok_line += "=" * 0
    assert len(ok_line) + 2 <= 12288
    assert client.command(ok_line)[0] == 535  # long, but within the limit: checked
    client.command("AUTH LOGIN")
    long_response = "A" * 12287  # + CRLF = 12289 octets: one past the limit
    assert client.command(long_response) == (500, "5.5.2 Error: command line too long")
    assert client.command("NOOP") == (250, "2.0.0 Ok")  # the exchange was abandoned
    client.close()


def test_an_over_long_sasl_response_in_several_reads_ends_the_exchange(env, server):
    """A 200 KB response line arriving in pieces is answered as one in one read is (500),
    and the exchange is over: the next command is a command, not the SASL response."""
    client = raw_client(server.port_of("submission", tls=True), implicit=True,
                        context=client_context(env))
    client.command("EHLO client.test")
    for mechanism, first_challenge in (("PLAIN", ""), ("LOGIN", "VXNlcm5hbWU6")):
        assert client.command("AUTH " + mechanism) == (334, first_challenge)
        piece = b"A" * 20000
        for _ in range(10):  # 200,000 octets, none of them a line end, over ten reads
            client.send(piece)
            time.sleep(0.02)
        client.send(b"\r\n")
        assert client.reply() == (500, "5.5.2 Error: command line too long")
        assert client.command("NOOP") == (250, "2.0.0 Ok")
        assert client.command("RSET") == (250, "2.0.0 Ok")
    # An AUTH command (with its initial response) that is over the limit opens no exchange.
    client.send(b"AUTH PLAIN " + b"A" * 30000)
    time.sleep(0.05)
    client.send(b"A" * 30000 + b"\r\n")
    assert client.reply() == (500, "5.5.2 Error: command line too long")
    assert client.command("NOOP") == (250, "2.0.0 Ok")
    password = USERS_PASSWORDS["alice@example.org"]
    assert client.command("AUTH PLAIN " + plain("alice@example.org", password))[0] == 235
    client.close()


# --------------------------------------------------------------------------- relay and senders


def test_relay_needs_auth_from_an_untrusted_address(env, server):
    client = connect(server.port_of("smtp"), timeout=20, source=UNTRUSTED)
    client.starttls(context=client_context(env))
    client.ehlo()
    client.mail("alice@example.org")
    assert client.rcpt("friend@remote.test") == (554, b"5.7.1 Relay access denied")
    client.rset()
    client.login("alice@example.org", USERS_PASSWORDS["alice@example.org"])
    client.sendmail("alice@example.org", ["friend@remote.test"],
                    "From: alice@example.org\r\nSubject: out\r\n\r\nmarker-relayed\r\n")
    client.quit()
    messages = env["sink"].wait_for_messages(1)
    assert any("marker-relayed" in m.get("data", "") for m in messages), messages


def test_authenticated_sender_must_be_owned(env, server):
    client = submit_starttls(env, server, user="bob@example.org")
    for sender in ("bob@example.org", "BOB+tag@Example.org", "sales@example.org",
                   "bob-only@example.org"):
        assert client.mail(sender)[0] == 250, sender
        client.rset()
    for sender in ("alice@example.org", "postmaster@example.org", "bob@remote.test",
                   "nobody@example.org"):
        code, text = client.mail(sender)
        assert (code, text[:5]) == (553, b"5.7.1"), sender
        assert b"not owned by user bob@example.org" in text
    assert client.docmd("MAIL FROM:<>")[0] == 553
    client.quit()
    assert "refused sender client=unknown[127.0.0.1] user=bob@example.org" in server.log_text()


def test_from_header_must_be_owned(env, server):
    client = submit_starttls(env, server, user="bob@example.org")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("bob@example.org", ["alice@example.org"],
                        "From: The Boss <alice@example.org>\r\nSubject: x\r\n\r\nforged\r\n")
    assert refused.value.smtp_code == 553
    assert b"5.7.1" in refused.value.smtp_error and b"alice@example.org" in refused.value.smtp_error
    client.rset()
    client.sendmail("bob@example.org", ["alice@example.org"],
                    "From: Sales <sales@example.org>\r\nSubject: x\r\n\r\nmarker-sales\r\n")
    client.quit()
    wait_for(lambda: received_of(server, "alice@example.org", "marker-sales"), 10, "the message")
    assert not any("forged" in m.get_payload() for m in server.messages("alice@example.org"))


PADDING = b"".join(b"X-Pad-%05d: %s\r\n" % (i, b"p" * 60) for i in range(900))  # 66 KB


@pytest.mark.parametrize(("head", "code", "status"), [
    (b"Subject: x\r\nFrom : alice@example.org", 553, b"5.7.1"),
    (b"Subject: x\r\nFrom\t: alice@example.org", 553, b"5.7.1"),
    (b"Subject: x\r\nX-Junk\r\nFrom: alice@example.org", 554, b"5.6.0"),
    (b"Subject: x\r\nX-\xe9t\xe9: y\r\nFrom: alice@example.org", 554, b"5.6.0"),
    (b"Subject: x\r\nX-\x00: y\r\nFrom: alice@example.org", 554, b"5.6.0"),
    (b"Subject: x\r\n: x\r\nFrom: alice@example.org", 554, b"5.6.0"),
    (b"From: bob@example.org\r\nnot a header\r\nFrom: alice@example.org", 554, b"5.6.0"),
    (b"Subject: x\r\n" + PADDING + b"From: alice@example.org", 553, b"5.7.1"),
    (b"From: bob@example.org\r\nSender: alice@example.org", 553, b"5.7.1"),
    (b"From: bob@example.org\r\nResent-From: alice@example.org", 553, b"5.7.1"),
    (b"From: bob@example.org\r\nFrom: alice@example.org", 553, b"5.7.1"),
    (b"From: bob@example.org\r\nX-P: " + b"p" * 900 + (b"\r\n p" + b"p" * 900) * 1200,
     552, b"5.3.4"),
], ids=["sp-colon", "tab-colon", "no-colon", "8bit-name", "nul-name", "empty-name",
        "non-header-line", "after-66kb", "sender", "resent-from", "second-from", "1mib"])
def test_forged_header_sections_are_refused(env, server, head, code, status):
    client = submit_starttls(env, server, user="bob@example.org")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("bob@example.org", ["alice@example.org"],
                        head + b"\r\n\r\nmarker-forged\r\n")
    assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (code, status)
    assert re.search(rb"header (section|address)", refused.value.smtp_error)
    client.rset()
    # The same connection can still send honest mail, and only that arrives.
    marker = "marker-honest-" + hashlib.sha256(head).hexdigest()[:12]
    client.sendmail("bob@example.org", ["alice@example.org"],
                    b"From: Bob <bob@example.org>\r\nSubject: x\r\n\r\n%s\r\n" % marker.encode())
    client.quit()
    wait_for(lambda: received_of(server, "alice@example.org", marker), 10, "message")
    assert not any("marker-forged" in m.get_payload() for m in server.messages("alice@example.org"))
    assert f'reason="{code} {status.decode()} ' in server.log_text()


def test_from_header_check_can_be_turned_off(env, tmp_path):
    s = make_server(env, tmp_path / "s", submission={"check_from_header": False}).start()
    try:
        client = submit_starttls(env, s, user="bob@example.org")
        client.sendmail("bob@example.org", ["alice@example.org"],
                        "From: list@example.net\r\nSubject: x\r\n\r\nmarker-nocheck\r\n")
        client.quit()
        wait_for(lambda: received_of(s, "alice@example.org", "marker-nocheck"), 10, "message")
    finally:
        s.stop()


# --------------------------------------------------------------------------- brute force


def test_lockout_after_failures_and_its_expiry(env, tmp_path):
    s = make_server(env, tmp_path / "s", auth={"max_failures": 3, "window": 60, "lockout": 3,
                                               "failure_delay": 0.2}).start()
    try:
        client = raw_client(s.port_of("submission", tls=True), source=UNTRUSTED,
                              implicit=True, context=client_context(env))
        client.command("EHLO client.test")
        bad = "AUTH PLAIN " + plain("alice@example.org", "wrong")
        delays = []
        for _ in range(3):
            start = time.monotonic()
            assert client.command(bad) == (535, "5.7.8 Error: authentication failed")
            delays.append(time.monotonic() - start)
        # The delay grows (0.2, 0.4, 0.8 s); only lower bounds are certain on a busy machine.
        assert delays[0] >= 0.2 and delays[1] >= 0.4 and delays[2] >= 0.8, delays
        good = "AUTH PLAIN " + plain("alice@example.org", USERS_PASSWORDS["alice@example.org"])
        assert client.command(good) == (
            454, "4.7.0 Error: too many failed authentication attempts; try again later")
        # Another address is not affected.
        other = raw_client(s.port_of("submission", tls=True), implicit=True,
                             context=client_context(env))
        other.command("EHLO client.test")
        assert other.command(good)[0] == 235
        other.close()
        time.sleep(3.2)
        assert client.command(good) == (235, "2.7.0 Authentication successful")
        client.close()
        log = s.log_text()
        assert re.search(r"auth failed client=unknown\[127\.0\.0\.9\] user=alice@example.org "
                         r"mechanism=PLAIN failures=3", log)
        assert "auth lockout client=unknown[127.0.0.9] seconds=3" in log
    finally:
        s.stop()


def test_parallel_connections_get_no_more_than_max_failures_checks(env, tmp_path):
    """Ten connections from one address guessing at once: checks under way count as
    failures, so between them they get max_failures password checks, then 454."""
    s = make_server(env, tmp_path / "s", auth={"max_failures": 5, "window": 600,
                                               "lockout": 600, "failure_delay": 0.05},
                    smtp={"max_connections_per_ip": 20}).start()
    try:
        clients = [raw_client(s.port_of("submission", tls=True), source=UNTRUSTED,
                              implicit=True, context=client_context(env)) for _ in range(10)]
        for client in clients:
            client.command("EHLO client.test")
        # An unknown user: its check is a full-cost bcrypt (a quarter of a second), so all
        # ten first guesses arrive while the first checks are still running.
        bad = "AUTH PLAIN " + plain("nobody@example.org", "wrong")
        codes: list[list[int]] = [[] for _ in clients]
        go = threading.Barrier(len(clients), timeout=30)

        def guess(client: RawClient, mine: list[int]) -> None:
            go.wait()
            for _ in range(5):
                mine.append(client.command(bad)[0])
                if mine[-1] == 454:
                    break

        threads = [threading.Thread(target=guess, args=(c, mine), daemon=True)
                   for c, mine in zip(clients, codes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        answers = [code for mine in codes for code in mine]
        assert set(answers) == {535, 454}, codes
        assert answers.count(535) <= 5, codes
        assert all(mine[-1] == 454 for mine in codes), codes  # every connection locked out
        checks = s.log_text().count("auth failed client=unknown[127.0.0.9]")
        assert checks == answers.count(535), s.log_text()
        for client in clients:
            client.close()
    finally:
        s.stop()


# --------------------------------------------------------------------------- users and reload


def run_cli(*args, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "mailsrv.tools.cli", *args], input=stdin.encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=60)


def test_user_add_is_picked_up_by_the_running_server(env, tmp_path):
    s = make_server(env, tmp_path / "s").start()
    try:
        config = str(s.config_path)
        result = run_cli("user", "--config", config, "add", "Dave@Example.org",
                         "--password-stdin", stdin="dave's pw\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == "ok: added dave@example.org\n"

        def can_login():
            try:
                submit_starttls(env, s, user="dave@example.org", password="dave's pw").quit()
                return True
            except smtplib.SMTPAuthenticationError:
                return False

        wait_for(can_login, 10, "the new user to log in")
        result = run_cli("user", "--config", config, "passwd", "dave@example.org",
                         "--password-stdin", stdin="new pw\n")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: not can_login(), 10, "the old password to stop working")
        submit_starttls(env, s, user="dave@example.org", password="new pw").quit()
        listing = run_cli("user", "--config", config, "list").stdout.decode()
        assert "dave@example.org\tpassword\n" in listing
        assert "carol@example.org\tno password (no login)\n" in listing
        # Removing alice would leave the postmaster alias pointing nowhere: refused.
        result = run_cli("user", "--config", config, "del", "alice@example.org")
        assert result.returncode == 1 and b"would not be valid" in result.stderr
        assert run_cli("user", "--config", config, "del", "dave@example.org").returncode == 0
        assert "reload (changed on disk)" in s.log_text()
    finally:
        s.stop()


def test_a_broken_users_file_is_refused_and_the_old_one_kept(env, tmp_path):
    s = make_server(env, tmp_path / "s").start()
    try:
        users = s.workdir / "users"
        text = users.read_text()
        tmp = users.with_suffix(".new")
        tmp.write_text(text + "eve@example.org:{PLAIN}secret\n")
        tmp.chmod(0o640)
        os.replace(tmp, users)
        wait_for(lambda: "reload (changed on disk) refused" in s.log_text(), 10, "the refusal")
        assert "expected the {BLF-CRYPT} scheme" in s.log_text()
        submit_starttls(env, s).quit()  # the old file is still in force
    finally:
        s.stop()


def test_hashes_open_to_others_are_refused_until_chmod(env, tmp_path):
    """A users file with hashes that others can read is not loaded (the old one stays in
    force); the chmod that fixes it is picked up without another change."""
    s = make_server(env, tmp_path / "s").start()
    try:
        users = s.workdir / "users"
        tmp = users.with_suffix(".new")
        tmp.write_text(users.read_text() + f"eve@example.org:{hash_password('eve pw', cost=4)}\n")
        tmp.chmod(0o644)
        os.replace(tmp, users)
        wait_for(lambda: "reload (changed on disk) refused" in s.log_text(), 10, "the refusal")
        assert f"{users}: mode 0644: expected a file with password hashes that others " \
               "cannot read: chmod 0640" in s.log_text()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            submit_starttls(env, s, user="eve@example.org", password="eve pw")
        submit_starttls(env, s).quit()  # the old file is still in force
        users.chmod(0o640)

        def eve_can_login() -> bool:
            try:
                submit_starttls(env, s, user="eve@example.org", password="eve pw").quit()
                return True
            except smtplib.SMTPAuthenticationError:
                return False

        wait_for(eve_can_login, 10, "the file to be reloaded after the chmod")
    finally:
        s.stop()


def test_user_command_writes_the_file_for_the_server_only(env, tmp_path):
    """mailsrv user turns a 0644 users file into 0640, with the server's group (that of the
    queue directory the server made) so that the server can still read it."""
    s = make_server(env, tmp_path / "s")  # its files only
    users = s.workdir / "users"
    users.chmod(0o644)
    s.queue.mkdir()
    server_gid = 4242 if os.geteuid() == 0 else os.getgid()
    os.chown(s.queue, -1, server_gid)
    result = run_cli("user", "--config", str(s.config_path), "passwd", "alice@example.org",
                     "--password-stdin", stdin="new pw\n")
    assert result.returncode == 0, result.stderr
    st = users.stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o640, server_gid)
    check = run_cli("check-config", "--config", str(s.config_path))
    assert check.returncode == 0, check.stderr


def test_sighup_reloads_the_certificate_without_dropping_connections(env, tmp_path):
    work = tmp_path / "certs"
    work.mkdir()
    cert = work / "server.crt"
    key = work / "server.key"
    old_cert, old_key = env["ca"].issue(["mx.example.org"], work, ips=("127.0.0.1",), stem="old")
    shutil.copy(old_cert, cert)
    shutil.copy(old_key, key)
    s = make_server(env, tmp_path / "s", tls={"cert": str(cert), "key": str(key)}).start()
    try:
        def fingerprint() -> bytes:
            with socket.create_connection(("127.0.0.1", s.port_of("submission", tls=True))) as r:
                with client_context(env).wrap_socket(r, server_hostname="mx.example.org") as t:
                    return hashlib.sha256(t.getpeercert(binary_form=True)).digest()

        before = fingerprint()
        staying = submit_starttls(env, s)  # connected and authenticated over the old cert
        new_cert, new_key = env["ca"].issue(["mx.example.org"], work, ips=("127.0.0.1",),
                                            stem="new")
        # Replace the files as certbot does (new files renamed over the old names).
        shutil.copy(new_key, work / "key.tmp")
        os.replace(work / "key.tmp", key)
        shutil.copy(new_cert, work / "cert.tmp")
        os.replace(work / "cert.tmp", cert)
        s.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: TLS certificate loaded" in s.log_text(), 10, "the reload")
        after = fingerprint()
        assert after != before
        assert after == hashlib.sha256(ssl.PEM_cert_to_DER_cert(new_cert.read_text())).digest()
        # The connection made before the reload goes on working.
        staying.sendmail("alice@example.org", ["bob@example.org"],
                         "From: alice@example.org\r\nSubject: x\r\n\r\nmarker-after-hup\r\n")
        staying.quit()
        wait_for(lambda: received_of(s, "bob@example.org", "marker-after-hup"), 10, "message")
        # A broken certificate on the next SIGHUP is refused; the new one stays in service.
        cert.write_text("not a certificate\n")
        s.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload: TLS certificate not changed" in s.log_text(), 10, "refusal")
        assert fingerprint() == after
        assert s.process.poll() is None
    finally:
        s.stop()


# --------------------------------------------------------------------------- start-up errors


@pytest.mark.parametrize("tables, key", [
    ({"submission": {"listen": ["tcp:0:interface=127.0.0.1"]}, "tls": None}, "submission.listen"),
    ({"smtp": {"auth": True}, "submission": {"listen": []}, "tls": None}, "smtp.auth"),
    ({"smtp": {"listen": ["ssl:0:interface=127.0.0.1"]}, "tls": None}, "smtp.listen[0]"),
    ({"tls": {"cert": "missing.pem", "key": "missing.key"}}, "tls.cert"),
])
def test_tls_and_auth_configuration_errors_stop_the_start(env, tmp_path, tables, key):
    s = make_server(env, tmp_path / "s")
    for table, values in tables.items():
        if values is None:
            s.config.pop(table, None)
        else:
            s.config.setdefault(table, {}).update(values)
    s.write_config()
    result = subprocess.run(s.command(), cwd=s.workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    output = result.stdout.decode()
    assert result.returncode == 2, output
    assert f"mailsrv: configuration error: {s.config_path}: {key}: expected" in output


def test_unverifiable_password_scheme_stops_the_start(env, tmp_path):
    s = make_server(env, tmp_path / "s")
    (s.workdir / "users").write_text("alice@example.org:{SHA512-CRYPT}$6$x$y\n")
    result = subprocess.run(s.command(), cwd=s.workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    output = result.stdout.decode()
    assert result.returncode == 2, output
    assert "line 1 (alice@example.org): expected the {BLF-CRYPT} scheme" in output


def test_a_client_that_never_starts_tls_on_465_is_cut_off(env, tmp_path):
    """Idle timeout on an implicit-TLS port before any handshake: the socket and its place
    under the per-address limit are freed (a TLS close alone would wait for the handshake)."""
    s = make_server(env, tmp_path / "s", smtp={"idle_timeout": 1, "max_connections_per_ip": 1})
    s.start()
    try:
        port = s.port_of("submission", tls=True)
        silent = socket.create_connection(("127.0.0.1", port), timeout=20)
        start = time.monotonic()
        silent.settimeout(20)
        try:
            while silent.recv(65536):
                pass  # until the server closes the connection
        except ConnectionResetError:
            pass  # or cuts it
        assert time.monotonic() - start < 15
        silent.close()
        # The limit of one connection from this address has room again.
        client = raw_client(port, implicit=True, context=client_context(env))
        assert client.greeting[0] == 220
        client.close()
    finally:
        s.stop()


def test_user_command_errors(env, tmp_path):
    s = make_server(env, tmp_path / "s")  # its files only
    config = str(s.config_path)
    before = (s.workdir / "users").read_text()
    cases = [
        (("add", "zed@elsewhere.test", "--password-stdin"), "pw\n", "not an address in a local"),
        (("add", "alice@example.org", "--password-stdin"), "pw\n", "exists already"),
        (("passwd", "nobody@example.org", "--password-stdin"), "pw\n", "no user"),
        (("add", "zed@example.org", "--password-stdin"), "\n", "empty password"),
        (("add", "zed@example.org", "--password-stdin"), "x" * 73 + "\n", "longer than 72"),
        (("del", "nobody@example.org"), "", "no user"),
    ]
    for args, stdin, why in cases:
        result = run_cli("user", "--config", config, *args, stdin=stdin)
        assert result.returncode == 1, (args, result.stderr)
        assert why in result.stderr.decode(), (args, result.stderr)
    assert (s.workdir / "users").read_text() == before  # nothing changed
    s.config.get("mailboxes", {}).pop("users")
    s.write_config()
    result = run_cli("user", "--config", config, "list")
    assert result.returncode == 2
    assert b"mailboxes.users: expected a users file" in result.stderr


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_a_fullchain_file_sends_the_chain(env, tmp_path):
    """cert may be Let's Encrypt's fullchain.pem: the leaf, then the intermediates."""
    leaf = Path(env["cert"]).read_text()
    fullchain = tmp_path / "fullchain.pem"
    fullchain.write_text(leaf + Path(env["ca"].cert_path).read_text())
    s = make_server(env, tmp_path / "s", tls={"cert": str(fullchain)}).start()
    try:
        result = subprocess.run(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{s.port_of('submission', tls=True)}",
             "-showcerts", "-CAfile", str(env["ca"].cert_path), "-verify_return_error",
             "-ign_eof"],
            input=b"QUIT\r\n", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30,
        )
        output = result.stdout.decode(errors="replace")
        assert result.returncode == 0, output
        assert output.count("-----BEGIN CERTIFICATE-----") == 2, output
        assert "221 2.0.0 Bye" in output
    finally:
        s.stop()


def test_user_add_prompts_twice_on_the_terminal(env, tmp_path):
    """Without --password-stdin the password is asked for on the terminal (not echoed),
    twice; a mismatch changes nothing."""
    import pty

    s = make_server(env, tmp_path / "s")  # its files only

    def run_on_a_terminal(address: str, answers: list[str]) -> tuple[int, str]:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the CLI on the new terminal
            os.environ["PYTHONPATH"] = str(REPO)
            os.execv(sys.executable, [sys.executable, "-m", "mailsrv.tools.cli", "user", "--config",
                                      str(s.config_path), "add", address])
        output = b""
        deadline = time.monotonic() + 60
        pending = list(answers)
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            # Answer a prompt once it is shown (getpass flushes what was typed ahead).
            if pending and output.rstrip(b" ").endswith(b":"):
                os.write(fd, pending.pop(0).encode() + b"\n")
                output += b"|"
        else:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        return os.waitstatus_to_exitcode(status), output.decode(errors="replace")

    code, output = run_on_a_terminal("fay@example.org", ["one", "two"])
    assert code == 1 and "the passwords differ; nothing changed" in output, output
    assert "fay@example.org" not in (s.workdir / "users").read_text()
    code, output = run_on_a_terminal("fay@example.org", ["fay's pw", "fay's pw"])
    assert code == 0, output
    assert "New password:" in output and "Repeat it:" in output
    assert "fay's pw" not in output  # not echoed
    assert "ok: added fay@example.org" in output
