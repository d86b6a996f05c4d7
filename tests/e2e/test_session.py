"""SMTP sessions against a running `twistd -n mailsrv`: commands, sequencing, replies."""

import os
import re
import socket
import stat

import pytest

from support.harness import wait_for
from support.mail import connect, send_mail

MESSAGE = b"From: Bob <bob@client.test>\r\nTo: alice@example.org\r\nSubject: hello\r\n\r\nHi Alice.\r\n"


def test_message_is_delivered_into_the_maildir(mail_server):
    with connect(mail_server.port) as client:
        client.ehlo("client.test")
        client.mail("bob@client.test")
        client.rcpt("alice@example.org")
        code, text = client.data(MESSAGE)
    assert code == 250
    queue_id = re.fullmatch(rb"2\.0\.0 Ok: queued as (\S+)", text).group(1).decode()
    [msg] = [m for m in mail_server.messages("alice@example.org") if queue_id in m["Received"]]
    assert msg["Return-Path"] == "<bob@client.test>"
    assert msg["Subject"] == "hello"
    assert msg.get_payload() == "Hi Alice.\n"
    received = " ".join(msg["Received"].split())
    # A loopback client is not looked up in the DNS (its name is no news).
    assert received.startswith("from client.test (unknown [127.0.0.1]) by mx.example.org")
    assert f"with ESMTP id {queue_id}" in received
    assert "for <alice@example.org>;" in received
    assert re.fullmatch(r"<[^<>@\s]+@mx\.example\.org>", msg["Message-ID"])


def test_maildir_modes_and_file_name(mail_server):
    send_mail(mail_server.port, "bob@client.test", ["bob@example.org"], MESSAGE)
    box = mail_server.root / "example.org" / "bob"
    for sub in ("", "tmp", "new", "cur"):
        assert stat.S_IMODE(os.stat(box / sub).st_mode) == 0o700
    [name] = os.listdir(box / "new")
    assert stat.S_IMODE(os.stat(box / "new" / name).st_mode) == 0o600
    m = re.fullmatch(r"\d+\.M\d+P\d+Q\d+R[0-9a-f]+\.[^,/]+,S=(\d+)", name)
    assert m and int(m.group(1)) == os.path.getsize(box / "new" / name)
    assert os.listdir(box / "tmp") == []


def test_ehlo_advertises_what_is_implemented(mail_server):
    client = mail_server.connect()
    code, text = client.command("EHLO client.test")
    assert code == 250
    lines = text.split("\n")
    assert lines[0].startswith("mx.example.org Hello client.test")
    assert set(lines[1:]) == {"PIPELINING", "SIZE 26214400", "8BITMIME", "SMTPUTF8",
                              "ENHANCEDSTATUSCODES", "DSN", "CHUNKING", "BINARYMIME"}
    assert client.greeting[0] == 220 and "mx.example.org ESMTP" in client.greeting[1]


