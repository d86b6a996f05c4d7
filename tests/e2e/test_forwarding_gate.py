"""
Forwarding is not a spam cannon (issue 14 item 7): mail to an alias that forwards off-site
passes the whole gate (DNS blocklists, greylisting, DMARC, rspamd) before it is forwarded, and
a forwarded message whose sender failed SPF and DMARC is not bounced when the next hop refuses
it, only logged, while an honest sender's forward still gets its bounce.

fwd@example.org forwards to carol@remote.test only.  Clients come from 127.0.0.x source
addresses outside relay.trusted_networks: they play other servers on the internet.
sender.test allows only 127.0.0.1 by SPF and publishes DMARC p=none; forged.test allows
nobody and publishes p=reject; bl.test lists 127.0.0.9.  remote.test and sender.test have
their MX on one sink (127.0.0.2), which refuses carol.
"""

from __future__ import annotations

import re
import time

import pytest

from support.harness import DNSServer, MailServer, SMTPSink, free_port, wait_for
from support.mail import connect
from support.rspamd import RspamdServer, rspamd_missing

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
ZONE = {
    "records": {
        "remote.test": [["MX", 10, "mx.remote.test"]],
        "sender.test": [["MX", 10, "mx.remote.test"], ["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
        "_dmarc.sender.test": [["TXT", "v=DMARC1; p=none"]],
        "forged.test": [["TXT", "v=spf1 -all"]],
        "_dmarc.forged.test": [["TXT", "v=DMARC1; p=reject"]],
        "mx.remote.test": [["A", "127.0.0.2"]],
        "9.0.0.127.bl.test": [["A", "127.0.0.2"]],
    },
}
FORWARD = "fwd@example.org: carol@remote.test"
CHECKS = {"spf": True, "dkim_verify": True, "dmarc": True, "dmarc_reject": True}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("forward")
    dns = DNSServer(work, ZONE)
    port = free_port(["127.0.0.2"])
    sink = SMTPSink(work / "sink", "127.0.0.2", hostname="mx.remote.test", port=port,
                    rules={"rcpt": [["^carol@remote\\.test$", "550 5.1.1 no such user here"]]})
    rspamd = None
    if rspamd_missing() is None:
        rspamd = RspamdServer(work / "rspamd", dns.port)
    (work / "mailsrv").mkdir()
    overrides = {"relay": {"port": port, "trusted_networks": ["10.0.0.0/8"]},
                 "queue": {"retry_schedule": [1], "max_age": 3600},
                 "checks": CHECKS, "dnsbl": {"zones": {"bl.test": 1}, "threshold": 1}}
    if rspamd is not None:
        overrides["rspamd"] = {"url": rspamd.url, "timeout": 10}
    server = MailServer(work / "mailsrv", dns.port, aliases=["postmaster: alice@example.org",
                                                             FORWARD],
                        overrides=overrides).start()
    yield {"server": server, "sink": sink, "rspamd": rspamd, "dns": dns, "work": work}
    server.stop()
    if rspamd is not None:
        rspamd.stop()
    sink.stop()
    dns.stop()


def message(subject: str, sender: str, body: str = "forwarded") -> bytes:
    return (f"From: <{sender}>\r\nTo: <fwd@example.org>\r\nSubject: {subject}\r\n"
            f"Date: Thu, 03 Dec 2026 08:00:00 +0000\r\nMessage-ID: <{time.time()}@{subject}>\r\n"
            f"\r\n{body}\r\n").encode()


def send_from(server: MailServer, source: str, sender: str, data: bytes) -> tuple[int, str]:
    """One message to the forward from ``source``: the code and text of the first refusal,
    or of the end of DATA."""
    with connect(server.port, source=source) as client:
        client.ehlo("mx.sender.test")
        for command in (lambda: client.mail(sender), lambda: client.rcpt("fwd@example.org")):
            code, text = command()
            if code != 250:
                return code, text.decode()
        code, text = client.data(data)
        return code, text.decode()


def queue_id_of(server: MailServer, subject_sender: str) -> str:
    found = re.findall(rf"accepted id=(\w+) .*from=<{re.escape(subject_sender)}>",
                       server.log_text())
    assert found, "no accepted line"
    return found[-1]


def test_a_listed_client_cannot_use_the_forward(env) -> None:
    code, text = send_from(env["server"], "127.0.0.9", "dave@sender.test",
                           message("listed", "dave@sender.test"))
    assert (code, text) == (554, "5.7.1 Service unavailable; client [127.0.0.9] blocked using "
                                 "bl.test")


def test_dmarc_reject_applies_to_the_forward(env) -> None:
    code, text = send_from(env["server"], "127.0.0.1", "boss@forged.test",
                           message("dmarc", "boss@forged.test"))
    assert code == 550 and text.startswith("5.7.1") and "forged.test" in text
    assert "check=dmarc_policy" in env["server"].log_text()


def test_spam_to_the_forward_is_refused_by_rspamd(env) -> None:
    if env["rspamd"] is None:
        pytest.skip(rspamd_missing())
    before = len(env["sink"].messages())
    code, text = send_from(env["server"], "127.0.0.1", "dave@sender.test",
                           message("gtube", "dave@sender.test", GTUBE))
    assert (code, text) == (550, "5.7.1 Error: message refused as spam: Gtube pattern")
    time.sleep(1)
    assert len(env["sink"].messages()) == before  # nothing was forwarded


def test_a_forged_senders_refused_forward_is_not_bounced(env) -> None:
    """127.0.0.3 may not send for sender.test (SPF fail) and the From: has no DKIM (DMARC
    fail, p=none: accepted).  carol's server refuses the forward: no DSN goes to dave, whose
    address was most likely forged; the log says so."""
    server, sink = env["server"], env["sink"]
    code, _ = send_from(server, "127.0.0.3", "dave@sender.test",
                        message("forged-forward", "dave@sender.test"))
    assert code == 250
    queue_id = queue_id_of(server, "dave@sender.test")
    assert re.search(rf'queued id={queue_id} to=<carol@remote.test> .* no_bounce="spf=fail '
                     r'dmarc=fail for sender.test"', server.log_text())
    wait_for(lambda: f"bounce id={queue_id}: not sent, the sender is likely forged "
                     "(spf=fail dmarc=fail for sender.test); dropped for <carol@remote.test>"
             in server.log_text(), 30, "the dropped bounce's log line")
    assert re.search(rf"relay id={queue_id} .*to=<carol@remote.test> .*status=bounced",
                     server.log_text())
    wait_for(lambda: not (server.queue / "messages" / f"{queue_id}.json").exists(), 10,
             "the message to leave the queue")  # (removed after the log line, in a thread)
    time.sleep(1)
    assert [m for m in sink.messages() if m["rcpt_to"] == ["dave@sender.test"]
            and queue_id in m["data"]] == []


def test_an_honest_senders_refused_forward_is_bounced(env) -> None:
    server, sink = env["server"], env["sink"]
    code, _ = send_from(server, "127.0.0.1", "erin@sender.test",
                        message("honest-forward", "erin@sender.test"))
    assert code == 250
    [dsn] = wait_for(lambda: [m for m in sink.messages() if m["rcpt_to"] == ["erin@sender.test"]],
                     30, "the bounce to erin")
    assert dsn["mail_from"] == "" and "carol@remote.test" in dsn["data"]


def test_greylisting_applies_to_the_forward(env, tmp_path) -> None:
    server = MailServer(tmp_path, env["dns"].port, aliases=["postmaster: alice@example.org",
                                                            FORWARD], overrides={
        "relay": {"trusted_networks": ["10.0.0.0/8"]},
        "checks": {"spf": False, "dkim_verify": False, "dmarc": False,
                   "protect_local_domains": False},
        "greylist": {"enabled": True, "delay": 60}})
    server.start()
    try:
        with connect(server.port, source="127.0.0.1") as client:
            client.ehlo("mx.sender.test")
            assert client.mail("dave@sender.test")[0] == 250
            code, text = client.rcpt("fwd@example.org")
        assert (code, text.decode()) == (451, "4.7.1 Greylisted: please try again in 60 seconds")
    finally:
        server.stop()

