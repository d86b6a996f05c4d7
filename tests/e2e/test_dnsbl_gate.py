"""
DNS blocklists end to end: a real server, its [dnsbl] zones served by the loopback DNS
server, clients from 127.0.0.x source addresses outside relay.trusted_networks.

127.0.0.9 is listed by bl.test (weight 2, the threshold), 127.0.0.11 only by weak.test
(weight 1: one under it), 127.0.0.10 by bl.test and by the allowlist ok.test; broken.test
answers SERVFAIL for everyone (lists nobody).  127.0.0.1 is listed nowhere.
"""

from __future__ import annotations

import smtplib
import time

import pytest

from support.harness import DNSServer, MailServer, wait_for
from support.mail import connect

ZONE = {
    "records": {
        "9.0.0.127.bl.test": [["A", "127.0.0.2"]],
        "10.0.0.127.bl.test": [["A", "127.0.0.2"]],
        "10.0.0.127.ok.test": [["A", "127.0.0.2"]],
        "11.0.0.127.weak.test": [["A", "127.0.0.4"]],
        # A list that refuses our resolver: an error code, not a listing.
        "1.0.0.127.refusing.test": [["A", "127.255.255.254"]],
    },
    "servfail": ["9.0.0.127.broken.test", "1.0.0.127.broken.test"],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("dnsbl")
    dns = DNSServer(work, ZONE)
    (work / "s").mkdir()
    s = MailServer(work / "s", dns.port, overrides={
        "relay": {"trusted_networks": ["10.0.0.0/8"]},
        "checks": {"spf": False, "dkim_verify": False, "dmarc": False,
                   "protect_local_domains": False},
        "dnsbl": {"zones": {"bl.test": 2, "weak.test": 1, "broken.test": 5,
                            "refusing.test": 5},
                  "threshold": 2, "allow_zones": ["ok.test"], "timeout": 3},
    }).start()
    yield s
    s.stop()
    dns.stop()


def mail_from(server: MailServer, source: str) -> tuple[int, bytes]:
    with connect(server.port, source=source) as client:
        client.ehlo("client.test")
        code, text = client.mail("someone@sender.test")
        if code == 250:
            assert client.rcpt("alice@example.org")[0] == 250
        client.rset()
    return code, text


def test_a_listed_client_is_refused_at_mail_naming_the_zone(server) -> None:
    code, text = mail_from(server, "127.0.0.9")
    assert (code, text.decode()) == (
        554, "5.7.1 Service unavailable; client [127.0.0.9] blocked using bl.test")
    wait_for(lambda: 'check=dnsbl reason="dnsbl bl.test score 2"' in server.log_text(), 10,
             "the log line naming the layer and why")
    assert "refused sender client=unknown[127.0.0.9]" in server.log_text()


def test_one_under_the_threshold_allowlisted_and_clean_clients_pass(server) -> None:
    assert mail_from(server, "127.0.0.11")[0] == 250  # weak.test alone: score 1 of 2
    assert mail_from(server, "127.0.0.10")[0] == 250  # listed, but ok.test allows it
    assert mail_from(server, "127.0.0.1")[0] == 250  # a SERVFAIL zone and an error code
    assert "answered 127.255.255.254 for client=127.0.0.1" in server.log_text()


def test_a_clean_client_waits_for_no_timeout_and_mail_is_delivered(server) -> None:
    started = time.monotonic()
    with connect(server.port, source="127.0.0.12") as client:
        greeted = time.monotonic() - started
        client.sendmail("someone@sender.test", ["alice@example.org"],
                        b"Subject: through the gate\r\n\r\nhello\r\n")
    assert greeted < 3  # the zones answered at once (the timeout is 3 s)
    wait_for(lambda: [m for m in server.messages("alice@example.org")
                      if m["Subject"] == "through the gate"], 10, "the delivery")


def test_a_listed_client_gets_nothing_delivered(server) -> None:
    with connect(server.port, source="127.0.0.9") as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("someone@sender.test", ["alice@example.org"], b"Subject: x\r\n\r\nx\r\n")
    assert refused.value.smtp_code == 554
