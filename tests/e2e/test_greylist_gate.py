"""
Greylisting end to end: a real server with [greylist] delay 3 s, a client outside the
trusted networks (127.0.0.30): first attempt 451 4.7.1, a retry too soon 451, after the
delay 250 and the message delivered; after a restart the triplet is still known.
"""

from __future__ import annotations

import time

from support.harness import DNSServer, MailServer, RawClient, wait_for
from support.mail import connect

DELAY = 3  # seconds: room for a loaded machine between the first attempt and the retry


def rcpt(server: MailServer, sender: str = "someone@sender.test") -> tuple[int, str]:
    with connect(server.port, source="127.0.0.30") as client:
        client.ehlo("client.test")
        assert client.mail(sender)[0] == 250
        code, text = client.rcpt("alice@example.org")
        if code == 250:
            assert client.data(b"Subject: greylisted once\r\n\r\nhello\r\n")[0] == 250
        else:
            client.rset()
    return code, text.decode()


def test_greylisting_across_a_restart(tmp_path) -> None:
    dns = DNSServer(tmp_path, {"records": {}})
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns.port, overrides={
        "relay": {"trusted_networks": ["10.0.0.0/8"]},
        "checks": {"spf": False, "dkim_verify": False, "dmarc": False,
                   "protect_local_domains": False},
        "greylist": {"enabled": True, "delay": DELAY},
    })
    try:
        server.start()
        started = time.monotonic()
        assert rcpt(server) == (451, f"4.7.1 Greylisted: please try again in {DELAY} seconds")
        first_answered = time.monotonic()  # the server's first sight of the triplet is before
        code, text = rcpt(server)
        assert code == 451 and time.monotonic() - started < DELAY
        time.sleep(max(0.0, first_answered + DELAY - time.monotonic()) + 0.2)
        assert rcpt(server)[0] == 250
        wait_for(lambda: server.messages("alice@example.org"), 10, "the delivery")
        assert f'check=greylist reason="greylisted for {DELAY} s"' in server.log_text()
        database = server.queue / "greylist.sqlite3"
        assert database.stat().st_mode & 0o077 == 0
        server.stop()
        server.start()
        assert rcpt(server)[0] == 250  # remembered across the restart
        assert rcpt(server, "another@sender.test")[0] == 451  # a new triplet still waits
    finally:
        server.stop()
        dns.stop()


def test_a_big_providers_sender_whose_spf_passes_is_not_greylisted(tmp_path) -> None:
    """bigmail.test (in spf_pass_domains) allows 127.0.0.30 by SPF and nobody else; SPF is
    checked before MAIL's reply, so a RCPT pipelined behind MAIL already knows it."""
    dns = DNSServer(tmp_path, {"records": {
        "bigmail.test": [["TXT", "v=spf1 ip4:127.0.0.30 -all"]],
        "sender.test": [["TXT", "v=spf1 ip4:127.0.0.30 -all"]],
    }})
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns.port, overrides={
        "relay": {"trusted_networks": ["10.0.0.0/8"]},
        "checks": {"spf": True, "dkim_verify": False, "dmarc": False,
                   "protect_local_domains": False},
        "greylist": {"enabled": True, "delay": 600, "spf_pass_domains": ["bigmail.test"]},
    })
    try:
        server.start()

        def pipelined(source: str, sender: str) -> tuple[int, int]:
            client = RawClient(server.port, source=source)
            assert client.command("EHLO client.test")[0] == 250
            client.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<alice@example.org>\r\n".encode())
            mail, rcpt = client.reply()[0], client.reply()[0]
            client.command("QUIT")
            return mail, rcpt

        assert pipelined("127.0.0.30", "news@bigmail.test") == (250, 250)
        assert pipelined("127.0.0.31", "news@bigmail.test") == (250, 451)  # SPF fails
        assert pipelined("127.0.0.30", "news@sender.test") == (250, 451)  # not a big provider
        log = server.log_text()
        assert "from=<news@bigmail.test> spf=pass" in log
        assert "from=<news@bigmail.test> spf=fail" in log
        assert log.count("greylist spf id=") == 2  # none for sender.test: not looked up
    finally:
        server.stop()
        dns.stop()
