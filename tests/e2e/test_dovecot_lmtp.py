"""
LMTP delivery (``[mailboxes] delivery = "lmtp:unix:PATH"``) to a private Dovecot run with the
configuration ``mailsrv dovecot-config`` prints: local mail goes through mailsrv's queue to
Dovecot's LMTP, so the users' Sieve scripts run (fileinto, vacation) and quotas apply (over
quota: a bounce, never a loss); with Dovecot down the message waits in the queue and arrives
when it is back.
"""

from __future__ import annotations

import collections
import imaplib
import os
import re
import smtplib
import threading
import time

import pytest

from support.dovecot import (
    MAIL_USER,
    Dovecot,
    dovecot_lacks,
    fresh_install,
    login,
    mailsrv,
    reachable_dir,
)
from support.harness import DNSServer, MailServer, wait_for
from support.mail import send_mail

LACKS = dovecot_lacks("lmtp")
pytestmark = pytest.mark.skipif(LACKS is not None, reason=str(LACKS))

PASSWORDS = {"alice@example.org": "alice pw", "bob@example.org": "bob pw",
             "carol@example.net": "carol pw", "dave@example.org": "dave pw",
             "eve@example.org": "eve pw"}


def sieve(server: MailServer, address: str, script: str) -> None:
    """``script`` as the user's active Sieve script (~/sieve/main.sieve, ~/active.sieve; home
    is ``home`` in the Maildir)."""
    home = server.mailbox_path(address) / "home"
    uid, gid = os.stat(server.root).st_uid, os.stat(server.root).st_gid
    for directory in (home.parent.parent, home.parent, home, home / "sieve"):
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chown(directory, uid, gid)
    (home / "sieve" / "main.sieve").write_text(script)
    os.chown(home / "sieve" / "main.sieve", uid, gid)
    os.symlink("sieve/main.sieve", home / "active.sieve")
    os.lchown(home / "active.sieve", uid, gid)


@pytest.fixture(scope="module")
def setup():
    if LACKS is not None:
        pytest.skip(LACKS)
    with reachable_dir() as work:
        dns = DNSServer(work, {"records": {}})
        server = dovecot = None
        try:
            (work / "mailsrv").mkdir(mode=0o755)
            (work / "dovecot").mkdir(mode=0o755)
            socket_path = work / "dovecot" / "lmtp"
            server = MailServer(work / "mailsrv", dns.port, users=[],
                                aliases=["postmaster: alice@example.org"],
                                overrides={"mailboxes": {"delivery": f"lmtp:unix:{socket_path}"},
                                           "queue": {"retry_schedule": [1]}})
            fresh_install(server, PASSWORDS)
            users = server.workdir / "users"
            text = re.sub(r"(?m)^(dave@example\.org:[^:\n]*)$",
                          r"\1::::::userdb_quota_rule=*:storage=2K", users.read_text())
            users.write_text(re.sub(r"(?m)^(eve@example\.org:[^:\n]*)$",
                                    r"\1::::::userdb_quota_rule=*:messages=1", text))
            sieve(server, "bob@example.org",
                  'require "fileinto";\nif header :contains "subject" "[list]" '
                  '{ fileinto "Lists"; stop; }\n')
            sieve(server, "alice@example.org",
                  'require "vacation";\nvacation :days 1 :subject "Away" "I am away.";\n')
            server.start()
            result = mailsrv(server.config_path, "dovecot-config")
            assert result.returncode == 0, result.stderr
            text = result.stdout.decode()
            dovecot = Dovecot(work / "dovecot", text,
                              extra=f"submission_host = 127.0.0.1:{server.port}\n").start()
            yield {"server": server, "dovecot": dovecot, "config": text, "socket": socket_path}
        finally:
            if dovecot is not None:
                dovecot.stop()
            if server is not None:
                server.stop()
            dns.stop()


