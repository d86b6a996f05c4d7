"""
The load the bench applies besides smtp-source: per-message latency at a fixed rate, many idle
connections, and one very large message. Every loop here is bounded in count and in time, and
talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence

HOST = "127.0.0.1"
CLIENT_NAME = "client.test"  # the EHLO name of every client here


def make_body(size: int, tag: str) -> bytes:
    """A message of about ``size`` octets, CRLF lines of 78 characters, ending with CRLF."""
    head = (f"From: <bench@client.test>\r\nTo: <alice@example.org>\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@client.test>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class SMTPError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> int:
    """Read one whole (maybe multi-line) reply; return its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def _expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got = await _reply(reader)
    if got != code:
        raise SMTPError(f"{what}: expected {code}, got {got}")


async def _latency_connection(port: int, times: list[float], body: bytes, rcpt: str,
                              results: list[float], deadline: float) -> None:
    """Send one message at each scheduled time; record end-of-DATA → 250 for each."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await _expect(reader, 220, "greeting")
        writer.write(f"EHLO {CLIENT_NAME}\r\n".encode())
        await _expect(reader, 250, "EHLO")
        for when in times:
            delay = when - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() > deadline:
                raise SMTPError("latency run over its time limit")
            writer.write(b"MAIL FROM:<bench@client.test>\r\n")
            await _expect(reader, 250, "MAIL")
            writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            await _expect(reader, 250, "RCPT")
            writer.write(b"DATA\r\n")
            await _expect(reader, 354, "DATA")
            writer.write(body)
            await writer.drain()
            writer.write(b".\r\n")
            sent = time.perf_counter()
            await _expect(reader, 250, "end of DATA")
            results.append(time.perf_counter() - sent)
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


def latency(port: int, rate: float, count: int, connections: int = 10, size: int = 5120,
            rcpt: str = "alice@example.org", time_limit: float = 120.0) -> list[float]:
    """Per-message latencies (s) from the final ``.`` to ``250``, ``count`` messages offered at
    ``rate`` per second in all over ``connections`` connections (message i at start + i/rate)."""
    body = make_body(size, "latency")

    async def run() -> list[float]:
        results: list[float] = []
        start = time.monotonic() + 0.5
        deadline = start + time_limit
        plans = [[start + i / rate for i in range(c, count, connections)]
                 for c in range(connections)]
        await asyncio.wait_for(asyncio.gather(*(
            _latency_connection(port, plan, body, rcpt, results, deadline) for plan in plans)),
            time_limit + 30)
        return results

    return asyncio.run(run())


async def _sending_connection(port: int, queue: list[bytes], sender: str, rcpt: str,
                              source: str | None, errors: list[str]) -> int:
    """Send messages taken from ``queue`` until it is empty, one after the other; return how
    many got their 250. A refused message is noted in ``errors`` and the next one sent."""
    reader, writer = await asyncio.open_connection(
        HOST, port, local_addr=(source, 0) if source else None)
    accepted = 0
    try:
        await _expect(reader, 220, "greeting")
        writer.write(f"EHLO {CLIENT_NAME}\r\n".encode())
        await _expect(reader, 250, "EHLO")
        while queue:
            message = queue.pop()
            try:
                for command, code in ((f"MAIL FROM:<{sender}>", 250), (f"RCPT TO:<{rcpt}>", 250),
                                      ("DATA", 354)):
                    writer.write(command.encode() + b"\r\n")
                    await _expect(reader, code, command.split(":")[0])
                stuffed = message.replace(b"\r\n.", b"\r\n..")
                writer.write((b"." if stuffed.startswith(b".") else b"") + stuffed + b".\r\n")
                await _expect(reader, 250, "end of DATA")
                accepted += 1
            except SMTPError as e:
                errors.append(str(e))
                writer.write(b"RSET\r\n")
                await _reply(reader)
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()
    return accepted


def send_prepared(port: int, messages: list[bytes], sender: str, rcpt: str,
                  connections: int = 10, source: str | Sequence[str] | None = None,
                  time_limit: float = 300.0) -> tuple[int, list[str]]:
    """Send the given messages (CRLF lines, ending with CRLF) as fast as the server takes them
    over ``connections`` connections from address ``source`` (a list: connection i from
    ``source[i % len(source)]``); (messages accepted, errors).

    For loads smtp-source cannot make: messages prepared ahead (e.g. DKIM-signed), or a client
    address other than 127.0.0.1."""
    queue = list(reversed(messages))
    errors: list[str] = []
    sources = [source] if source is None or isinstance(source, str) else list(source)

    async def run() -> int:
        counts = await asyncio.wait_for(asyncio.gather(*(
            _sending_connection(port, queue, sender, rcpt, sources[i % len(sources)], errors)
            for i in range(connections))), time_limit)
        return sum(counts)

    return asyncio.run(run()), errors


class IdleConnections:
    """``count`` connections held open, each having read its 220 greeting."""

    def __init__(self, port: int, count: int, time_limit: float = 120.0) -> None:
        self.sockets: list[socket.socket] = []
        deadline = time.monotonic() + time_limit
        pending: list[socket.socket] = []
        batch = 200
        while len(self.sockets) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.sockets)} of {count} connections in time")
            for _ in range(min(batch, count - len(self.sockets) - len(pending))):
                s = socket.create_connection((HOST, port), timeout=30)
                pending.append(s)
            for s in pending:
                greeting = s.recv(512)
                if not greeting.startswith(b"220"):
                    raise RuntimeError(f"connection {len(self.sockets)}: {greeting[:80]!r}")
                self.sockets.append(s)
            pending = []

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets = []


def big_message(port: int, size: int, rcpt: str = "alice@example.org",
                timeout: float = 300.0) -> int:
    """Send one message of ``size`` octets (1 MiB writes); return the final reply code."""
    line = b"y" * 998 + b"\r\n"
    chunk = line * 1024  # about 1 MiB
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        f = s.makefile("rb")

        def reply() -> int:
            while True:
                got = f.readline()
                if not got:
                    raise SMTPError("connection closed")
                if got[3:4] != b"-":
                    return int(got[:3])

        if reply() != 220:
            raise SMTPError("no greeting")
        for command, code in ((b"EHLO client.test", 250), (b"MAIL FROM:<bench@client.test>", 250),
                              (f"RCPT TO:<{rcpt}>".encode(), 250), (b"DATA", 354)):
            s.sendall(command + b"\r\n")
            got = reply()
            if got != code:
                raise SMTPError(f"{command!r}: {got}")
        s.sendall(b"Subject: big\r\n\r\n")
        sent = 0
        while sent < size:
            s.sendall(chunk)
            sent += len(chunk)
        s.sendall(b".\r\n")
        code = reply()
        s.sendall(b"QUIT\r\n")
        return code
