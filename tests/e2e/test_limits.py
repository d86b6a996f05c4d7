"""Every limit, at its edge and one past it, against a running server."""

import shutil
import socket
import ssl
import subprocess
import time

import pytest

from support.certs import make_ca
from support.harness import RawClient, wait_for
from support.procfs import rss_bytes


def send_slowly(client, pieces, interval):
    """Send pieces one by one, ``interval`` apart; the first reply that comes back, or None."""
    for piece in pieces:
        try:
            client.send(piece)
        except OSError:
            break
        client.sock.settimeout(interval)
        try:
            return client.reply()
        except socket.timeout:
            continue
    return None


def start_transaction(client, rcpt="bob@example.org"):
    assert client.command("EHLO c.test")[0] == 250
    assert client.command("MAIL FROM:<a@c.test>")[0] == 250
    assert client.command(f"RCPT TO:<{rcpt}>")[0] == 250


def test_command_line_of_512_octets_is_accepted_513_refused(mail_server):
    client = mail_server.connect()
    # "NOOP " + padding + CRLF = 512 octets exactly.
    assert client.command(b"NOOP " + b"a" * 505)[0] == 250
    assert client.command(b"NOOP " + b"a" * 506) == (500, "5.5.2 Error: command line too long")
    assert client.command("NOOP")[0] == 250


def test_rest_of_an_overlong_line_is_never_executed(mail_server):
    client = mail_server.connect()
    assert client.command("EHLO c.test")[0] == 250
    # What a naive server would cut at 512 octets and then run as a second command.
    client.send(b"NOOP " + b"a" * 507 + b"MAIL FROM:<x@c.test>\r\n")
    assert client.reply() == (500, "5.5.2 Error: command line too long")
    assert client.command("RCPT TO:<alice@example.org>")[:1] == (503,)


def test_endless_command_line_is_discarded_while_it_arrives(mail_server):
    client = mail_server.connect()
    client.send(b"X" * 600)
    assert client.reply()[0] == 500
    for _ in range(64):
        client.send(b"Y" * 65536)  # 4 MiB more of the same line: never buffered, no reply
    client.send(b"\r\nNOOP\r\n")
    assert client.reply()[0] == 250


def test_data_line_of_998_octets_passes_999_refused(mail_server):
    client = mail_server.connect()
    start_transaction(client)
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: long ok\r\n\r\n" + b"x" * 998 + b"\r\n.\r\n")
    assert client.reply()[0] == 250
    before = len(mail_server.messages("bob@example.org"))
    assert client.command("MAIL FROM:<a@c.test>")[0] == 250
    assert client.command("RCPT TO:<bob@example.org>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: long bad\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n")
    assert client.reply() == (500, "5.5.2 Error: message line longer than 1000 octets")
    assert client.command("NOOP")[0] == 250
    assert len(mail_server.messages("bob@example.org")) == before


def test_recipient_limit_one_past_edge(make_server):
    server = make_server(overrides={"smtp": {"max_recipients": 3}}).start()
    client = server.connect()
    start_transaction(client, "alice@example.org")
    assert client.command("RCPT TO:<bob@example.org>")[0] == 250
    assert client.command("RCPT TO:<carol@example.net>")[0] == 250
    assert client.command("RCPT TO:<sales@example.org>") == (452, "4.5.3 Error: too many recipients")
    assert client.command("DATA")[0] == 354
    assert client.command(b"Subject: three\r\n\r\nx\r\n.")[0] == 250
    # The limit is per transaction.
    assert client.command("MAIL FROM:<a@c.test>")[0] == 250
    for rcpt in ("alice@example.org", "bob@example.org", "carol@example.net"):
        assert client.command(f"RCPT TO:<{rcpt}>")[0] == 250


def test_idle_client_is_dropped(make_server):
    server = make_server(overrides={"smtp": {"idle_timeout": 1}}).start()
    client = server.connect()
    assert client.command("EHLO c.test")[0] == 250
    started = time.monotonic()
    assert client.reply() == (421, "4.4.2 Error: timeout exceeded; closing connection")
    assert client.closed()
    assert 0.8 < time.monotonic() - started < 10


