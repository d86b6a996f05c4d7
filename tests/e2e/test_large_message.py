"""Large messages: 100 MB streams to disk with flat memory; the size limit is exact."""

import base64
import hashlib
import os
import random
import re
import select

from support.harness import wait_for
from support.procfs import memory_kib

MiB = 1 << 20
BIG_WIRE_SIZE = 100 * MiB  # octets on the wire, roughly (whole lines)
SEED = 100
HEADER = (
    b"From: Big <big@client.test>\r\nTo: alice@example.org\r\nSubject: big\r\n"
    b"Message-ID: <big@client.test>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
)
_TRACE_FIELD = re.compile(rb"(Return-Path|Delivered-To|Received|Message-ID):", re.IGNORECASE)


class BigMessage:
    """The wire bytes of a message of base64 lines (76 characters + CRLF), in chunks.

    While generating, it counts the wire octets and hashes the form the server stores
    (LF line ends), so the delivered file can be checked without keeping 100 MB around.
    """

    LINES_PER_BLOCK = 8192  # 57 random bytes -> one 76-character base64 line

    def __init__(self, wire_size, seed):
        self.lines = (wire_size - len(HEADER)) // 78
        self.rng = random.Random(seed)
        self.stored_hash = hashlib.sha256()
        self.stored_size = 0
        self.wire_size = 0

    def chunks(self):
        yield self._account(HEADER)
        left = self.lines
        while left:
            n = min(left, self.LINES_PER_BLOCK)
            left -= n
            lines = base64.encodebytes(self.rng.randbytes(57 * n))  # 76 chars + LF each
            assert len(lines) == 77 * n
            yield self._account(lines.replace(b"\n", b"\r\n"))

    def _account(self, wire):
        self.wire_size += len(wire)
        stored = wire.replace(b"\r\n", b"\n")
        self.stored_size += len(stored)
        self.stored_hash.update(stored)
        return wire


def pieces(chunks, size=MiB):
    """Re-cut a stream of chunks into pieces of exactly ``size`` (but the last)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def only_file(server, address):
    new = server.mailbox_path(address) / "new"
    names = os.listdir(new)
    assert len(names) == 1, names
    return names[0], new / names[0]


def check_trace_prefix(prefix):
    for line in prefix.splitlines():
        assert line[:1] in (b" ", b"\t") or _TRACE_FIELD.match(line), line


def start_transaction(client, recipient):
    assert client.command("EHLO client.test")[0] == 250
    assert client.command("MAIL FROM:<big@client.test>")[0] == 250
    assert client.command(f"RCPT TO:<{recipient}>")[0] == 250
    assert client.command("DATA")[0] == 354


def test_100_mb_message_streams_to_disk_with_flat_memory(make_server):
    server = make_server(overrides={"smtp": {"max_message_size": 150_000_000}}).start()
    pid = server.process.pid

    # Warm up (thread pool, DNS lookup, first delivery) so the baseline is a working server.
    client = server.connect(timeout=120)
    start_transaction(client, "bob@example.org")
    client.send(b"Subject: warm-up\r\n\r\nhello\r\n.\r\n")
    assert client.reply()[0] == 250
    before = memory_kib(pid)

    message = BigMessage(BIG_WIRE_SIZE, SEED)
    assert client.command("MAIL FROM:<big@client.test>")[0] == 250
    assert client.command("RCPT TO:<alice@example.org>")[0] == 250
    assert client.command("DATA")[0] == 354
    peak_during = 0
    for n, piece in enumerate(pieces(message.chunks())):
        client.send(piece)
        if n % 16 == 0:
            peak_during = max(peak_during, memory_kib(pid)["VmRSS"])
    client.send(b".\r\n")
    code, text = client.reply()
    assert code == 250, text
    after = memory_kib(pid)
    assert client.command("QUIT")[0] == 221

    assert message.wire_size >= BIG_WIRE_SIZE - 78
    name, path = only_file(server, "alice@example.org")
    size = os.path.getsize(path)
    assert int(re.search(r",S=(\d+)$", name).group(1)) == size
    prefix_size = size - message.stored_size
    assert 0 < prefix_size < 2000
    digest = hashlib.sha256()
    with open(path, "rb") as stored:
        prefix = stored.read(prefix_size)
        check_trace_prefix(prefix)
        assert prefix.startswith(
            b"Return-Path: <big@client.test>\nDelivered-To: alice@example.org\nReceived: ")
        for block in iter(lambda: stored.read(MiB), b""):
            digest.update(block)
    assert digest.hexdigest() == message.stored_hash.hexdigest()
    assert os.listdir(server.queue / "incoming") == []

    growth_kib = after["VmHWM"] - before["VmHWM"]
    print(
        f"\n100 MB message: {message.wire_size} octets on the wire, {size} stored; server "
        f"VmRSS {before['VmRSS']} -> {after['VmRSS']} kB (max sampled during DATA "
        f"{peak_during} kB), VmHWM {before['VmHWM']} -> {after['VmHWM']} kB: "
        f"growth {growth_kib / 1024:.1f} MiB"
    )
    assert growth_kib < 40 * 1024


def message_of_wire_size(size, tag):
    """A message of exactly ``size`` octets on the wire (all lines with CRLF, dot-stuffing
    included, the final ".\\r\\n" not), holding one dot-stuffed line; and its stored form."""
    head = f"Subject: {tag}\r\n\r\n..a line starting with a dot\r\n".encode()
    filler = size - len(head)
    full = max(0, (filler - 2) // 80)  # lines of 78 characters + CRLF
    last = filler - 80 * full  # 2..81 octets: one more line of 0..79 characters + CRLF
    wire = head + (b"y" * 78 + b"\r\n") * full + b"z" * (last - 2) + b"\r\n"
    assert len(wire) == size
    stored = wire.replace(b"\r\n", b"\n").replace(b"\n..a line", b"\n.a line")
    return wire, stored


def nothing_to_read(client, seconds=0.3):
    readable, _, _ = select.select([client.sock], [], [], seconds)
    return not readable and not client.buffer


def test_size_limit_is_exact(make_server):
    limit = 20000
    server = make_server(overrides={"smtp": {"max_message_size": limit}}).start()
    client = server.connect()

    too_big, _ = message_of_wire_size(limit + 1, "one octet too many")
    start_transaction(client, "carol@example.net")
    client.send(too_big)
    assert nothing_to_read(client)  # no reply before the final dot
    client.send(b".\r\n")
    code, text = client.reply()
    assert (code, text[:5]) == (552, "5.3.4"), text
    assert not (server.root / "example.net" / "carol" / "new").exists() or not os.listdir(
        server.root / "example.net" / "carol" / "new"
    )

    # The same session goes on: exactly the limit is accepted.
    exact, stored = message_of_wire_size(limit, "exactly the limit")
    assert client.command("MAIL FROM:<big@client.test>")[0] == 250
    assert client.command("RCPT TO:<carol@example.net>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(exact + b".\r\n")
    code, text = client.reply()
    assert code == 250, text
    assert client.command("QUIT")[0] == 221

    name, path = only_file(server, "carol@example.net")
    raw = path.read_bytes()
    assert raw.endswith(stored)
    check_trace_prefix(raw[: len(raw) - len(stored)])
    assert int(re.search(r",S=(\d+)$", name).group(1)) == len(raw)
    wait_for(lambda: os.listdir(server.queue / "incoming") == [], 10, "incoming/ to be empty")
