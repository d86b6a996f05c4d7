"""
End-to-end relaying: mailsrv's queue and relayer against a real DNS server and real SMTP
servers on 127.0.0.x, all on loopback.

Every MX host of the test zone listens on the same port (the relayer uses one port for all MX
hosts, ``relay.port``), on its own loopback address.  127.0.0.5 is an MX host with nothing
listening (connection refused).
"""

from __future__ import annotations

import email
import email.policy
import json
import time

import pytest

from support.certs import make_ca
from support.harness import DNSServer, MailServer, SMTPSink, free_port, wait_for
from support.mail import send_mail

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7"]

ZONE = {
    "records": {
        "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
        "client.test": [["A", "127.0.0.1"]],
        "remote.test": [["MX", 10, "mx1.remote.test"], ["MX", 20, "mx2.remote.test"]],
        "mx1.remote.test": [["A", "127.0.0.2"]],
        "mx2.remote.test": [["A", "127.0.0.3"]],
        "fallback.test": [["MX", 10, "dead.fallback.test"], ["MX", 20, "mx2.remote.test"]],
        "dead.fallback.test": [["A", "127.0.0.5"]],
        "implicit.test": [["A", "127.0.0.4"]],
        "nullmx.test": [["MX", 0, "."]],
        "loop.test": [["MX", 10, "mx.example.org"]],
        "mx.example.org": [["A", "127.0.0.1"]],
        "tls.test": [["MX", 10, "mx.tls.test"]],
        "mx.tls.test": [["A", "127.0.0.6"]],
        "verify.test": [["MX", 10, "mx.tls.test"]],
        "plain-verify.test": [["MX", 10, "mx1.remote.test"]],
        "smarthost.test": [["A", "127.0.0.7"]],
    },
    "servfail": ["broken.test"],
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """DNS, the sinks (one per MX address, all on one port), and the certificates."""
    work = tmp_path_factory.mktemp("relay")
    dns = DNSServer(work, ZONE)
    port = free_port(HOSTS)
    ca = make_ca(work)
    tls_cert = ca.issue(["mx.tls.test"], work)
    smart_cert = ca.issue(["smarthost.test"], work)
    sinks = {
        "mx1": SMTPSink(work / "mx1", "127.0.0.2", hostname="mx1.remote.test", port=port),
        "mx2": SMTPSink(work / "mx2", "127.0.0.3", hostname="mx2.remote.test", port=port),
        "implicit": SMTPSink(work / "implicit", "127.0.0.4", hostname="implicit.test", port=port),
        "tls": SMTPSink(work / "tls", "127.0.0.6", hostname="mx.tls.test", port=port,
                        tls=tls_cert),
        "smart": SMTPSink(work / "smart", "127.0.0.7", hostname="smarthost.test", port=port,
                          tls=smart_cert,
                          auth={"user": "relay@example.org", "password": "s3cret pw",
                                "require": True}),
    }
    yield {"dns": dns, "port": port, "sinks": sinks, "ca": ca, "work": work}
    for sink in sinks.values():
        sink.stop()
    dns.stop()


FAST_RETRY = {"retry_schedule": [1], "max_age": 3600}


@pytest.fixture
def server(env, tmp_path):
    servers = []

    def make(queue=None, relay=None, **kwargs):
        workdir = tmp_path / f"s{len(servers)}"
        workdir.mkdir()
        overrides = {"queue": dict(FAST_RETRY, **(queue or {})),
                     "relay": dict({"port": env["port"]}, **(relay or {}))}
        s = MailServer(workdir, env["dns"].port, overrides=overrides, **kwargs)
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.stop()


def send(server: MailServer, sender: str, recipients: list[str], subject: str = "hello",
         body: str = "Hello there.\r\n.leading dot line\r\n") -> None:
    message = f"From: <{sender or 'nobody@example.org'}>\r\nSubject: {subject}\r\n\r\n{body}"
    send_mail(server.port, sender, recipients, message.encode(), timeout=20)


def queue_files(server: MailServer) -> list[str]:
    return sorted(p.name for p in (server.queue / "messages").iterdir())


def queue_empty(server: MailServer) -> bool:
    return queue_files(server) == []


def dsns(server: MailServer, address: str = "alice@example.org") -> list[email.message.EmailMessage]:
    found = []
    for message in server.messages(address):
        parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
        if parsed.get_content_type() == "multipart/report":
            found.append(parsed)
    return found


def delivery_status(dsn) -> list:
    [status_part] = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"]
    return status_part.get_payload()


def sink_for(env, name: str) -> SMTPSink:
    return env["sinks"][name]


def new_messages(sink: SMTPSink, before: int, count: int) -> list[dict]:
    return sink.wait_for_messages(before + count)[before:]


def test_delivers_to_best_mx_with_trace_and_dot_lines(env, server):
    s = server()
    mx1 = sink_for(env, "mx1")
    before = len(mx1.messages())
    send(s, "alice@example.org", ["bob@remote.test"], subject="best mx")
    [got] = new_messages(mx1, before, 1)
    assert got["mail_from"] == "alice@example.org"
    assert got["rcpt_to"] == ["bob@remote.test"]
    assert got["helo"] == "mx.example.org"
    data = got["data"]
    assert data.startswith("Received: from client.test")
    assert "Return-Path:" not in data  # added by the final delivery, not by a relay
    assert "Delivered-To:" not in data
    assert "Subject: best mx" in data
    assert "\n.leading dot line" in data.replace("\r\n", "\n")  # dot-stuffed on the wire
    wait_for(lambda: queue_empty(s), 10, "the queue to empty")
    assert "to=<bob@remote.test> relay=mx1.remote.test[127.0.0.2]" in s.log_text()
    assert "status=sent" in s.log_text()


def test_next_mx_when_first_refuses_connections(env, server):
    s = server()
    mx2 = sink_for(env, "mx2")
    before = len(mx2.messages())
    send(s, "alice@example.org", ["carl@fallback.test"], subject="fallback")
    [got] = new_messages(mx2, before, 1)
    assert got["rcpt_to"] == ["carl@fallback.test"]
    wait_for(lambda: queue_empty(s), 10, "the queue to empty")
    assert "dead.fallback.test[127.0.0.5]" in s.log_text()


def test_implicit_mx(env, server):
    s = server()
    sink = sink_for(env, "implicit")
    before = len(sink.messages())
    send(s, "alice@example.org", ["dan@implicit.test"])
    [got] = new_messages(sink, before, 1)
    assert got["rcpt_to"] == ["dan@implicit.test"]


def test_mixed_results_in_one_transaction_then_retry(env, server):
    s = server()
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"rcpt": [["^bad@", "550 5.1.1 <bad@remote.test>: user unknown"],
                            ["^later@", "451 4.2.1 mailbox busy, try later"]]})
    try:
        before = len(mx1.messages())
        send(s, "alice@example.org", ["ok@remote.test", "bad@remote.test", "later@remote.test"],
             subject="mixed")
        [first] = new_messages(mx1, before, 1)
        assert first["rcpt_to"] == ["ok@remote.test"]
        # The 5xx recipient comes back to alice as a DSN with the remote server's words.
        [dsn] = wait_for(lambda: dsns(s), 15, "the DSN")
        assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.org"
        groups = delivery_status(dsn)
        assert groups[1]["Final-Recipient"].endswith("bad@remote.test")
        assert groups[1]["Action"] == "failed" and groups[1]["Status"] == "5.1.1"
        assert "user unknown" in str(groups[1]["Diagnostic-Code"])
        assert len(groups) == 2  # ok and later are not in it
        # The 4xx one is retried and arrives once the server accepts it.
        def later_state():
            envelope = json.loads(next((s.queue / "messages").glob("*.json")).read_text())
            [later] = [r for r in envelope["recipients"] if r["address"] == "later@remote.test"]
            return later if later["attempts"] else None

        # The DSN is stored before the new state is written: wait for the state too.
        later = wait_for(later_state, 10, "the deferral to be recorded")
        assert later["status"] == "queued" and "451 4.2.1" in later["last_error"]
        mx1.set_rules({})
        [second] = new_messages(mx1, before + 1, 1)
        assert second["rcpt_to"] == ["later@remote.test"]
        wait_for(lambda: queue_empty(s), 10, "the queue to empty")
    finally:
        mx1.set_rules({})
    assert len(dsns(s)) == 1
    log = s.log_text()
    assert "to=<later@remote.test>" in log and "status=deferred" in log
    assert "status=bounced" in log


