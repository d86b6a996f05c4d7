"""
rspamd as the content filter, end to end: Debian's rspamd started once for the module on a
loopback port (tests/support/rspamd.py: its thresholds and test symbols are fixed there), a
real twistd sending each message to it, smtplib as the client.  Then an rspamd that is down
(a closed port) and one that never answers (a socket nobody accepts on), with each
``on_failure``.
"""

from __future__ import annotations

import http.server
import re
import smtplib
import socket
import ssl
import sys
import threading
import time

import pytest

from support.certs import self_signed
from support.harness import REPO, DNSServer, MailServer, free_port, wait_for
from support.mail import connect, send_mail
from support.rspamd import RspamdServer, rspamd_missing

sys.path.insert(0, str(REPO))
from mailsrv.accounts.auth import hash_password  # noqa: E402  (the checkout's, like the server)

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    server = DNSServer(tmp_path_factory.mktemp("dns"), {"records": {}})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory, dns):
    why = rspamd_missing()
    if why is not None:
        pytest.skip(why)
    server = RspamdServer(tmp_path_factory.mktemp("rspamd"), dns.port)
    yield server
    server.stop()


PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def server(tmp_path_factory, dns, rspamd):
    work = tmp_path_factory.mktemp("mailsrv")
    cert, key = self_signed(["mx.example.org"], work)
    mailsrv = MailServer(
        work, dns.port,
        users=[f"alice@example.org:{hash_password(PASSWORD, cost=4)}", "bob@example.org",
               "carol@example.net"],
        overrides={"rspamd": {"url": rspamd.url, "timeout": 10},
                   "smtp": {"auth": True}, "tls": {"cert": str(cert), "key": str(key)}})
    mailsrv.start()
    yield mailsrv
    mailsrv.stop()


def message(subject: str, body: str = "Hello, lunch at noon?", extra: str = "",
            sender: str = "someone@remote.test") -> bytes:
    return (f"From: {sender}\r\nTo: x@example.org\r\nSubject: {subject}\r\n"
            f"Date: Thu, 03 Dec 2026 08:00:00 +0000\r\nMessage-ID: <{time.time()}@remote.test>\r\n"
            f"{extra}\r\n{body}\r\n").encode()


def refusal(port: int, rcpt: str, data: bytes) -> tuple[int, str]:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_mail(port, "someone@remote.test", [rcpt], data)
    return refused.value.smtp_code, refused.value.smtp_error.decode()


@pytest.mark.parametrize("subject, body, code, text", [
    ("gtube", GTUBE, 550, "5.7.1 Error: message refused as spam: Gtube pattern"),
    ("mailsrv-test-reject", "x", 550, "5.7.1 Error: message refused as spam: mailsrv test: "
                                      "not wanted here"),
    ("mailsrv-test-soft", "x", 451, "4.7.1 Error: message deferred by the spam filter: mailsrv "
                                    "test: come back later"),
])
def test_reject_and_soft_reject_refuse_with_rspamds_message(server, subject, body, code, text):
    assert refusal(server.port, "carol@example.net", message(subject, body)) == (code, text)
    assert server.messages("carol@example.net") == []
    log = server.log_text()
    assert re.search(r"rspamd id=\w+ action=\"(soft )?reject\" score=[\d.]+/[\d.]+", log)
    assert re.search(r"refused message id=\w+ .* check=rspamd reason=\"rspamd", log)


def test_a_clean_message_is_delivered_with_rspamds_fields(server, rspamd):
    send_mail(server.port, "someone@remote.test", ["alice@example.org"], message("lunch"))
    [msg] = server.messages("alice@example.org")
    assert msg["X-Spam-Status"].startswith("No, score=")
    assert msg["X-Spam"] is None
    assert list(server.mailbox_path("alice@example.org").glob(".Junk/new/*")) == []
    queue_id = re.search(r"rspamd id=(\w+) action=\"no action\" score=", server.log_text())[1]
    # rspamd saw the envelope and the client (its log names them).
    line = rspamd_line(rspamd, queue_id)
    assert "ip: 127.0.0.1" in line and "from: <someone@remote.test>" in line
    assert "rcpts: <alice@example.org>" in line


