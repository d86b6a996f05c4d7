"""
aiosmtpd with a durable Maildir handler, for the benchmark, on 127.0.0.1 only.

    python bench/aiosmtpd_server.py ROOT DOMAIN USER [USER ...]

Prints ``PORT <n>`` once it listens. The handler gives aiosmtpd the same promise mailsrv makes:
``250`` only after the message is in every recipient's ``new/`` and fsync'd — written once into
``tmp/``, fsync'd, hard-linked into each ``new/``, each ``new/`` fsync'd. The blocking disk work
runs in the event loop's default thread pool so that concurrent sessions overlap, which is how
an asyncio server would be written for throughput. aiosmtpd keeps the whole message in memory
(``envelope.content``); that is its design, and the 100 MB figure shows it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import socket
import sys
import time

from aiosmtpd.smtp import SMTP

_counter = itertools.count(1)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirHandler:
    """Known users of one domain; each accepted message durable in every new/ before 250."""

    def __init__(self, root: str, domain: str, users: list[str]) -> None:
        self.root = root
        self.domain = domain.lower()
        self.users = set(users)
        for user in users:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(root, user, sub), mode=0o700, exist_ok=True)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.domain or local not in self.users:
            return "550 5.1.1 User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        users = list(dict.fromkeys(a.rpartition("@")[0] for a in envelope.rcpt_tos))
        data = envelope.original_content or envelope.content
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.deliver, users, data)
        return "250 2.0.0 OK"

    def deliver(self, users: list[str], data: bytes) -> None:
        """Blocking: one write, fsync, hard links, fsync of each new/."""
        data = data.replace(b"\r\n", b"\n")
        name = (f"{time.time_ns() // 1000}.P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(8)}"
                f".bench,S={len(data)}")
        first = os.path.join(self.root, users[0], "tmp", name)
        fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        for user in users:
            os.link(first, os.path.join(self.root, user, "new", name))
        for user in users:
            fsync_dir(os.path.join(self.root, user, "new"))
        os.unlink(first)


async def serve(root: str, domain: str, users: list[str]) -> None:
    handler = MaildirHandler(root, domain, users)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=256 * 1024 * 1024, hostname="aiosmtpd.bench",
                     ident="aiosmtpd bench", timeout=600),
        sock=sock, backlog=4096,
    )
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    root, domain, *users = sys.argv[1:]
    # A pool sized like mailsrv's (Twisted's default of 10 threads): enough to overlap fsyncs.
    asyncio.run(serve(root, domain, users))


if __name__ == "__main__":
    main()