@pytest.mark.parametrize(
    "domain, status",
    [("nullmx.test", "5.1.10"), ("nowhere.test", "5.1.2"), ("loop.test", "5.4.6")],
)
def test_dns_failures_bounce(env, server, domain, status):
    s = server()
    send(s, "alice@example.org", [f"x@{domain}"])
    [dsn] = wait_for(lambda: dsns(s), 15, "the DSN")
    groups = delivery_status(dsn)
    assert groups[1]["Status"] == status
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    wait_for(lambda: queue_empty(s), 10, "the queue to empty")


@pytest.mark.parametrize("literal", ["[127.0.0.1]", "[IPv6:::1]", "[0.0.0.0]"])
def test_address_literal_naming_this_host_bounces_at_once(env, server, literal):
    """Item 15: a literal naming ourselves is a loop (5.4.6), never queued for days."""
    s = server()
    send(s, "alice@example.org", [f"x@{literal}"])
    [dsn] = wait_for(lambda: dsns(s), 15, "the DSN")
    groups = delivery_status(dsn)
    assert groups[1]["Final-Recipient"].endswith(f"x@{literal}")
    assert groups[1]["Status"] == "5.4.6" and groups[1]["Action"] == "failed"
    assert "loops back to myself" in str(groups[1]["Diagnostic-Code"])
    wait_for(lambda: queue_empty(s), 10, "the queue to empty")
    log = s.log_text()
    assert "status=deferred" not in log and "tries=1 status=bounced" in log


