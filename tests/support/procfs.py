"""What Linux's /proc says of a process: memory and open files, for the resource-limit tests."""

from __future__ import annotations

import os

__all__ = ["fd_path", "memory_kib", "open_fd_count", "rss_bytes"]


def memory_kib(pid: int, fields: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """The named fields of /proc/<pid>/status that the kernel gives, in kB as it gives them."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in fields:
                values[key] = int(rest.split()[0])
    return values


def rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    values = memory_kib(pid, ("VmRSS",))
    if "VmRSS" not in values:
        raise AssertionError("no VmRSS")
    return values["VmRSS"] * 1024


def open_fd_count() -> int:
    """How many file descriptors this process has open (to catch a leak)."""
    return len(os.listdir("/proc/self/fd"))


def fd_path(fd: int) -> str:
    """The path that this process's ``fd`` is open on."""
    return os.readlink(f"/proc/self/fd/{fd}")
