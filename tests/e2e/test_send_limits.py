"""
[limits] against a running server: smtplib with STARTTLS and AUTH on the submission port
(messages_per_day 3: the 4th is deferred 451 4.7.0, the postmaster's Maildir gets one
notice for two refusals; recipients_per_hour one past), and connections_per_minute one past
from 127.0.0.1 outside relay.trusted_networks while a trusted address is exempt.
"""

from __future__ import annotations

import smtplib
import sys
import time

import pytest

from support.certs import make_ca
from support.harness import REPO, DNSServer, MailServer, wait_for
from support.mail import connect

sys.path.insert(0, str(REPO))
from mailsrv.accounts.auth import hash_password  # noqa: E402  (the checkout's code, like the server)

PASSWORDS = {"alice@example.org": "alice pw", "bob@example.org": "bob pw"}
USERS = [f"{a}:{hash_password(p, cost=4)}" for a, p in PASSWORDS.items()] + ["pm@example.org"]
ALIASES = ["postmaster: pm@example.org"]
MESSAGES = "4.7.0 Error: sending limit reached (3 messages in 24 hours); try again later"
RECIPIENTS = "4.7.0 Error: sending limit reached (5 recipients in an hour); try again later"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("send-limits")
    dns = DNSServer(work, {"records": {}})
    ca = make_ca(work)
    cert, key = ca.issue(["mx.example.org", "localhost"], work, ips=("127.0.0.1",))
    yield {"work": work, "dns": dns, "ca": ca, "cert": cert, "key": key}
    dns.stop()


def make_server(env, name: str, **tables) -> MailServer:
    workdir = env["work"] / name
    workdir.mkdir()
    overrides = {
        "tls": {"cert": str(env["cert"]), "key": str(env["key"])},
        "submission": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "checks": {"spf": False, "dkim_verify": False, "dmarc": False,
                   "protect_local_domains": False},
    }
    for table, values in tables.items():
        overrides.setdefault(table, {}).update(values)
    return MailServer(workdir, env["dns"].port, users=USERS, aliases=ALIASES,
                      overrides=overrides).start()


def login(env, server: MailServer, user: str) -> smtplib.SMTP:
    client = connect(server.port_of("submission"))
    client.starttls(context=env["ca"].client_context())
    client.ehlo()
    client.login(user, PASSWORDS[user])
    return client


def send(client: smtplib.SMTP, sender: str, *rcpts: str) -> tuple[int, str]:
    """One message: the first refusal (MAIL or RCPT), else the final reply."""
    code, text = client.mail(sender)
    if code != 250:
        return code, text.decode()
    for rcpt in rcpts:
        code, text = client.rcpt(rcpt)
        if code != 250:
            client.rset()
            return code, text.decode()
    code, text = client.data(f"From: {sender}\r\nSubject: hi\r\n\r\nhello\r\n".encode())
    return code, text.decode()


def test_messages_per_day_and_recipients_per_hour(env) -> None:
    """127.0.0.1 is a trusted network here: its authenticated users are held to the limits
    all the same (webmail on the host submits as its users)."""
    server = make_server(env, "users", limits={"messages_per_day": 3, "recipients_per_hour": 5})
    try:
        with login(env, server, "alice@example.org") as alice:
            for _ in range(3):
                assert send(alice, "alice@example.org", "bob@example.org")[0] == 250
            assert send(alice, "alice@example.org", "bob@example.org") == (451, MESSAGES)
        with login(env, server, "alice@example.org") as alice:  # a new connection: the same
            assert send(alice, "alice@example.org", "bob@example.org") == (451, MESSAGES)
        wait_for(lambda: server.messages("pm@example.org"), 10, "the notice")
        assert len(server.messages("bob@example.org")) == 3
        with login(env, server, "bob@example.org") as bob:  # another user: a quota of his own
            rcpts = [f"alice+{n}@example.org" for n in range(4)]
            assert send(bob, "bob@example.org", *rcpts)[0] == 250
            # The 5th recipient of the hour passes, the 6th is deferred.
            assert bob.mail("bob@example.org")[0] == 250
            assert bob.rcpt("alice+5@example.org")[0] == 250
            code, text = bob.rcpt("alice+6@example.org")
            assert (code, text.decode()) == (451, RECIPIENTS)
            assert bob.data(b"Subject: two\r\n\r\nx\r\n")[0] == 250
        wait_for(lambda: len(server.messages("pm@example.org")) == 2, 10, "bob's notice")
        time.sleep(0.5)  # nothing more comes
        notices = server.messages("pm@example.org")
        assert sorted(n["Subject"] for n in notices) == [
            "Send limit reached by alice@example.org", "Send limit reached by bob@example.org"]
        assert all(n["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
                   and n["Return-Path"] == "<>" for n in notices)
        log = server.log_text()
        assert log.count('user=alice@example.org from=<alice@example.org> '
                         'check=send_limit reason="send limit messages_per_day 3"') == 2
        assert 'to=<alice+6@example.org> check=send_limit reason="send limit recipients_per_hour 5"' in log
        assert log.count("send limit notice user=alice@example.org to=<postmaster@example.org>") == 1
    finally:
        server.stop()


def test_connections_per_minute_untrusted_refused_trusted_exempt(env) -> None:
    server = make_server(env, "connections", limits={"connections_per_minute": 3},
                         relay={"trusted_networks": ["127.0.0.3/32"]})
    try:
        for _ in range(3):
            with connect(server.port) as client:
                assert client.noop()[0] == 250
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            connect(server.port)
        assert (refused.value.smtp_code, refused.value.smtp_error.decode()) == (
            421, "4.7.0 Error: too many connections from your address in a minute; "
                 "try again later")
        for _ in range(5):
            with connect(server.port, source="127.0.0.3") as client:
                assert client.noop()[0] == 250
        assert ('refused connection client=127.0.0.1 check=connection_rate '
                'reason="connection rate connections_per_minute 3"') in server.log_text()
    finally:
        server.stop()