def test_own_address_check_and_literal_destinations():
    import ipaddress

    from mailsrv.outbound.mx import DestinationError, is_own_address, resolve_destination

    for own in ("127.0.0.1", "127.0.0.53", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1"):
        assert is_own_address(ipaddress.ip_address(own)), own
    for other in ("192.0.2.77", "2001:db8::7", "224.0.0.1", "255.255.255.255"):
        assert not is_own_address(ipaddress.ip_address(other)), other
    failures = []
    resolve_destination(None, "[IPv6:::1]").addErrback(failures.append)
    [failure] = failures
    assert failure.check(DestinationError)
    assert failure.value.permanent and failure.value.status == "5.4.6"
    [host] = resolve_destination(None, "[192.0.2.77]").result
    assert host.addresses == ("192.0.2.77",)


def test_servfail_defers(env, server):
    s = server()
    send(s, "alice@example.org", ["x@broken.test"])

    def attempted():
        files = list((s.queue / "messages").glob("*.json"))
        if not files:
            return None
        r = json.loads(files[0].read_text())["recipients"][0]
        return r if r["attempts"] >= 2 else None

    r = wait_for(attempted, 30, "two attempts")
    assert r["status"] == "queued" and "4.4.3" in r["last_error"]
    assert dsns(s) == []


def test_failed_bounce_goes_to_the_postmaster(env, server):
    """Item 11: a DSN to a remote sender refused with 550 -> the postmaster's Maildir."""
    s = server()
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"rcpt": [["^sender@", "550 5.1.1 <sender@remote.test>: no such user"]]})
    try:
        send(s, "sender@remote.test", ["x@nowhere.test"], subject="lost cause")
        # NXDOMAIN bounces the original; its DSN (from <>) is refused: postmaster hears.
        [notice] = wait_for(lambda: dsns(s), 15, "the double bounce")
        wait_for(lambda: queue_empty(s), 10, "the queue to empty")
    finally:
        mx1.set_rules({})
    assert notice["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert notice["To"].addresses[0].addr_spec == "postmaster@example.org"
    groups = delivery_status(notice)
    assert groups[1]["Final-Recipient"] == "rfc822; sender@remote.test"
    assert groups[1]["Status"] == "5.1.1" and "no such user" in str(groups[1]["Diagnostic-Code"])
    [headers] = [p for p in notice.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert "Subject: Undelivered Mail Returned to Sender" in headers.get_payload()
    # The line is logged back on the reactor after the thread stored the notice and emptied
    # the queue: wait for it rather than race it (it failed about 1 run in 15 under load).
    wait_for(lambda: "double bounce delivered to <postmaster@example.org>" in s.log_text(), 5,
             "the double bounce's log line")
    time.sleep(1)
    assert len(dsns(s)) == 1 and s.messages("bob@example.org") == []


def test_failed_double_bounce_is_only_logged(env, server):
    """The postmaster's notice (here for a remote postmaster) failing in turn is dropped."""
    s = server(aliases=["postmaster: pm@remote.test"])
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"rcpt": [["^(gone|pm)@", "550 5.1.1 no such user"]]})
    try:
        before = len(mx1.messages())
        send(s, "", ["gone@remote.test"])
        wait_for(lambda: "postmaster's notice of a failed bounce; dropped" in s.log_text(), 15,
                 "the double bounce to fail")
        wait_for(lambda: queue_empty(s), 10, "the queue to empty")
        time.sleep(2)  # a loop would show up now
        assert queue_empty(s) and len(mx1.messages()) == before
    finally:
        mx1.set_rules({})
    log = s.log_text()
    assert log.count("double bounce") == 1 and "queued for <postmaster@example.org>" in log
    assert log.count(" to=<pm@remote.test> relay=") == 1
    assert log.count(" to=<gone@remote.test> relay=") == 1
    for user in ("alice", "bob"):
        assert s.messages(f"{user}@example.org") == []