def test_add_header_files_into_junk_with_the_fields_and_removes_forged_ones(server):
    forged = "X-Spam-Status: No, score=-100 (forged)\r\nX-Spam: No\r\n"
    send_mail(server.port, "someone@remote.test", ["bob@example.org"],
              message("mailsrv-test-junk", extra=forged))
    assert server.messages("bob@example.org") == []  # not in the INBOX
    junk = server.maildir("bob@example.org").get_folder("Junk")
    [msg] = list(junk)
    assert msg["X-Spam"] == "Yes"
    assert msg.get_all("X-Spam-Status") == [msg["X-Spam-Status"]]
    assert msg["X-Spam-Status"].startswith("Yes, score=6")
    # The sender's own claims are renamed in place, same length, never trusted.
    assert msg["X-Removed-X-S"] == "No, score=-100 (forged)"
    assert msg["X-Remo"] == "No"
    assert re.search(r'rspamd id=\w+ action="add header" score=6[\d.]+/100.00', server.log_text())


def rspamd_line(rspamd: RspamdServer, queue_id: str) -> str:
    """rspamd's log line of the result for our queue id."""
    def found():
        return next((line for line in rspamd.log_text().splitlines()
                     if queue_id in line and "(default: " in line), None)
    return wait_for(found, 5, "rspamd's log line")


def test_an_authenticated_users_mail_is_sent_with_the_user_name(server, rspamd):
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed
    with connect(server.port) as client:
        client.starttls(context=context)
        client.ehlo()
        client.login("alice@example.org", PASSWORD)
        client.sendmail("alice@example.org", ["someone@remote.test"],
                        message("report", sender="alice@example.org"))
    queue_id = re.findall(r"rspamd id=(\w+) action=\"no action\"", server.log_text())[-1]
    assert "user: alice@example.org" in rspamd_line(rspamd, queue_id)


class Silent:
    """A loopback socket that accepts connections (the kernel's backlog) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


class NotRspamd:
    """An HTTP server on loopback that answers /checkv2 with what rspamd never would."""

    def __init__(self, status: int, body: bytes) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


FAILING = {
    "down": (None, "refused"),
    "slow": (Silent, "no answer within 1 s"),
    "garbage": (lambda: NotRspamd(200, b"<html>not json</html>"), "unreadable reply: not JSON"),
    "error": (lambda: NotRspamd(500, b"Internal error"), "HTTP 500 Internal error"),
}


@pytest.mark.parametrize("on_failure", ["accept", "tempfail"])
@pytest.mark.parametrize("kind", list(FAILING))
def test_no_answer_follows_on_failure(tmp_path, dns, kind, on_failure):
    make, reason = FAILING[kind]
    silent = make() if make else None
    url = silent.url if silent else f"http://127.0.0.1:{free_port(['127.0.0.1'])}"
    server = MailServer(tmp_path, dns.port, overrides={
        "rspamd": {"url": url, "timeout": 1, "on_failure": on_failure}})
    server.start()
    try:
        started = time.monotonic()
        if on_failure == "accept":
            send_mail(server.port, "someone@remote.test", ["alice@example.org"],
                      message("hello"))
            assert len(server.messages("alice@example.org")) == 1
        else:
            assert refusal(server.port, "alice@example.org", message("hello")) == (
                451, "4.7.1 Error: the spam filter cannot check the message now; "
                     "try again later")
            assert server.messages("alice@example.org") == []
        took = time.monotonic() - started
        log = server.log_text()
        found = re.search(r"rspamd id=\w+ failed: (.*) time=([\d.]+) on_failure=(\w+)", log)
        assert found and found[3] == on_failure, log
        assert reason in found[1], found[1]
        assert 0.9 < took < 5 if kind == "slow" else took < 2
    finally:
        server.stop()
        if silent:
            silent.close()
