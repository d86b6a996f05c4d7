"""
CHUNKING and BINARYMIME (RFC 3030) end to end against a running mailsrv: a raw-socket BDAT
client (pipelined chunks, the refusals, a wrong length, a connection closed mid-chunk, the size
limit one past it, a 100 MB message in chunks with the memory bound of test_large_message, a
binary MIME message stored and relayed as text), and the relay sending BDAT to a loopback sink
that offers CHUNKING and DATA to one that does not. (Exim as a BDAT client is in
test_bdat_exim.py.)
"""

from __future__ import annotations

import email
import hashlib
import os
import re
import socket
import time

import pytest
from test_large_message import BIG_WIRE_SIZE, SEED, BigMessage, check_trace_prefix, only_file

from support.harness import DNSServer, MailServer, SMTPSink, free_port, wait_for
from support.mail import send_mail
from support.procfs import memory_kib

MiB = 1 << 20
MESSAGE = b"From: a@client.test\r\nSubject: chunked\r\n\r\n.first line\r\n.\r\nlast\r\n"


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def replies(client, n: int) -> list[tuple[int, str]]:
    return [client.reply() for _ in range(n)]


def envelope(client, rcpt: str = "alice@example.org") -> None:
    client.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<%s>\r\n" % rcpt.encode())
    assert [code for code, _ in replies(client, 2)] == [250, 250]


def incoming_empty(server: MailServer) -> bool:
    return os.listdir(server.queue / "incoming") == []


def test_pipelined_chunks_replies_in_order_and_the_message_stored(mail_server):
    client = mail_server.connect()
    code, text = client.command("EHLO client.test")
    assert code == 250 and "\nCHUNKING" in "\n" + text.replace("\r\n", "\n")
    before = len(mail_server.messages("alice@example.org"))
    parts = [MESSAGE[:10], MESSAGE[10:41], MESSAGE[41:]]
    client.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<alice@example.org>\r\n"
                + bdat(parts[0]) + bdat(parts[1]) + bdat(b"") + bdat(parts[2], last=True)
                + b"NOOP\r\n")
    got = replies(client, 7)
    assert got[:5] == [(250, "2.1.0 Ok"), (250, "2.1.5 Ok"), (250, "2.0.0 Ok: 10 octets received"),
                       (250, "2.0.0 Ok: 41 octets received"), (250, "2.0.0 Ok: 41 octets received")]
    assert got[5][0] == 250 and got[5][1].startswith("2.0.0 Ok: queued as ")
    assert got[6] == (250, "2.0.0 Ok")
    queue_id = got[5][1].rsplit(" ", 1)[1]
    box = mail_server.maildir("alice@example.org")
    [key] = [k for k in box.keys() if queue_id.encode() in box.get_bytes(k)]
    stored = box.get_bytes(key)
    assert stored.endswith(b"\n\n.first line\n.\nlast\n")  # no dot-unstuffing under BDAT
    assert len(mail_server.messages("alice@example.org")) == before + 1
    assert client.command("QUIT")[0] == 221


def test_quit_pipelined_after_the_last_chunk_and_a_half_close_still_delivers(mail_server):
    """As Exim does: ``BDAT <n> LAST``, QUIT, then shutdown(SHUT_WR) before any reply."""
    before = len(mail_server.messages("alice@example.org"))
    client = mail_server.connect()
    client.command("EHLO client.test")
    client.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<alice@example.org>\r\n"
                + bdat(MESSAGE, last=True) + b"QUIT\r\n")
    client.sock.shutdown(socket.SHUT_WR)
    got = replies(client, 4)
    assert [code for code, _ in got] == [250, 250, 250, 221] and "queued as" in got[2][1]
    assert client.closed()
    assert len(mail_server.messages("alice@example.org")) == before + 1


def test_refusals_keep_the_session_in_step(mail_server):
    client = mail_server.connect()
    client.command("EHLO client.test")
    # No MAIL: the chunk is read whole (its lines are no commands), then 503.
    client.send(bdat(b"QUIT\r\n"))
    assert client.reply() == (503, "5.5.1 Error: need MAIL command")
    assert client.command("BDAT 12x") == (501, "5.5.4 Syntax: BDAT chunk-size [LAST]")
    envelope(client)
    client.send(bdat(b"Subject: x\r\n"))
    assert client.reply()[0] == 250
    assert client.command("DATA") == (
        503, "5.5.1 Error: DATA after BDAT in one transaction; send RSET")
    client.send(bdat(b"\r\nbody\r\n", last=True))
    assert client.reply() == (503, "5.5.1 Error: an earlier chunk failed; send RSET")
    assert client.command("RSET") == (250, "2.0.0 Ok")
    envelope(client)
    client.send(bdat(b"Subject: y\r\n\r\nbare\nLF\r\n", last=True))
    assert client.reply() == (554, "5.6.0 Error: bare CR or LF in message; message refused")
    assert client.command("QUIT")[0] == 221
    wait_for(lambda: incoming_empty(mail_server), 10, "incoming/ to be empty")