def test_expiry_bounce(env, server):
    s = server(queue={"retry_schedule": [1], "max_age": 3})
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"rcpt": [["^slow@", "452 4.2.2 mailbox full"]]})
    try:
        send(s, "alice@example.org", ["slow@remote.test"])
        [dsn] = wait_for(lambda: dsns(s), 20, "the expiry DSN")
    finally:
        mx1.set_rules({})
    groups = delivery_status(dsn)
    assert groups[1]["Status"] == "4.4.7"
    assert "expired" in str(groups[1]["Diagnostic-Code"])
    assert "mailbox full" in str(groups[1]["Diagnostic-Code"])
    wait_for(lambda: queue_empty(s), 10, "the queue to empty")


def test_delay_warning_once(env, server):
    s = server(queue={"retry_schedule": [1], "delay_warning": 1})
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"rcpt": [["^wait@", "451 4.3.0 later"]]})
    try:
        send(s, "alice@example.org", ["wait@remote.test"])
        [dsn] = wait_for(lambda: dsns(s), 20, "the delay warning")
        assert dsn["Subject"] == "Delayed Mail (still being retried)"
        assert delivery_status(dsn)[1]["Action"] == "delayed"
        time.sleep(3)  # more failed attempts, but one warning only
        assert len(dsns(s)) == 1
    finally:
        mx1.set_rules({})
    wait_for(lambda: queue_empty(s), 10, "the queue to empty")


