"""mailsrv.dnsutil: the source port of each DNS query."""

from __future__ import annotations

import errno
import socket

import pytest
from twisted.internet import task
from twisted.names import dns

from mailsrv import dnsutil


def test_the_source_port_is_never_a_privileged_one() -> None:
    """A server that dropped root cannot bind below 1024: the draw's whole range is above."""
    assert dnsutil.source_port(lambda n: 0) == 1024
    assert dnsutil.source_port(lambda n: n - 1) == 65535
    assert all(1024 <= dnsutil.source_port() <= 65535 for _ in range(10_000))


def test_a_refused_port_is_skipped_for_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES (a port a firewall or the kernel reserves) and EADDRINUSE: the next draw."""
    refusals = [errno.EACCES, errno.EADDRINUSE]
    real_bind = socket.socket.bind

    class Socket(socket.socket):
        def bind(self, address):  # type: ignore[override]
            if refusals:
                raise OSError(refusals.pop(0), "refused")
            return real_bind(self, address)

    monkeypatch.setattr(dnsutil.socket, "socket", Socket)
    clock = task.Clock()
    clock.addReader = clock.removeReader = lambda reader: None  # type: ignore[attr-defined]
    port = dnsutil._QuietDatagramPort(clock, dns.DNSDatagramProtocol(None, reactor=clock),
                                      "127.0.0.1")
    assert refusals == [] and port.socket.getsockname()[1] >= 1024
    port.socket.close()