def inbox(dovecot: Dovecot, address: str, folder: str = "INBOX") -> list[bytes]:
    client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
    try:
        assert login(client, address, PASSWORDS[address]) == "OK"
        status, data = client.select(folder, readonly=True)
        if status != "OK":
            return []
        count = int(data[0])
        if not count:
            return []
        status, data = client.fetch(f"1:{count}", "(RFC822.SIZE BODY.PEEK[])")
        found = [item for item in data if isinstance(item, tuple)]
        for head, body in found:  # the size Dovecot announces is that of what it sends
            assert int(re.search(rb"RFC822\.SIZE (\d+)", head).group(1)) == len(body)
        return [body for _, body in found]
    finally:
        client.logout()


def arrived(dovecot: Dovecot, address: str, marker: bytes, folder: str = "INBOX",
            timeout: float = 20) -> bytes:
    return wait_for(lambda: next((m for m in inbox(dovecot, address, folder) if marker in m),
                                 None), timeout, f"{marker!r} in {address}'s {folder}", 0.2)


def test_the_configuration_for_lmtp(setup):
    text = setup["config"]
    assert "\nprotocols = imap lmtp\n" in text
    assert f"  unix_listener {setup['socket']} {{\n    user = {MAIL_USER}\n" in text
    assert "  mail_plugins = $mail_plugins sieve\n" in text
    assert "\npostmaster_address = postmaster@example.org\n" in text


def test_delivered_through_lmtp_and_the_queue(setup):
    server, dovecot = setup["server"], setup["dovecot"]
    message = b"From: someone@client.test\r\nSubject: via lmtp\r\n\r\n.dot line\r\nbody\r\n"
    assert send_mail(server.port, "someone@client.test", ["bob@example.org",
                                                          "carol+tag@example.net"], message) == {}
    for address in ("bob@example.org", "carol@example.net"):
        got = arrived(dovecot, address, b"Subject: via lmtp")
        assert got.endswith(b"\r\n\r\n.dot line\r\nbody\r\n")
        assert got.startswith(b"Return-Path: <someone@client.test>\r\n")  # Dovecot's
        assert b"by mx.example.org (mailsrv)" in got
    log = server.log_text()
    assert re.search(r"relay id=\S+ from=<someone@client\.test> to=<bob@example\.org> "
                     r"relay=lmtp:unix:\S+ .*status=sent", log), log
    assert dovecot.problems() == []


def test_sieve_fileinto_and_vacation(setup):
    server, dovecot = setup["server"], setup["dovecot"]
    assert send_mail(server.port, "someone@client.test", ["bob@example.org"],
                     b"Subject: [list] news\r\n\r\nfiled\r\n") == {}
    arrived(dovecot, "bob@example.org", b"[list] news", folder="Lists")
    assert not any(b"[list] news" in m for m in inbox(dovecot, "bob@example.org"))
    assert send_mail(server.port, "carol@example.net", ["alice@example.org"],
                     b"From: carol@example.net\r\nTo: alice@example.org\r\nSubject: hello\r\n"
                     b"Message-ID: <vacation-test@example.net>\r\n\r\nare you there?\r\n") == {}
    arrived(dovecot, "alice@example.org", b"are you there?")
    reply = arrived(dovecot, "carol@example.net", b"I am away.")
    assert b"Subject: Away" in reply and b"Auto-Submitted: auto-replied" in reply
    # Vacation's duplicate database lives in home, out of the Maildir++ root, where a dot-file
    # read as a folder (an IMAP listing racing its write logged "Not a directory").
    maildir = server.mailbox_path("alice@example.org")
    assert (maildir / "home" / ".dovecot.lda-dupes").exists()
    assert not any(p.name.startswith(".dovecot") for p in maildir.iterdir())
    assert dovecot.problems() == []


