"""
IMAP with Dovecot as the README sets it up: users made with ``mailsrv user add``, Dovecot run
with the configuration ``mailsrv dovecot-config`` prints (only the test's directories and
loopback ports appended), mail delivered through mailsrv over SMTP and read back with
``imaplib``: the same password logs in, every message is there, byte for byte what the
Maildir holds, with the right RFC822.SIZE, and Dovecot logs no warning.
"""

from __future__ import annotations

import collections
import imaplib
import os
import re
import subprocess
import sys

import pytest

from support.certs import make_ca
from support.dovecot import MAIL_USER, Dovecot, dovecot_lacks, owned_dir, reachable_dir
from support.harness import REPO, DNSServer, MailServer
from support.mail import send_mail

pytestmark = pytest.mark.skipif(dovecot_lacks() is not None, reason=str(dovecot_lacks()))

PASSWORDS = {"alice@example.org": "alice's pässword", "bob@example.org": "bob pw 2",
             "carol@example.net": "c" * 30}
ZONE = {"records": {}}


def mailsrv(config, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """The admin command, as an administrator runs it (root)."""
    return subprocess.run(
        [sys.executable, "-m", "mailsrv.tools.cli", *args, "--config", str(config)],
        input=stdin.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60,
    )


def messages() -> list[tuple[str, list[str], bytes, list[str]]]:
    """(sender, recipients, data, MAIL options) of what the test sends."""
    big = b"".join(b"line %06d of a longer message, to be read back whole\r\n" % n
                   for n in range(6000))
    return [
        ("someone@client.test", ["alice@example.org"],
         b"From: someone@client.test\r\nSubject: plain\r\n\r\nhello alice\r\n", []),
        ("someone@client.test", ["Alice@Example.org", "bob@example.org"],
         "From: x@client.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; "
         "charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nCafé, naïve, 日本\r\n"
         .encode(), ["BODY=8BITMIME"]),
        ("someone@client.test", ["bob@example.org"],
         b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast\r\n", []),
        ("someone@client.test", ["sales@example.org", "carol+tag@example.net"],
         b"Subject: big\r\n\r\n" + big, []),
        ("", ["carol@example.net"], b"Subject: from the null sender\r\n\r\nbounce-ish\r\n", []),
    ]


@pytest.fixture(scope="module")
def setup():
    reason = dovecot_lacks()
    if reason is not None:
        pytest.skip(reason)
    with reachable_dir() as work:
        dns = DNSServer(work, ZONE)
        server = dovecot = None
        try:
            ca = make_ca(work)
            cert, key = ca.issue(["mx.example.org", "localhost"], work, ips=("127.0.0.1",))
            (work / "mailsrv").mkdir(mode=0o755)
            server = MailServer(work / "mailsrv", dns.port, users=[],
                                aliases=["postmaster: alice@example.org",
                                         "sales@example.org: alice@example.org, bob@example.org"],
                                overrides={"tls": {"cert": str(cert), "key": str(key)}})
            (server.workdir / "users").unlink()  # a fresh install: `mailsrv user add` makes it
            owned_dir(server.queue)  # as the server makes them at its first start, as its user
            owned_dir(server.root)
            server.twistd_options = ["--uid", MAIL_USER, "--gid", MAIL_USER]
            for address, password in PASSWORDS.items():
                result = mailsrv(server.config_path, "user", "add", address, "--password-stdin",
                                 stdin=password + "\n")
                assert result.returncode == 0, result.stderr
            # A line with Dovecot's extra fields: `mailsrv user passwd` leaves them as they are.
            users = server.workdir / "users"
            users.write_text(users.read_text() + "dave@example.org:{BLF-CRYPT}$2y$05$x::::::"
                             "userdb_quota_rule=*:storage=10M\n")
            result = mailsrv(server.config_path, "user", "passwd", "dave@example.org",
                             "--password-stdin", stdin="dave pw\n")
            assert result.returncode == 0, result.stderr
            server.start()
            result = mailsrv(server.config_path, "dovecot-config")
            assert result.returncode == 0, result.stderr
            dovecot = Dovecot(work / "dovecot", result.stdout.decode()).start()
            yield {"server": server, "dovecot": dovecot, "ca": ca, "config": result.stdout.decode(),
                   "cert": cert, "key": key}
        finally:
            if dovecot is not None:
                dovecot.stop()
            if server is not None:
                server.stop()
            dns.stop()


def test_the_configuration_names_the_servers_files_and_user(setup):
    server, text = setup["server"], setup["config"]
    assert f"mail_location = maildir:{server.root}/%d/%n\n" in text
    assert f"mail_uid = {MAIL_USER}\n" in text and "first_valid_uid = 8" in text
    assert text.count(f"args = {server.workdir / 'users'}\n") == 1
    assert f"extra_groups = {MAIL_USER}\n" in text  # the users file's group
    users = server.workdir / "users"
    assert users.stat().st_mode & 0o777 == 0o640 and users.stat().st_gid == 8
    assert f"ssl_cert = <{setup['cert']}\nssl_key = <{setup['key']}\n" in text


def login(client: imaplib.IMAP4, user: str, password: str) -> str:
    """AUTHENTICATE PLAIN in UTF-8 (imaplib's LOGIN takes ASCII only), as mail clients do."""
    response = f"\0{user}\0{password}".encode()
    return client.authenticate("PLAIN", lambda challenge: response)[0]


def maildir_files(server: MailServer, address: str) -> list[bytes]:
    box = server.mailbox_path(address)
    return [p.read_bytes() for sub in ("new", "cur") for p in sorted((box / sub).iterdir())]


def read_inbox(client: imaplib.IMAP4) -> list[tuple[int, bytes]]:
    """(RFC822.SIZE, BODY[]) of every message of the INBOX."""
    status, data = client.select("INBOX")
    assert status == "OK", data
    count = int(data[0])
    if count == 0:
        return []
    status, data = client.fetch(f"1:{count}", "(RFC822.SIZE BODY.PEEK[])")
    assert status == "OK", data
    found = []
    for item in data:
        if isinstance(item, tuple):
            size = int(re.search(rb"RFC822\.SIZE (\d+)", item[0]).group(1))
            found.append((size, item[1]))
    assert len(found) == count
    return found


def test_every_message_read_back_byte_for_byte(setup):
    server, dovecot = setup["server"], setup["dovecot"]
    expected = collections.Counter()
    for sender, recipients, data, options in messages():
        assert send_mail(server.port, sender, recipients, data, mail_options=options) == {}
        for rcpt in recipients:
            if rcpt == "sales@example.org":
                expected.update(["alice@example.org", "bob@example.org"])
            else:
                local, domain = rcpt.lower().split("@")
                expected[f"{local.split('+')[0]}@{domain}"] += 1
    for address, password in PASSWORDS.items():
        on_disk = maildir_files(server, address)
        assert len(on_disk) == expected[address], address
        client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
        try:
            assert login(client, address.upper(), password) == "OK"  # any case, as mailsrv
            fetched = read_inbox(client)
        finally:
            client.logout()
        for size, body in fetched:
            assert size == len(body)
        # Every message as the Maildir holds it: mailsrv stores lines ending in LF (the
        # Maildir convention), IMAP sends them with CRLF, and counts them so in RFC822.SIZE.
        assert all(b"\r" not in f for f in on_disk)
        assert sorted(body for _, body in fetched) == sorted(
            f.replace(b"\n", b"\r\n") for f in maildir_files(server, address))
    assert dovecot.problems() == []


def test_tls_and_passwords(setup):
    server, dovecot = setup["server"], setup["dovecot"]
    context = setup["ca"].client_context()
    client = imaplib.IMAP4_SSL("127.0.0.1", dovecot.imaps_port, ssl_context=context)
    try:
        assert login(client, "alice@example.org", PASSWORDS["alice@example.org"]) == "OK"
    finally:
        client.logout()
    client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
    client.starttls(ssl_context=context)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login("alice@example.org", "wrong")
    client.logout()
    # The line with Dovecot's extra fields: the new password, and its quota rule applies.
    users = (server.workdir / "users").read_text()
    assert re.search(r"(?m)^dave@example\.org:\{BLF-CRYPT\}\$2y\$12\$[^:]+::::::"
                     r"userdb_quota_rule=\*:storage=10M$", users), users
    client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
    try:
        assert client.login("dave@example.org", "dave pw")[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()
    assert [line for line in dovecot.problems()
            if "auth" not in line or "Password mismatch" not in line] == []
