"""
How busy the machine was while a figure was measured: CPU idle, I/O wait and steal over the
measured interval, from the deltas of the ``cpu`` line of /proc/stat (all cores together).

Why: a ratio between two servers measured while other work ran on the machine reads like one
from an idle machine. Each result carries the share of CPU time that nobody used (idle), that
waited on the disk (iowait, part of idle here) and that the hypervisor gave to another guest
(steal), so that a reader can tell a busy run from a quiet one. The bench's own processes
(server and load generator) are part of the "busy" share: a throughput run that uses every core
shows little idle by itself; steal, and idle measured while the bench was quiet (the
``background`` samples of bench/run.py), speak of other load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

#: The columns of /proc/stat's ``cpu`` line (proc(5)); guest time is already in user/nice.
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True)
class Snapshot:
    """The cumulative CPU times (in USER_HZ ticks) of every core, at one moment."""

    ticks: tuple[int, ...]


def parse(stat_text: str) -> Snapshot:
    """The aggregate ``cpu`` line of /proc/stat's text (a missing steal column counts 0)."""
    for line in stat_text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:1 + len(FIELDS)]]
            values += [0] * (len(FIELDS) - len(values))
            return Snapshot(tuple(values))
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def snapshot(path: str = "/proc/stat") -> Snapshot:
    with open(path) as f:
        return Snapshot(parse(f.read()).ticks)


def between(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Percentages of all CPU time between two snapshots: ``idle`` (idle + iowait: no process
    ran), ``iowait`` and ``steal``; ``ticks`` is the number of ticks they are shares of (a short
    interval has few, so coarse percentages: 100 ticks per second per core)."""
    delta = dict(zip(FIELDS, (b - a for a, b in zip(before.ticks, after.ticks))))
    total = sum(delta.values())
    if total <= 0:
        return {"idle": float("nan"), "iowait": float("nan"), "steal": float("nan"), "ticks": 0}
    return {
        "idle": round(100.0 * (delta["idle"] + delta["iowait"]) / total, 1),
        "iowait": round(100.0 * delta["iowait"] / total, 1),
        "steal": round(100.0 * delta["steal"] / total, 1),
        "ticks": total,
    }


class Interval:
    """``with Interval() as load: ...`` then ``load.result`` is ``between`` over the block."""

    def __init__(self) -> None:
        self.result: dict[str, float] = {}
        self._start: Snapshot | None = None

    def __enter__(self) -> "Interval":
        self._start = snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None
        self.result = between(self._start, snapshot())


def process_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far, from
    /proc/PID/stat: unlike a rate, the CPU a server spends per message does not change when
    other work shares the machine."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(loads: Iterable[dict[str, float]]) -> str:
    """``idle 41%, steal 0%`` for one load, or the range over repeats (``idle 12-45%``)."""
    loads = [x for x in loads if x.get("ticks")]
    if not loads:
        return ""

    def span(key: str) -> str:
        low, high = min(x[key] for x in loads), max(x[key] for x in loads)
        return f"{low:.0f}%" if round(low) == round(high) else f"{low:.0f}-{high:.0f}%"

    return f"idle {span('idle')}, steal {span('steal')}"