def test_wrong_length_more_octets_become_commands_fewer_time_out(make_server):
    server = make_server(overrides={"smtp": {"data_timeout": 2}}).start()
    client = server.connect()
    client.command("EHLO client.test")
    envelope(client)
    # Says 16, sends 16 + "garbage": the rest is read as a command line.
    client.send(b"BDAT 16 LAST\r\nSubject: w\r\n\r\nxxgarbage\r\n")
    code, text = client.reply()
    assert code == 250 and "queued as" in text
    assert client.reply() == (500, "5.5.2 Error: command not recognized")
    # Says 100, sends 20: the server waits for the rest, then gives up.
    envelope(client)
    client.send(b"BDAT 100 LAST\r\nSubject: short\r\n\r\nx\r\n")
    started = time.monotonic()
    assert client.reply() == (421, "4.4.2 Error: timeout exceeded; closing connection")
    assert 1.5 < time.monotonic() - started < 30
    assert client.closed()
    assert len(server.messages("alice@example.org")) == 1
    wait_for(lambda: incoming_empty(server), 10, "incoming/ to be empty")


def test_connection_closed_mid_chunk_delivers_nothing(make_server):
    server = make_server().start()
    client = server.connect()
    client.command("EHLO client.test")
    envelope(client)
    client.send(b"BDAT 1000 LAST\r\n" + MESSAGE)
    wait_for(lambda: os.listdir(server.queue / "incoming"), 10, "the spool file")
    client.close()
    wait_for(lambda: incoming_empty(server), 10, "the spool file to be removed")
    assert server.messages("alice@example.org") == []


