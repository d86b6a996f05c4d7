"""
Helpers for in-process tests of the SMTP session: the core (``session.SMTPSession``) driven as
the protocol drives it, and the protocol on a StringTransport, with time on a task.Clock and
the real delivery objects on a tmp_path configuration. No sockets, no subprocess, no resolver.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted 22.4 (Debian bookworm)
    from twisted.test.proto_helpers import StringTransport

from mailsrv.accounts.auth import (
    FailureTracker,
    PasswordChecker,
    check_password_field,
    hash_password,
)
from mailsrv.config import prepare_directories
from mailsrv.inbound.framing import Framing
from mailsrv.inbound.listener import ConnectionCounter, SMTPServerFactory
from mailsrv.inbound.session import SMTPSession
from mailsrv.replies import format_reply
from mailsrv.routing.router import Directory
from mailsrv.runtime import Runtime
from mailsrv.storage import queue
from support.config import minimal_config
from support.queue_runtime import SyncWorkers

__all__ = [
    "CLIENT", "PASSWORD", "Connection", "Core", "StringTransport", "SyncWorkers", "factory_for",
    "make_runtime",
]

#: Neither loopback nor in trusted_networks: may not relay.
CLIENT = "192.0.2.7"
PASSWORD = "correct horse"
_HASH: list[str] = []


def make_runtime(
    tmp_path: Path, clock: task.Clock | None = None, *, trusted=("10.0.0.0/8",),
    auth: bool = False, check_from_header: bool = True, **smtp,
) -> Runtime:
    """A runtime with example.org local (users alice and bob), its directories made, deliveries
    run synchronously; with ``auth``, alice's password is PASSWORD and failures are tracked
    (the delay on ``clock``)."""
    clock = clock or task.Clock()
    config = minimal_config(
        tmp_path, smtp={"listen": ["tcp:2525"], "reverse_dns": False, **smtp},
        submission={"check_from_header": check_from_header},
        relay={"trusted_networks": list(trusted)})
    prepare_directories(config)
    queue.queue_dirs(config.queue.path)
    passwords = None
    if auth:
        if not _HASH:
            # Cost 4: cheap, a test is no vault.  The users file's field -> the bare hash.
            _HASH.append(check_password_field(hash_password(PASSWORD, cost=4)) or "")
        passwords = {"alice@example.org": _HASH[0]}
    directory = Directory(
        ["example.org"], frozenset({"alice@example.org", "bob@example.org"}), {},
        passwords=passwords,
    )
    runtime = Runtime(config=config, directory=directory, reactor=clock)
    runtime.workers = SyncWorkers()
    if auth:
        runtime.checker = PasswordChecker(lambda: directory.passwords, runtime.in_thread)
        a = config.auth
        runtime.auth_failures = FailureTracker(
            a.max_failures, a.window, a.lockout, a.failure_delay, clock=clock.seconds
        )
    return runtime


class Core:
    """One session core with the real SessionDelivery, driven as the protocol drives it: its
    replies as the wire text (a multi-line reply's lines joined by CRLF)."""

    def __init__(
        self, runtime: Runtime, ip: str = CLIENT, submission: bool = False,
        tls: bool = False,
    ) -> None:
        self.runtime = runtime
        self.delivery = runtime.new_session(ip, submission)
        self.core = SMTPSession(runtime, self.delivery, ip, submission, tls)
        #: A Deferred reply not fired yet (the input behind it waits, as in the protocol).
        self.pending: list | None = None

    def send(self, *lines: str) -> list[str]:
        return self.send_bytes(b"".join(line.encode() + b"\r\n" for line in lines))

    def send_bytes(self, data: bytes) -> list[str]:
        self.core.receive(data)
        return self.run()

    def run(self) -> list[str]:
        out: list[str] = []
        while self.pending is None and self.core.held:
            result = self.core.step()
            if result is Framing.NEED_MORE:
                break
            if result is None:
                continue
            if isinstance(result, defer.Deferred):
                fired: list = []
                result.addBoth(fired.append)
                if not fired:
                    self.pending = fired
                    break
                result = fired[0]
            out.append(format_reply(result).decode())
        return out

    def advance(self, seconds: float) -> list[str]:
        """Let ``seconds`` pass: the pending reply, if it came, and what followed it."""
        self.runtime.reactor.advance(seconds)
        if self.pending is None or not self.pending:
            return []
        reply, self.pending = self.pending[0], None
        return [format_reply(reply).decode(), *self.run()]

    def greet(self) -> None:
        assert self.send("EHLO client.test")[0].startswith("250-")

    @property
    def closing(self) -> bool:
        return self.core.mode == "CLOSING"


def factory_for(
    runtime: Runtime, counter: ConnectionCounter | None = None, **kwargs,
) -> SMTPServerFactory:
    """The listener's factory over ``runtime``, with room for 100 connections unless told."""
    return SMTPServerFactory(runtime, counter or ConnectionCounter(100, 100), **kwargs)


class Connection:
    """One connection through the factory on a StringTransport (timers on the runtime's clock):
    what the server wrote, line by line."""

    def __init__(
        self, factory: SMTPServerFactory, ip: str = CLIENT,
        transport: type[StringTransport] = StringTransport,
    ) -> None:
        address = IPv4Address("TCP", ip, 40000)
        self.protocol = factory.buildProtocol(address)
        self.transport = transport(peerAddress=address)
        self.protocol.makeConnection(self.transport)

    @classmethod
    def to(cls, runtime: Runtime, ip: str = CLIENT) -> Connection:
        """A connection to a port 25 listener over ``runtime``."""
        return cls(factory_for(runtime), ip)

    def output(self) -> list[str]:
        lines = self.transport.value().decode().split("\r\n")[:-1]
        self.transport.clear()
        return lines

    def send(self, *commands: str) -> list[str]:
        return self.send_bytes(b"".join(c.encode() + b"\r\n" for c in commands))

    def send_bytes(self, data: bytes) -> list[str]:
        self.protocol.dataReceived(data)
        return self.output()

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.protocol.connectionLost(None)