def send_bytes(server: MailServer, sender: str, recipients: list[str], data: bytes) -> None:
    send_mail(server.port, sender, recipients, data, timeout=20, mail_options=["BODY=8BITMIME"])


def raw_data(got: dict) -> bytes:
    return got["data"].encode("latin-1")  # the sink keeps the octets as latin-1 text


def test_size_parameter_and_a_message_over_the_servers_limit(env, server):
    """Item 10: SIZE= and BODY=8BITMIME go out; over the peer's SIZE, nothing is sent: 5.3.4."""
    s = server()
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"size": 10000})
    try:
        before, mails_before = len(mx1.messages()), len(mx1.mail_commands())
        big = "Subject: big\r\n\r\n" + ("x" * 70 + "\r\n") * 330  # ~23 KB
        send_bytes(s, "alice@example.org", ["big@remote.test"], big.encode())
        small = "Subject: small\r\n\r\nGrüße\r\n".encode()
        send_bytes(s, "alice@example.org", ["small@remote.test"], small)
        [got] = new_messages(mx1, before, 1)
        [dsn] = wait_for(lambda: dsns(s), 15, "the DSN")
        wait_for(lambda: queue_empty(s), 10, "the queue to empty")
    finally:
        mx1.set_rules({})
    assert got["rcpt_to"] == ["small@remote.test"]
    assert got["mail_params"] == {"SIZE": str(len(raw_data(got))), "BODY": "8BITMIME"}
    assert raw_data(got).endswith(small)  # 8 bits kept for a server that takes them
    # The big one was never offered: one MAIL command only, the small one's.
    [mail] = mx1.mail_commands()[mails_before:]
    assert mail.startswith("MAIL FROM:<alice@example.org> SIZE=")
    groups = delivery_status(dsn)
    assert groups[1]["Final-Recipient"].endswith("big@remote.test")
    assert groups[1]["Status"] == "5.3.4"
    assert "exceeds the size limit 10000 of mx1.remote.test" in str(groups[1]["Diagnostic-Code"])


EIGHT_BIT_MIME = """\
From: <alice@example.org>
Subject: 8 bits
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="b1"

--b1
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Grüße aus Köln, trailing space 
=20 is not an escape here
--b1
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

AAECAwQFBgcICQ==
--b1--
""".replace("\n", "\r\n").encode()


def test_8bit_message_to_a_server_without_8bitmime_is_converted(env, server):
    """Item 10: converted to quoted-printable; the decoded content is the original's."""
    s = server()
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"8bitmime": False})
    try:
        before = len(mx1.messages())
        send_bytes(s, "alice@example.org", ["q@remote.test"], EIGHT_BIT_MIME)
        [got] = new_messages(mx1, before, 1)
        wait_for(lambda: queue_empty(s), 10, "the queue to empty")
    finally:
        mx1.set_rules({})
    assert got["mail_params"] == {}
    data = raw_data(got)
    assert data.isascii() and data.startswith(b"Received: from client.test")
    original = email.message_from_bytes(EIGHT_BIT_MIME, policy=email.policy.default)
    converted = email.message_from_bytes(data, policy=email.policy.default)
    [text, attachment] = converted.iter_parts()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert [p.get_payload(decode=True) for p in converted.iter_parts()] == [
        p.get_payload(decode=True) for p in original.iter_parts()]
    assert text.get_content() == "Grüße aus Köln, trailing space \r\n=20 is not an escape here"
    assert attachment.get_content() == bytes(range(10))
    assert not [p for p in (s.queue / "incoming").iterdir() if ".7bit." in p.name]


def test_8bit_header_for_a_server_without_8bitmime_bounces_5_6_3(env, server):
    s = server()
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"8bitmime": False})
    try:
        mails_before = len(mx1.mail_commands())
        send_bytes(s, "alice@example.org", ["h@remote.test"],
                   "Subject: Grüße\r\n\r\nGrüße\r\n".encode())
        [dsn] = wait_for(lambda: dsns(s), 15, "the DSN")
    finally:
        mx1.set_rules({})
    assert delivery_status(dsn)[1]["Status"] == "5.6.3"
    assert len(mx1.mail_commands()) == mails_before