def test_trickling_command_does_not_keep_the_session_alive(make_server):
    server = make_server(overrides={"smtp": {"idle_timeout": 1}}).start()
    client = server.connect()
    started = time.monotonic()
    # A byte every 0.3 s: 9 s for the whole line.
    reply = send_slowly(client, [bytes([b]) for b in b"EHLO a-very-slow-client.test\r\n"], 0.3)
    assert reply == (421, "4.4.2 Error: timeout exceeded; closing connection")
    assert time.monotonic() - started < 5


def test_trickling_data_is_cut_off_by_the_data_timeout(make_server):
    server = make_server(overrides={"smtp": {"idle_timeout": 1, "data_timeout": 2}}).start()
    client = server.connect()
    start_transaction(client)
    assert client.command("DATA")[0] == 354
    started = time.monotonic()
    # A line every 0.25 s keeps the session from being idle, never from the deadline.
    reply = send_slowly(client, [b"line %d\r\n" % n for n in range(40)], 0.25)
    assert reply == (421, "4.4.2 Error: timeout exceeded; closing connection")
    assert 1.5 < time.monotonic() - started < 8
    assert server.messages("bob@example.org") == []


def test_connection_limit_total(make_server):
    server = make_server(overrides={"smtp": {"max_connections": 3}}).start()
    clients = [server.connect() for _ in range(3)]
    assert all(c.greeting[0] == 220 for c in clients)
    extra = server.connect()
    assert extra.greeting == (421, "4.7.0 Error: too many connections; try again later")
    assert extra.closed()
    clients[0].command("QUIT")
    clients[0].closed()
    wait_for(lambda: RawClient(server.port).greeting[0] == 220, 10, "a free slot")


def test_connection_limit_per_client_address(make_server):
    server = make_server(overrides={
        "smtp": {"max_connections_per_ip": 2},
        "relay": {"trusted_networks": ["127.0.0.3/32"]},
    }).start()
    first, second = server.connect(), server.connect()
    third = server.connect()
    assert third.greeting == (
        421, "4.7.0 Error: too many connections from your address; try again later")
    # Another loopback address is another client.
    from_other = RawClient(server.port, source="127.0.0.2")
    assert from_other.greeting[0] == 220
    # Our own networks are held to the total only (Postfix exempts $mynetworks).
    trusted = [RawClient(server.port, source="127.0.0.3") for _ in range(3)]
    assert [c.greeting[0] for c in trusted] == [220] * 3
    for client in (first, second, third, from_other, *trusted):
        client.close()


def test_twenty_clients_from_one_address_are_served_by_default(make_server):
    """Postfix allows 50 connections per client; the 11th used to get 421."""
    server = make_server(overrides={"relay": {"trusted_networks": ["127.0.0.3/32"]}}).start()
    clients = [server.connect() for _ in range(20)]
    assert [c.greeting[0] for c in clients] == [220] * 20
    for client in clients:
        client.close()


def test_pipelined_recipients_past_the_limit_do_not_end_the_session(mail_server):
    """150 RCPTs in one go: 100 accepted, 50 told to come again (452), and the message with
    the 100 goes through; the 452s are no errors (they used to cut the session at 20)."""
    client = mail_server.connect()
    assert client.command("EHLO c.test")[0] == 250
    before = len(mail_server.messages("alice@example.org"))
    client.send(b"MAIL FROM:<a@c.test>\r\n" + b"RCPT TO:<alice@example.org>\r\n" * 150
                + b"DATA\r\n")
    assert client.reply()[0] == 250
    codes = [client.reply()[0] for _ in range(150)]
    assert codes == [250] * 100 + [452] * 50
    assert client.reply()[0] == 354
    assert client.command(b"Subject: many\r\n\r\nx\r\n.")[0] == 250
    assert len(mail_server.messages("alice@example.org")) == before + 1