@pytest.mark.parametrize(
    "commands, expected",
    [
        (["MAIL FROM:<a@client.test>"], (503, "5.5.1")),                 # MAIL before HELO
        (["EHLO"], (501, "5.5.4")),                                      # EHLO without domain
        (["HELO"], (501, "5.5.4")),
        (["EHLO bad(host)"], (501, "5.5.4")),
        (["EHLO c.test", "RCPT TO:<alice@example.org>"], (503, "5.5.1")),  # RCPT before MAIL
        (["EHLO c.test", "MAIL FROM:<a@c.test>", "MAIL FROM:<a@c.test>"], (503, "5.5.1")),
        (["EHLO c.test", "MAIL FROM:<a@c.test>", "DATA"], (503, "5.5.1")),  # DATA without RCPT
        (["EHLO c.test", "DATA"], (503, "5.5.1")),
        (["EHLO c.test", "MAIL FROM:<a@c.test> FOO=bar"], (501, "5.5.4")),
        (["EHLO c.test", "MAIL FROM:<a@c.test> BODY=9BIT"], (501, "5.5.4")),
        (["EHLO c.test", "MAIL FROM:<a@c.test> SIZE=abc"], (501, "5.5.4")),
        (["HELO c.test", "MAIL FROM:<a@c.test> SIZE=10"], (501, "5.5.4")),  # no EHLO, no params
        (["EHLO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<alice@example.org> NOTIFY=NEVER,DELAY"],
         (501, "5.5.4")),
        (["EHLO c.test", "MAIL FROM:a@c.test b"], (501, "5.5.4")),
        (["EHLO c.test", "MAIL FROM:<a@@c.test>"], (553, "5.1.7")),
        (["EHLO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<>"], (553, "5.1.3")),
        (["EHLO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<nobody@example.org>"], (550, "5.1.1")),
        (["EHLO c.test", "MAIL FROM:<a@c.test> SIZE=26214401"], (552, "5.3.4")),
        (["EHLO c.test", "DATA extra"], (501, "5.5.4")),
        (["FOO"], (500, "5.5.2")),
        (["BDAT 0 LAST"], (503, "5.5.1")),                              # CHUNKING: no MAIL
        (["EHLO c.test", "BDAT 1x"], (501, "5.5.4")),
        (["STARTTLS"], (502, "5.5.1")),                                 # no certificate: not offered
        (["AUTH PLAIN AGFAYg=="], (503, "5.5.1")),                      # no AUTH on this listener
        (["EXPN sales"], (502, "5.5.1")),
        (["VRFY"], (501, "5.5.4")),
        (["NOOP"], (250, "2.0.0")),
        (["RSET"], (250, "2.0.0")),
        (["VRFY alice"], (252, "2.5.0")),
        (["HELP"], (214, "2.0.0")),
        (["EHLO c.test", "MAIL FROM:<> SIZE=26214400 BODY=8BITMIME"], (250, "2.1.0")),
        (["EHLO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<alice@example.org>"], (250, "2.1.5")),
        (["mail from:<a@c.test>"], (503, "5.5.1")),
        (["NOOP \x01"], (500, "5.5.2")),
        ("EHLO c.test\nMAIL FROM:<\xe9@c.test>".split("\n"), (553, "5.6.7")),  # no SMTPUTF8
        ("EHLO c.test\nNOOP \xe9".split("\n"), (500, "5.5.2")),  # 8 bits outside MAIL/RCPT
    ],
)
def test_reply_codes(mail_server, commands, expected):
    client = mail_server.connect()
    for command in commands[:-1]:
        code, _ = client.command(command.encode("latin-1"))
        assert code < 400, command
    code, text = client.command(commands[-1].encode("latin-1"))
    assert (code, text[:5]) == expected, text
    assert client.command("QUIT")[0] == 221