def test_opportunistic_starttls(env, server):
    s = server()
    sink = sink_for(env, "tls")
    before = len(sink.messages())
    send(s, "alice@example.org", ["t@tls.test"])
    [got] = new_messages(sink, before, 1)
    assert got["tls"] is True
    wait_for(lambda: "tls=TLSv1." in s.log_text(), 10, "the TLS log")


def test_verify_policy(env, server):
    s = server(relay={"tls_policy": {"verify.test": "verify", "plain-verify.test": "verify"},
                      "tls_ca_file": str(env["ca"].cert_path)})
    sink = sink_for(env, "tls")
    before = len(sink.messages())
    send(s, "alice@example.org", ["v@verify.test", "p@plain-verify.test"])
    [got] = new_messages(sink, before, 1)
    assert got["tls"] is True and got["rcpt_to"] == ["v@verify.test"]

    # mx1 offers no STARTTLS: with "verify" the message waits rather than go in clear.
    def deferred():
        for path in (s.queue / "messages").glob("*.json"):
            for r in json.loads(path.read_text())["recipients"]:
                if r["address"] == "p@plain-verify.test" and r["attempts"] >= 1:
                    return r
        return None

    r = wait_for(deferred, 15, "a deferral")
    assert r["status"] == "queued"
    assert "TLS" in r["last_error"]


def test_smarthost_with_auth(env, server, tmp_path):
    password = tmp_path / "smarthost-password"
    password.write_text("s3cret pw\n")
    s = server(relay={"smarthost": f"smarthost.test:{env['port']}",
                      "smarthost_user": "relay@example.org",
                      "smarthost_password_file": str(password),
                      "tls_ca_file": str(env["ca"].cert_path)})
    sink = sink_for(env, "smart")
    before = len(sink.messages())
    send(s, "alice@example.org", ["bob@remote.test", "eve@implicit.test"])
    [got] = new_messages(sink, before, 1)
    assert got["auth"] == "relay@example.org" and got["tls"] is True
    assert sorted(got["rcpt_to"]) == ["bob@remote.test", "eve@implicit.test"]
    wait_for(lambda: queue_empty(s), 10, "the queue to empty")
    assert "s3cret" not in s.log_text()


def test_corrupt_and_unfinished_files_at_start_up(env, server, tmp_path):
    s = server()
    s.stop()
    messages = s.queue / "messages"
    (messages / "AAAAAAAAAAAAAA.json").write_text("{not json")
    (messages / "AAAAAAAAAAAAAA.body").write_text("Subject: x\n\nbody\n")
    (messages / "BBBBBBBBBBBBBB.body").write_text("Subject: y\n\nunfinished\n")
    (messages / ".CCCCCCCCCCCCCC.json.tmp").write_text("{")
    loads = s.log_text().count("queue loaded")  # the first start's line is in the log too
    s.start()
    wait_for(lambda: s.log_text().count("queue loaded") > loads, 10, "the queue to load")
    assert sorted(p.name for p in (s.queue / "corrupt").iterdir()) == [
        "AAAAAAAAAAAAAA.body", "AAAAAAAAAAAAAA.json"]
    assert queue_empty(s)
    log = s.log_text()
    assert "moved AAAAAAAAAAAAAA.json to corrupt/" in log
    assert "removed BBBBBBBBBBBBBB.body" in log