def test_listen_backlog_follows_the_connection_limit(make_server):
    """Twisted's default listen queue is 50: a burst beyond it went unanswered.  ss shows a
    listening socket's backlog as its Send-Q."""
    if shutil.which("ss") is None:
        pytest.skip("ss is not installed (Debian's iproute2; .ci/run installs it)")
    server = make_server(overrides={"smtp": {
        "max_connections": 300,
        "listen": ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=7"],
    }}).start()
    ports = [port for _, _, port in server.listeners]

    def backlog(port):
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[2])

    assert backlog(ports[0]) == min(600, somaxconn())
    assert backlog(ports[1]) == 7  # the administrator's own value is kept


def somaxconn():
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


def test_too_many_errors_disconnects(mail_server):
    client = mail_server.connect()
    for _ in range(19):
        assert client.command("BOGUS")[0] == 500
    assert client.command("BOGUS") == (421, "4.7.0 Error: too many errors; closing connection")
    assert client.closed()


def test_unfinished_command_line_does_not_stall_other_clients(mail_server):
    slow = mail_server.connect()
    slow.send(b"EHL")  # no line end yet
    other = mail_server.connect(timeout=5)
    assert other.command("EHLO c.test")[0] == 250
    assert other.command("NOOP")[0] == 250
    slow.send(b"O c.test\r\n")
    assert slow.reply()[0] == 250


def read_reply(sock):
    """One reply, read byte by byte so that nothing after it is consumed."""
    data = b""
    while not (data.endswith(b"\r\n") and data.split(b"\r\n")[-2][3:4] == b" "):
        chunk = sock.recv(1)
        assert chunk, data
        data += chunk
    return data


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    work = tmp_path_factory.mktemp("certs")
    ca = make_ca(work)
    cert, key = ca.issue(["mx.example.org"], work)
    context = ca.client_context()
    return cert, key, context


@pytest.mark.parametrize("how", ["plain", "starttls", "implicit-tls"])
def test_client_that_reads_no_replies_is_not_buffered_without_limit(make_server, certificate, how):
    """A client with a small receive buffer pipelines NOOPs and never reads: the server stops
    reading from it once its replies pile up, instead of buffering ~23 bytes per byte sent."""
    cert, key, context = certificate
    server = make_server(overrides={
        "smtp": {"junk_command_limit": 10**9,
                 "listen": ["tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"]},
        "tls": {"cert": str(cert), "key": str(key)},
    }).start()
    server.connect().command("QUIT")  # warm up: one whole session
    before = rss_bytes(server.process.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port_of("smtp", tls=how == "implicit-tls")))
    if how == "implicit-tls":
        sock = context.wrap_socket(sock, server_hostname="mx.example.org")
    assert read_reply(sock).startswith(b"220 ")
    if how == "starttls":
        sock.sendall(b"EHLO c.test\r\n")
        assert read_reply(sock).startswith(b"250-")
        sock.sendall(b"STARTTLS\r\n")
        assert read_reply(sock).startswith(b"220 ")
        sock = context.wrap_socket(sock, server_hostname="mx.example.org")
    chunk = b"NOOP\r\n" * 10000
    total = 64 * 1024 * 1024  # more than all the kernel's socket buffers can hold
    limit = 50 * 1024 * 1024
    sent = growth = 0
    sock.settimeout(3)  # once the server no longer reads, a send blocks
    try:
        while sent < total and growth < limit:
            sock.sendall(chunk)
            sent += len(chunk)
            if sent % (20 * len(chunk)) == 0:
                growth = rss_bytes(server.process.pid) - before
    except (socket.timeout, ssl.SSLError):
        pass
    growth = rss_bytes(server.process.pid) - before
    assert growth < limit, (sent, growth)
    assert sent < total, "the server kept reading"
    assert "too many errors" not in server.log_text()
    # Everyone else is still served.
    assert server.connect().command("NOOP")[0] == 250
    sock.close()