def test_size_limit_exact_passes_one_past_552(make_server):
    limit = 20000
    server = make_server(overrides={"smtp": {"max_message_size": limit}}).start()
    client = server.connect()
    client.command("EHLO client.test")
    head = b"Subject: limit\r\n\r\n"
    body = (b"y" * 78 + b"\r\n") * ((limit - len(head)) // 80)
    exact = head + body + b"z" * (limit - len(head) - len(body))
    assert len(exact) == limit
    envelope(client)
    client.send(bdat(exact[:5000]) + bdat(exact[5000:] + b"z", last=True))
    assert replies(client, 2) == [(250, "2.0.0 Ok: 5000 octets received"), (
        552, "5.3.4 Error: message size exceeds fixed limit")]
    envelope(client)
    client.send(bdat(exact[:5000]) + bdat(exact[5000:], last=True))
    assert client.reply()[0] == 250 and client.reply()[0] == 250
    assert len(server.messages("alice@example.org")) == 1
    assert client.command("QUIT")[0] == 221


def test_100_mb_message_in_bdat_chunks_with_flat_memory(make_server):
    server = make_server(overrides={"smtp": {"max_message_size": 150_000_000}}).start()
    pid = server.process.pid
    client = server.connect(timeout=120)
    client.command("EHLO client.test")
    envelope(client, "bob@example.org")  # warm-up, as test_large_message does
    client.send(bdat(b"Subject: warm-up\r\n\r\nhello\r\n", last=True))
    assert client.reply()[0] == 250
    before = memory_kib(pid)

    message = BigMessage(BIG_WIRE_SIZE, SEED)
    envelope(client)
    # Chunks of 7 MiB, cut anywhere (mid-line, mid-CRLF), each answered before the next.
    buffer, chunk_size, chunks, peak_during = bytearray(), 7 * MiB + 1, 0, 0
    for block in message.chunks():
        buffer += block
        while len(buffer) > chunk_size:
            client.send(bdat(bytes(buffer[:chunk_size])))
            del buffer[:chunk_size]
            chunks += 1
            assert client.reply()[0] == 250
            peak_during = max(peak_during, memory_kib(pid)["VmRSS"])
    client.send(bdat(bytes(buffer), last=True))
    code, text = client.reply()
    assert code == 250 and "queued as" in text, text
    after = memory_kib(pid)
    assert client.command("QUIT")[0] == 221
    assert chunks >= 14

    name, path = only_file(server, "alice@example.org")
    size = os.path.getsize(path)
    assert int(re.search(r",S=(\d+)$", name).group(1)) == size
    prefix_size = size - message.stored_size
    assert 0 < prefix_size < 2000
    digest = hashlib.sha256()
    with open(path, "rb") as stored:
        check_trace_prefix(stored.read(prefix_size))
        for block in iter(lambda: stored.read(MiB), b""):
            digest.update(block)
    assert digest.hexdigest() == message.stored_hash.hexdigest()
    assert incoming_empty(server)
    growth_kib = after["VmHWM"] - before["VmHWM"]
    print(f"\n100 MB in {chunks + 1} BDAT chunks: VmRSS {before['VmRSS']} -> {after['VmRSS']} kB "
          f"(max sampled {peak_during} kB), VmHWM growth {growth_kib / 1024:.1f} MiB")
    assert growth_kib < 40 * 1024


# -- outbound ------------------------------------------------------------------------------

ZONE = {
    "records": {
        "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
        "client.test": [["A", "127.0.0.1"]],
        "chunking.test": [["MX", 10, "mx.chunking.test"]],
        "mx.chunking.test": [["A", "127.0.0.2"]],
        "plain.test": [["MX", 10, "mx.plain.test"]],
        "mx.plain.test": [["A", "127.0.0.3"]],
    },
}


@pytest.fixture(scope="module")
def relay_env(tmp_path_factory):
    work = tmp_path_factory.mktemp("bdat-relay")
    dns = DNSServer(work, ZONE)
    port = free_port(["127.0.0.2", "127.0.0.3"])
    sinks = {
        "chunking": SMTPSink(work / "chunking", "127.0.0.2", hostname="mx.chunking.test",
                             port=port, rules={"chunking": True}),
        "plain": SMTPSink(work / "plain", "127.0.0.3", hostname="mx.plain.test", port=port),
    }
    (work / "mailsrv").mkdir()
    server = MailServer(work / "mailsrv", dns.port, overrides={
        "queue": {"retry_schedule": [1], "max_age": 3600}, "relay": {"port": port}})
    server.start()
    yield server, sinks
    server.stop()
    for sink in sinks.values():
        sink.stop()
    dns.stop()


def test_relay_sends_bdat_to_a_peer_offering_chunking_and_data_otherwise(relay_env):
    server, sinks = relay_env
    body = b"Subject: relayed\r\n\r\n.dot line\r\n" + b"x" * 900 + b"\r\n"
    assert send_mail(server.port, "alice@example.org", ["r@chunking.test", "r@plain.test"],
                     body) == {}
    [chunked] = sinks["chunking"].wait_for_messages(1)
    [plain] = sinks["plain"].wait_for_messages(1)
    assert chunked["via"] == "BDAT" and chunked["chunks"] == 1
    assert plain["via"] == "DATA"
    for got in (chunked, plain):
        data = got["data"].encode("latin-1")
        assert data.endswith(b"\r\n\r\n.dot line\r\n" + b"x" * 900 + b"\r\n")
        assert data.startswith(b"Received: ")


def test_relay_sends_a_3_mb_message_in_several_chunks_intact(relay_env):
    server, sinks = relay_env
    before = len(sinks["chunking"].messages())
    lines = b"".join(b"%07d " % n + b"abcdefghij" * 7 + b"\r\n" for n in range(40000))
    body = b"Subject: big relayed\r\n\r\n" + lines  # 3.2 MB: four chunks of 1 MiB of spool
    assert send_mail(server.port, "alice@example.org", ["big@chunking.test"], body,
                     timeout=60) == {}
    got = sinks["chunking"].wait_for_messages(before + 1, timeout=60)[before]
    assert got["via"] == "BDAT" and got["chunks"] == 4
    assert got["data"].encode("latin-1").endswith(b"\r\n\r\n" + lines)


def test_binarymime_stored_and_relayed_as_text_the_binary_part_intact(relay_env):
    """BODY=BINARYMIME from a raw-socket client: a part of every octet value (bare CR and LF,
    NUL, a 3000-octet "line") in two chunks cut inside it; the Maildir copy and the copy the
    relay sends with DATA to a server without CHUNKING both decode to exactly those octets."""
    server, sinks = relay_env
    binary = bytes(range(256)) * 64 + b"\r\n\n\r\x00" + b"z" * 3000
    message = (b"From: a@client.test\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
               b"Content-Type: text/plain\r\n\r\nsee attached\r\n--XX\r\n"
               b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
               b"\r\n" + binary + b"\r\n--XX--\r\n")
    before = len(sinks["plain"].messages())
    client = server.connect()
    code, text = client.command("EHLO client.test")
    assert code == 250 and "\nBINARYMIME" in "\n" + text.replace("\r\n", "\n")
    client.send(b"MAIL FROM:<a@client.test> BODY=BINARYMIME\r\nRCPT TO:<alice@example.org>\r\n"
                b"RCPT TO:<bin@plain.test>\r\n")
    assert [code for code, _ in replies(client, 3)] == [250, 250, 250]
    cut = len(message) // 2
    client.send(bdat(message[:cut]) + bdat(message[cut:], last=True))
    assert client.reply() == (250, f"2.0.0 Ok: {cut} octets received")
    code, text = client.reply()
    assert code == 250 and "queued as" in text
    queue_id = text.rsplit(" ", 1)[1]
    assert client.command("QUIT")[0] == 221
    box = server.maildir("alice@example.org")
    [key] = [k for k in box.keys() if queue_id.encode() in box.get_bytes(k)]
    relayed = sinks["plain"].wait_for_messages(before + 1)[before]
    for copy in (box.get(key), email.message_from_bytes(relayed["data"].encode("latin-1"))):
        text_part, data_part = copy.get_payload()
        assert text_part.get_payload() == "see attached"
        assert data_part["Content-Transfer-Encoding"] == "base64"
        assert data_part.get_payload(decode=True) == binary
    assert relayed["via"] == "DATA"
