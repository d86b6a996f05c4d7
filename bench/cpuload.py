"""
How busy the machine was while a figure was measured: CPU idle, I/O wait and steal over the
measured interval, from the deltas of the ``cpu`` line of /proc/stat (all cores together).

Why: a ratio between two servers measured while other work ran on the machine reads like one
from an idle machine. Each result carries the share of CPU time that nobody used (idle), that
waited on the disk (iowait, part of idle here) and that the hypervisor gave to another guest
(steal), so that a reader can tell a busy run from a quiet one. The bench's own processes
(server and load generator) are part of the "busy" share: a throughput run that uses every core
shows little idle by itself; steal, and idle measured while the bench was quiet (the
``background`` samples of bench/harness.py), speak of other load.
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


def parse_pid_stat(text: str) -> tuple[int, int]:
    """(parent pid, CPU ticks) from one /proc/PID/stat: the process's own user + system time
    and its reaped children's (cutime + cstime, proc(5) fields 14-17).

    The children's share matters: Postfix's smtpd, cleanup and smtp processes exit during a
    run (``max_use``, ``max_idle``) and their time then lives only in master's cutime/cstime;
    a receiving process of mailsrv that was restarted likewise in its parent's."""
    fields = text.rpartition(")")[2].split()
    return int(fields[1]), sum(int(v) for v in fields[11:15])


def descendants(stats: dict[int, tuple[int, int]], root: int) -> list[int]:
    """``root`` (if alive) and every live process below it: ``stats`` maps pid -> (parent
    pid, ticks) as ``parse_pid_stat`` gives them."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        found.append(pid)
        todo += children.get(pid, [])
    return found


def tree_ticks(stats: dict[int, tuple[int, int]], root: int) -> int:
    """CPU ticks of ``root`` and every live descendant, each with its reaped children's.

    No time counts twice: a live process's own time is in nobody's children's time until it
    has exited and been reaped, and then it is no longer in ``stats``."""
    return sum(stats[pid][1] for pid in descendants(stats, root))


def proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, ticks) of every process now (/proc)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stats[int(entry.name)] = parse_pid_stat(f.read())
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    return stats


def tree_seconds(root: int) -> float:
    """CPU seconds (user + system) a server has used so far: ``root``, every process it
    started (recursively) and the children they reaped, from /proc. A process that exits
    between the reads of this scan may be missed or counted twice: an error of one short
    process, not of a server's run."""
    return tree_ticks(proc_stats(), root) / os.sysconf("SC_CLK_TCK")


def tree_pids(root: int) -> list[int]:
    """``root`` and every live process below it (a server's processes, for their memory)."""
    return descendants(proc_stats(), root)
