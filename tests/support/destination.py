"""
A ``DestinationDelivery`` over a MemoryReactor and a tmp_path configuration: what the
relay's per-destination unit tests (test_relay_destination, test_tlsplan) drive.
"""

from __future__ import annotations

from typing import Any

try:
    from twisted.internet.testing import MemoryReactor
except ImportError:  # Twisted 22.4 (Debian bookworm)
    from twisted.test.proto_helpers import MemoryReactor

from mailsrv.config import parse_config
from mailsrv.outbound.destination import DestinationDelivery
from mailsrv.routing.router import Directory
from mailsrv.runtime import Runtime


def make(tmp_path, resolver: Any = None, **relay: Any) -> DestinationDelivery:
    """One destination's delivery, ``relay`` the [relay] table, ``resolver`` the runtime's."""
    config = parse_config({
        "hostname": "mx.example.org",
        "smtp": {"listen": ["tcp:2525"]},
        "domains": {"local": ["example.org"]},
        "mailboxes": {"root": str(tmp_path / "mail")},
        "queue": {"path": str(tmp_path / "queue")},
        "relay": relay,
    }, None)
    runtime = Runtime(config=config, directory=Directory(["example.org"], frozenset(), {}),
                      reactor=MemoryReactor(), resolver=resolver)
    return DestinationDelivery(runtime, rng=None)