def test_over_quota_is_bounced_never_lost(setup):
    server, dovecot = setup["server"], setup["dovecot"]
    big = b"Subject: too big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0 + (b"y" * 70 + b"\r\n") * 60
    assert send_mail(server.port, "carol@example.net", ["dave@example.org"], big) == {}
    bounce = arrived(dovecot, "carol@example.net", b"Subject: Undelivered", timeout=30) \
        if False else wait_for(
            lambda: next((m for m in inbox(dovecot, "carol@example.net")
                          if b"multipart/report" in m and b"dave@example.org" in m), None),
            30, "the bounce to carol", 0.2)
    assert b"5.2.2" in bounce
    assert inbox(dovecot, "dave@example.org") == []
    assert re.search(r"to=<dave@example\.org> relay=lmtp:\S+ .*status=bounced .*552",
                     server.log_text()), server.log_text()


def test_dovecot_away_the_message_waits_in_the_queue(setup):
    server, dovecot = setup["server"], setup["dovecot"]
    dovecot.stop()
    try:
        assert send_mail(server.port, "someone@client.test", ["bob@example.org"],
                         b"Subject: while away\r\n\r\nkept\r\n") == {}
        wait_for(lambda: re.search(r"to=<bob@example\.org> relay=none .*status=deferred",
                                   server.log_text()), 20, "the deferral")
        time.sleep(1.5)  # at least one retry more, still without Dovecot
    finally:
        dovecot.start()
    arrived(dovecot, "bob@example.org", b"Subject: while away", timeout=30)


def test_a_full_mailbox_is_refused_at_rcpt(setup):
    """Dovecot's 552 5.2.2 to an LMTP RCPT, asked before our reply to RCPT: the sending
    server is refused, no bounce; the other recipients of the message get it."""
    server, dovecot = setup["server"], setup["dovecot"]
    assert send_mail(server.port, "someone@client.test", ["eve@example.org"],
                     b"Subject: the one message eve may have\r\n\r\nfits\r\n") == {}
    arrived(dovecot, "eve@example.org", b"the one message eve may have")
    refused = send_mail(server.port, "someone@client.test", ["eve@example.org",
                                                             "bob@example.org"],
                        b"Subject: one too many\r\n\r\nx\r\n")
    assert list(refused) == ["eve@example.org"]
    code, text = refused["eve@example.org"]
    assert code == 552 and text.startswith(b"5.2.2"), text
    arrived(dovecot, "bob@example.org", b"one too many")
    assert len(inbox(dovecot, "eve@example.org")) == 1
    assert re.search(r"refused recipient id=\S+ .*to=<eve@example\.org> check=lmtp_quota "
                     r"reason=\"552 5\.2\.2",
                     server.log_text())


def delivered_tokens(server: MailServer, address: str) -> collections.Counter:
    """How often each load token is in the Maildir Dovecot wrote for ``address``."""
    found: collections.Counter = collections.Counter()
    box = server.mailbox_path(address)
    for sub in ("new", "cur"):
        for path in (box / sub).iterdir() if (box / sub).exists() else ():
            found.update(re.findall(rb"Subject: (load-\d+-\d+)", path.read_bytes()))
    return found


def test_sigkill_under_load_loses_nothing_that_got_250(setup):
    """LMTP mode's 250 is "in our queue": SIGKILL during a load, restart, and every message
    answered 250 reaches Dovecot (a copy handed over just before the kill may come twice)."""
    server = setup["server"]
    accepted: list[tuple[str, str]] = []
    stop = threading.Event()

    def client(number: int) -> None:
        address = ("bob@example.org", "carol@example.net")[number % 2]
        for n in range(40):
            if stop.is_set():
                return
            token = f"load-{number}-{n}"
            try:
                if send_mail(server.port, "load@client.test", [address],
                             f"Subject: {token}\r\n\r\n{token}\r\n".encode(), timeout=5) == {}:
                    accepted.append((address, token))
            except (OSError, smtplib.SMTPException):
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(accepted) >= 20, 20, "some accepted messages")
    server.kill()
    stop.set()
    for thread in threads:
        thread.join(20)
    server.start()

    def all_there() -> bool:
        counts = {a: delivered_tokens(server, a) for a in ("bob@example.org", "carol@example.net")}
        return all(counts[address][token.encode()] >= 1 for address, token in accepted)

    wait_for(all_there, 60, f"all {len(accepted)} accepted messages in Dovecot's Maildirs", 0.5)
