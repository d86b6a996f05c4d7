"""
SRS end to end: an alias forwards mail from an outside sender to a remote server; the queued
copy goes out from an SRS address of ours; the remote server refuses it, and the bounce,
sent to that SRS address, comes back through us to the original sender.  A remote server's
bounce to a forged or expired SRS address is refused.  Addresses are checked in both
directions against Debian's own SRS implementation (python3-srs), with the same secret.

The client (127.0.0.1) is not in trusted_networks here: it plays another server on the
internet.  remote.test and sender.test have their MX on one sink, 127.0.0.2.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from mailsrv.routing.srs import SRS
from support.harness import DNSServer, MailServer, SMTPSink, free_port, wait_for
from support.mail import connect, send_mail

SECRET = "a-test-secret-for-srs-0123456789"
ZONE = {
    "records": {
        "remote.test": [["MX", 10, "mx.remote.test"]],
        "sender.test": [["MX", 10, "mx.remote.test"]],
        "mx.remote.test": [["A", "127.0.0.2"]],
    },
}
DEBIAN_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("srs")
    dns = DNSServer(work, ZONE)
    port = free_port(["127.0.0.2"])
    sink = SMTPSink(work / "sink", "127.0.0.2", hostname="mx.remote.test", port=port)
    secret = work / "srs-secret"
    secret.write_text(f"# the test's\n{SECRET}\n")
    secret.chmod(0o600)
    (work / "mailsrv").mkdir()
    server = MailServer(
        work / "mailsrv", dns.port,
        aliases=["postmaster: alice@example.org",
                 "fwd@example.org: alice@example.org, carol@remote.test"],
        overrides={"relay": {"port": port, "trusted_networks": ["10.0.0.0/8"]},
                   "queue": {"retry_schedule": [1], "max_age": 3600},
                   "srs": {"secret_file": str(secret)}},
    ).start()
    yield {"server": server, "sink": sink}
    server.stop()
    sink.stop()
    dns.stop()


def debian_srs(call: str) -> str:
    """Run Debian's SRS library (not ours) with the test's secret."""
    code = (f"import SRS; s = SRS.new(secret={[SECRET]!r}, maxage=21); print({call})")
    try:
        result = subprocess.run([DEBIAN_PYTHON, "-c", code], capture_output=True, text=True,
                                timeout=30)
    except FileNotFoundError:
        pytest.skip(f"{DEBIAN_PYTHON} missing: Debian's python3-srs cannot be run")
    if "No module named 'SRS'" in result.stderr:
        pytest.skip("Debian's python3-srs is not installed (apt install python3-srs)")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def message(subject: str, sender: str) -> bytes:
    return f"From: <{sender}>\r\nSubject: {subject}\r\n\r\nforwarded\r\n".encode()


def test_forwarded_mail_goes_out_from_srs_and_its_bounce_returns_to_the_sender(env) -> None:
    server, sink = env["server"], env["sink"]
    sink.set_rules({"rcpt": [["^carol@remote\\.test$", "550 5.1.1 no such user here"]]})
    before = len(sink.messages())
    send_mail(server.port, "dave@sender.test", ["fwd@example.org"],
              message("srs round trip", "dave@sender.test"))
    # The local copy keeps the original sender; the queued copy was offered from SRS.
    [local] = wait_for(lambda: [m for m in server.messages("alice@example.org")
                                if m["Subject"] == "srs round trip"], 20, "alice's copy")
    assert local["Return-Path"] == "<dave@sender.test>"
    offered = wait_for(lambda: [line for line in sink.mail_commands() if "srs round" not in line
                                and "SRS0=" in line], 20, "the forward offered to remote.test")
    srs_sender = offered[-1].split("<", 1)[1].split(">", 1)[0]
    assert srs_sender.startswith("SRS0=") and srs_sender.endswith("=sender.test=dave@example.org")
    # Debian's implementation reverses what we made.
    assert debian_srs(f"s.reverse({srs_sender!r})") == "dave@sender.test"
    # carol refused it: our DSN to the SRS address went back to dave, via the same sink.
    [dsn] = wait_for(lambda: [m for m in sink.messages()[before:]
                              if m["rcpt_to"] == ["dave@sender.test"]], 30, "the bounce to dave")
    assert dsn["mail_from"] == ""
    assert "carol@remote.test" in dsn["data"]
    sink.set_rules({})


def test_a_remote_bounce_to_our_srs_address_is_relayed_back(env) -> None:
    server, sink = env["server"], env["sink"]
    before = len(sink.messages())
    srs_address = SRS([SECRET.encode()], "example.org").forward("erin@sender.test")
    send_mail(server.port, "", [srs_address],
              b"From: MAILER-DAEMON@mx.remote.test\r\nSubject: Undelivered\r\n\r\nbounce\r\n")
    [back] = wait_for(lambda: [m for m in sink.messages()[before:]
                               if m["rcpt_to"] == ["erin@sender.test"]], 30, "the relayed bounce")
    assert back["mail_from"] == ""


def test_an_address_made_by_debians_srs_is_accepted(env) -> None:
    server, sink = env["server"], env["sink"]
    before = len(sink.messages())
    made = debian_srs("s.forward('frank@sender.test', 'example.org')")
    assert made.startswith("SRS0=")
    send_mail(server.port, "", [made], b"Subject: Undelivered\r\n\r\nbounce\r\n")
    wait_for(lambda: [m for m in sink.messages()[before:]
                      if m["rcpt_to"] == ["frank@sender.test"]], 30, "the relayed bounce")


def test_forged_and_expired_srs_addresses_are_refused(env) -> None:
    server = env["server"]
    good = SRS([SECRET.encode()], "example.org").forward("erin@sender.test")
    forged = good.replace("erin", "mallory")
    wrong_secret = SRS([b"not-our-secret-0123456789"], "example.org").forward("erin@sender.test")
    expired = SRS([SECRET.encode()], "example.org",
                  clock=lambda: time.time() - 22 * 86400).forward("erin@sender.test")
    with connect(server.port) as client:
        client.ehlo("mx.remote.test")
        assert client.mail("<>")[0] == 250
        for address, reason in ((forged, "invalid SRS hash"), (wrong_secret, "invalid SRS hash"),
                                (expired, "expired SRS address")):
            code, text = client.rcpt(f"<{address}>")
            assert (code, text.decode().split(" ", 1)[0]) == (550, "5.7.1"), (address, text)
            assert reason in text.decode()
        # One day younger than the limit (21 days old) is still good.
        young = SRS([SECRET.encode()], "example.org",
                    clock=lambda: time.time() - 21 * 86400).forward("erin@sender.test")
        assert client.rcpt(f"<{young}>")[0] == 250
        client.rset()
    assert "refused recipient" in server.log_text() and "expired SRS address" in server.log_text()