def test_session_can_send_two_messages_and_reset(mail_server):
    client = mail_server.connect()
    client.command("EHLO c.test")
    for n in range(2):
        assert client.command("MAIL FROM:<a@c.test>")[0] == 250
        assert client.command("RCPT TO:<carol@example.net>")[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: n%d\r\n\r\nbody\r\n.\r\n" % n)
        assert client.reply()[0] == 250
    assert client.command("MAIL FROM:<a@c.test>")[0] == 250
    assert client.command("RSET")[0] == 250
    assert client.command("RCPT TO:<carol@example.net>")[0] == 503
    subjects = sorted(m["Subject"] for m in mail_server.messages("carol@example.net"))
    assert subjects[-2:] == ["n0", "n1"]


def test_pipelining_replies_in_order_and_after_data(mail_server):
    client = mail_server.connect()
    client.command("EHLO c.test")
    client.send(
        b"MAIL FROM:<p@c.test>\r\nRCPT TO:<nobody@example.org>\r\n"
        b"RCPT TO:<carol@example.net>\r\nDATA\r\n"
    )
    assert [client.reply()[0] for _ in range(4)] == [250, 550, 250, 354]
    # The end of data, a whole second transaction and QUIT in one packet.
    client.send(
        b"Subject: piped 1\r\n\r\none\r\n.\r\nMAIL FROM:<p@c.test>\r\n"
        b"RCPT TO:<carol@example.net>\r\nDATA\r\n"
    )
    assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    client.send(b"Subject: piped 2\r\n\r\ntwo\r\n.\r\nQUIT\r\n")
    assert [client.reply()[0] for _ in range(2)] == [250, 221]
    subjects = {m["Subject"] for m in mail_server.messages("carol@example.net")}
    assert {"piped 1", "piped 2"} <= subjects


def test_message_without_header_section_gets_a_well_formed_one(mail_server):
    client = mail_server.connect()
    for command in ("HELO c.test", "MAIL FROM:<a@c.test>", "RCPT TO:<bob@example.org>", "DATA"):
        client.command(command)
    code, text = client.command(b"just a body line, no headers\r\nsecond line\r\n.")
    assert code == 250
    qid = text.split()[-1]
    [msg] = [m for m in mail_server.messages("bob@example.org") if qid in m["Received"]]
    assert msg.defects == []
    assert msg.get_payload() == "just a body line, no headers\nsecond line\n"
    assert msg["Message-ID"] and "with SMTP id" in " ".join(msg["Received"].split())


def test_existing_message_id_is_kept(mail_server):
    body = b"Message-ID: <keep.me@client.test>\r\nSubject: k\r\n\r\nx\r\n"
    send_mail(mail_server.port, "a@c.test", ["bob@example.org"], body)
    ids = [m["Message-ID"] for m in mail_server.messages("bob@example.org")]
    assert ids.count("<keep.me@client.test>") == 1


def test_helo_cannot_inject_headers(mail_server):
    client = mail_server.connect()
    assert client.command("EHLO evil.test\tX-Injected: yes")[0] == 250
    for command in ("MAIL FROM:<a@c.test>", "RCPT TO:<bob@example.org>", "DATA"):
        client.command(command)
    code, text = client.command(b"Subject: inj\r\n\r\nx\r\n.")
    assert code == 250
    qid = text.split()[-1]
    [msg] = [m for m in mail_server.messages("bob@example.org") if qid in m["Received"]]
    assert msg["X-Injected"] is None
    assert len(msg.get_all("Received")) == 1
    for helo in ("EHLO a(b", "EHLO a;b", "EHLO a)b", "EHLO <a>", "EHLO " + "a" * 256):
        assert client.command(helo.encode())[0] == 501


def test_log_lines_for_accepted_message(mail_server):
    client = mail_server.connect()
    for command in ("EHLO c.test", "MAIL FROM:<logger@c.test>", "RCPT TO:<sales@example.org>",
                    "DATA"):
        client.command(command)
    code, text = client.command(b"Subject: log\r\n\r\nx\r\n.")
    qid = text.split()[-1]
    log = mail_server.log_text()
    assert re.search(
        rf"accepted id={qid} client=unknown\[127\.0\.0\.1\] helo=c\.test "
        rf"from=<logger@c\.test> size=\d+ nrcpt=2", log)
    for rcpt in ("alice@example.org", "bob@example.org"):
        assert re.search(rf"delivered id={qid} to=<{rcpt}> orig_to=<sales@example.org> "
                         rf"mailbox=\S+ status=sent", log)


def test_loopback_client_is_not_looked_up_in_the_dns(make_server):
    """Local sendmail must not wait for a DNS server that is down: no PTR query is made for a
    loopback client, whose banner comes at once (the in-process tests cover the wait)."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # receives the queries, answers none
    try:
        server = make_server(overrides={"relay": {
            "trusted_networks": [], "dns_servers": [f"127.0.0.1:{silent.getsockname()[1]}"]}}
        ).start()
        client = server.connect()
        assert client.greeting[0] == 220
        assert client.command("EHLO c.test")[0] == 250
        client.command("QUIT")
        silent.settimeout(0.5)
        with pytest.raises(socket.timeout):
            silent.recvfrom(512)
    finally:
        silent.close()


def test_dns_queries_leave_no_lines_in_the_log(make_server):
    """twisted.names' UDP ports log their start and stop; one MX lookup must log nothing."""
    server = make_server().start()
    send_mail(server.port, "", ["someone@nowhere.test"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: "relay id=" in server.log_text(), 20, "the MX lookup of nowhere.test")
    log = server.log_text()
    for noise in ("UDP Port", "DNSDatagramProtocol", "Starting protocol", "Stopping protocol"):
        assert noise not in log
