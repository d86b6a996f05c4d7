"""
A ``DestinationDelivery`` over a MemoryReactor and a tmp_path configuration: what the
relay's per-destination unit tests (test_relay_destination, test_tlsplan,
test_dane_destination) drive.
"""

from __future__ import annotations

from typing import Any

try:
    from twisted.internet.testing import MemoryReactor
except ImportError:  # Twisted 22.4 (Debian bookworm)
    from twisted.test.proto_helpers import MemoryReactor

from mailsrv.outbound.destination import DestinationDelivery
from mailsrv.routing.router import Directory
from mailsrv.runtime import Runtime
from support.config import minimal_config


def make(tmp_path, resolver: Any = None, **relay: Any) -> DestinationDelivery:
    """One destination's delivery, ``relay`` the [relay] table, ``resolver`` the runtime's."""
    runtime = Runtime(config=minimal_config(tmp_path, relay=relay),
                      directory=Directory(["example.org"], frozenset(), {}),
                      reactor=MemoryReactor(), resolver=resolver)
    return DestinationDelivery(runtime, rng=None)
