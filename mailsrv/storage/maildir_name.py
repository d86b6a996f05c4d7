"""The names of files in a Maildir: unique without any lock, across threads and processes."""

from __future__ import annotations

import itertools
import os
import random
import time

__all__ = ["unique_name"]

# The pid in unique names, read once (and again in a forked child) rather than per message.
_pid = os.getpid()


def _update_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_update_pid)

# Per-process delivery counter for unique names.  next() on itertools.count is
# atomic under the GIL, so concurrent worker threads never get the same value.
_counter = itertools.count(1)


def unique_name(hostname: str, size: int) -> str:
    """A Maildir file name: ``<secs>.M<usecs>P<pid>Q<n>R<hex>.<host>,S=<size>``.

    Unique through time, pid, a per-process counter and 64 random bits (so
    even a pid reused within the same microsecond, say in a container, does
    not collide). The bits are for uniqueness, not secrecy: Python's generator (seeded from
    the kernel at start and again in a forked child), not a getrandom call per message in
    the delivery thread.  ``/`` and ``:`` in the host are escaped as the Maildir
    specification asks, since they would be a path separator and the start of
    the info part.  ``,S=<size>`` lets readers (Dovecot) skip a stat.
    """
    now = time.time_ns()
    secs, nanos = divmod(now, 1_000_000_000)
    host = (hostname or "localhost").replace("/", "\\057").replace(":", "\\072")
    return (
        f"{secs}.M{nanos // 1000}P{_pid}Q{next(_counter)}R{random.getrandbits(64):016x}"
        f".{host},S={size}"
    )