def test_crash_with_deferred_mail_then_exactly_once(env, server):
    """SIGKILL with a queue full of deferred mail; after restart each message arrives once."""
    s = server(queue={"retry_schedule": [1]})
    mx2 = sink_for(env, "mx2")
    mx2.set_rules({"rcpt": [["^crash", "451 4.3.2 not now"]]})
    count = 30
    try:
        before = len(mx2.messages())
        for i in range(count):
            send(s, "alice@example.org", [f"crash{i}@fallback.test"], subject=f"crash {i}")

        def all_attempted():
            files = list((s.queue / "messages").glob("*.json"))
            envs = [json.loads(p.read_text()) for p in files]
            return len(envs) == count and all(e["recipients"][0]["attempts"] >= 1 for e in envs)

        wait_for(all_attempted, 60, "every message to be tried once")
        s.kill()
        mx2.set_rules({})
        s.start()
        got = new_messages(mx2, before, count)
        wait_for(lambda: queue_empty(s), 30, "the queue to empty")
        time.sleep(2)  # anything sent twice would show up now
    finally:
        mx2.set_rules({})
    subjects = [line for m in mx2.messages()[before:] for line in m["data"].splitlines()
                if line.startswith("Subject: crash ")]
    assert sorted(subjects) == sorted(f"Subject: crash {i}" for i in range(count))
    assert len(got) >= 1


def test_queue_command_flush_against_running_server(env, server):
    import subprocess
    import sys

    from support.harness import REPO, _env

    s = server(queue={"retry_schedule": [3600]})
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"rcpt": [["^flush@", "451 4.3.0 later"]]})
    try:
        send(s, "alice@example.org", ["flush@remote.test"])
        wait_for(lambda: "status=deferred" in s.log_text(), 15, "the deferral")
        before = len(mx1.messages())
        mx1.set_rules({})
        listing = subprocess.run(
            [sys.executable, "-m", "mailsrv.tools.cli", "queue", "--config", str(s.config_path), "list"],
            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=30,
        )
        assert "flush@remote.test" in listing.stdout, listing
        flushed = subprocess.run(
            [sys.executable, "-m", "mailsrv.tools.cli", "queue", "--config", str(s.config_path),
             "flush"], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=30,
        )
        assert flushed.returncode == 0 and flushed.stdout.startswith("ok"), flushed
        [got] = new_messages(mx1, before, 1)
        assert got["rcpt_to"] == ["flush@remote.test"]
    finally:
        mx1.set_rules({})


def test_queue_command_bounce_and_delete_against_running_server(env, server):
    import subprocess
    import sys

    from support.harness import REPO, _env

    s = server(queue={"retry_schedule": [3600]})
    mx1 = sink_for(env, "mx1")
    mx1.set_rules({"rcpt": [["^held", "451 4.3.0 later"]]})

    def queue_cmd(*args):
        return subprocess.run(
            [sys.executable, "-m", "mailsrv.tools.cli", "queue", "--config", str(s.config_path), *args],
            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=30)

    try:
        send(s, "alice@example.org", ["held1@remote.test"], subject="to bounce")
        send(s, "alice@example.org", ["held2@remote.test"], subject="to delete")
        wait_for(lambda: s.log_text().count("status=deferred") >= 2, 15, "two deferrals")
        ids = {json.loads(p.read_text())["recipients"][0]["address"]: p.stem
               for p in (s.queue / "messages").glob("*.json")}
        bounced = queue_cmd("bounce", ids["held1@remote.test"])
        assert bounced.returncode == 0 and bounced.stdout.startswith("ok: bounced"), bounced
        deleted = queue_cmd("delete", ids["held2@remote.test"])
        assert deleted.returncode == 0 and deleted.stdout.startswith("ok: deleted"), deleted
        wait_for(lambda: queue_empty(s), 10, "the queue to empty")
        [dsn] = wait_for(lambda: dsns(s), 10, "the DSN")
        assert "held1@remote.test" in dsn.as_string() and "held2" not in dsn.as_string()
        missing = queue_cmd("delete", ids["held2@remote.test"])
        assert missing.returncode == 1 and "error: no message" in missing.stdout
    finally:
        mx1.set_rules({})
