"""
One timed receipt: prepared messages sent to a mailsrv of the bench, timed from the first
connect to the last link into ``new/``, with the server's CPU over the same interval (and,
optionally, another process's, such as rspamd's beside it).  Shared by the issue-13 and
issue-14 measures, which differ in the server's configuration, not in how they time it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import clients, cpuload
from bench.peers import wait_until

__all__ = ["Receipt", "timed_receipt"]


@dataclass
class Receipt:
    accepted: int
    errors: list[str]
    #: The server's CPU seconds, and the other process's (0 without one), over the run.
    cpu: float
    beside_cpu: float
    #: Seconds from the first connect to the last delivery.
    elapsed: float
    #: The files new in ``new/`` (what server.delivered() lists).
    new: Any
    #: The machine's load over the run (cpuload.Interval's result).
    load: dict[str, float] = field(default_factory=dict)


def timed_receipt(
    server: Any, messages: list[bytes], sender: str, rcpt: str, source: str | Sequence[str],
    beside: Callable[[], float] | None = None,
) -> Receipt:
    """Send ``messages`` and wait (two minutes at most) until each is in ``new/``."""
    count = len(messages)
    before = server.delivered()
    with cpuload.Interval() as load:
        cpu = server.cpu_seconds()
        beside_cpu = beside() if beside else 0.0
        start = time.time()
        accepted, errors = clients.send_prepared(server.port, messages, sender, rcpt,
                                                 source=source)
        try:
            wait_until(lambda: server.count() - len(before) >= count, 120,
                       f"{count} files in new/", 0.01)
        except RuntimeError:
            pass
        cpu = server.cpu_seconds() - cpu
        if beside:
            beside_cpu = beside() - beside_cpu
    elapsed = max(server.last_delivery() - start, 1e-6)
    return Receipt(accepted, errors, cpu, beside_cpu, elapsed, server.delivered() - before,
                   load.result)
