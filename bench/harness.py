"""
What every measure of the bench shares: how much work a run does (``Plan``), the results and
their medians (``Results``), the servers by name and how each turn gets its directory, the
servers taking turns (``alternate``), smtp-source as the load and what it sends, and the
loopback peers of the relay measures (Postfix's smtp-sink, the tests' DNS server).

``python -m bench`` (bench/run.py) sets PROCESSES, FRESH_FS and BASELINE from its options.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench import content, cpuload, freshfs, peers, postfix
from bench.peers import DOMAIN, SENDER, Mailsrv, wait_until

BENCH = Path(__file__).resolve().parent
#: The servers by name, in the default order of their turns.
SERVERS: dict[str, type[peers.Server]] = {
    "mailsrv": Mailsrv, "postfix": postfix.Postfix, "twisted": peers.TwistedMail,
    "aiosmtpd": peers.Aiosmtpd,
}


@dataclasses.dataclass
class Plan:
    """How much work each measurement does (``--quick`` or full)."""

    repeats: int
    messages: dict[str, int]  # throughput case -> messages
    latency_seconds: float
    idle_connections: int
    big_message: int
    relay_messages: int
    queue_scale: int
    dkim_messages: int = 2000  # dkim relay: messages per variant
    auth_messages: int = 2000  # auth receive: messages per variant
    gate_messages: int = 2000  # gate (issue 14): messages per variant
    relay_e2e_messages: int = 2000  # relay end to end (issue 18): per server and client style


#: Quick: counts for the checks, not figures (every throughput case runs in both styles).
QUICK = Plan(repeats=1, messages={"c1": 50, "c10": 200, "c50": 200, "c10r10": 50},
             latency_seconds=1.5, idle_connections=1000, big_message=10 * 2**20,
             relay_messages=200, queue_scale=2000, dkim_messages=200, auth_messages=200,
             gate_messages=200, relay_e2e_messages=200)
FULL = Plan(repeats=3, messages={"c1": 300, "c10": 2000, "c50": 3000, "c10r10": 500},
            latency_seconds=5.0, idle_connections=10000, big_message=100 * 2**20,
            relay_messages=2000, queue_scale=100000)
CASES = {"c1": (1, 1), "c10": (10, 1), "c50": (50, 1), "c10r10": (10, 10)}  # sessions, rcpts
#: The two client styles of every throughput measure (issue 18), each a suffix of the measure's
#: name -> whether smtp-source keeps its sessions open: ``-d`` ("Don't disconnect after sending
#: a message; send the next message over the same connection", smtp-source(1)), or its
#: default, a new connection for every message, which is what MTAs mostly do.
STYLES = {"open": True, "conn/msg": False}
#: ``[server] processes`` of the mailsrv under test (``--processes``; 0 is the server's default,
#: one per core), in the results beside the machine.
PROCESSES = max(1, len(os.sched_getaffinity(0)))


def cpu_measure(measure: str) -> str:
    """The server's CPU per message beside a rate: ``relay e2e c10 open msg/s`` -> ``relay e2e
    c10 open CPU ms/msg``, ``throughput c10 open`` -> ``throughput c10 open CPU ms/msg``."""
    return measure.removesuffix(" msg/s") + " CPU ms/msg"


class Results:
    """Raw samples per (measure, server), their medians, the count checks, and how busy the
    machine was during each sample (cpuload: idle, iowait and steal over its interval)."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.checks: dict[str, dict[str, list[str]]] = {}
        self.loads: dict[str, dict[str, list[dict[str, float]]]] = {}
        #: per server: CPU load over a short pause before each of its turns, the bench quiet
        self.background: dict[str, list[dict[str, float]]] = {}
        self.postfix_settings: dict[str, dict[str, str]] = {}
        #: where the servers' files were (bench.freshfs), for the report
        self.filesystem = "directories"
        self.failures: list[str] = []

    def add(self, measure: str, server: str, value: float, check: str, ok: bool,
            load: dict[str, float]) -> None:
        self.samples.setdefault(measure, {}).setdefault(server, []).append(value)
        self.checks.setdefault(measure, {}).setdefault(server, []).append(check)
        self.loads.setdefault(measure, {}).setdefault(server, []).append(load)
        status = "ok" if ok else "FAILED"
        print(f"  {measure:<22} {server:<13} {value:>12.2f}   [{cpuload.summary([load])}]   "
              f"check: {check} {status}", flush=True)
        if not ok:
            self.failures.append(f"{measure} {server}: {check}")

    def median(self, measure: str, server: str) -> float | None:
        values = self.samples.get(measure, {}).get(server)
        return statistics.median(values) if values else None


MESSAGE_SIZE = 5120  # smtp-source -l: the body of every throughput message


def run_smtp_source(port: int, sessions: int, messages: int, rcpts: int, size: int,
                    time_limit: float, to: str = f"alice@{DOMAIN}", subject: str = "",
                    keep_open: bool = True, sender: str = SENDER,
                    numbered: bool = False) -> subprocess.CompletedProcess:
    """Postfix's C load generator: ``keep_open``, each session sends its messages over one
    connection (``-d``); otherwise a new connection for every message (smtp-source's default).
    ``numbered``: ``-N``, a number 1, 2, … prepended to each message's recipient."""
    return subprocess.run(
        [postfix.postfix_tool("smtp-source"), *(["-d"] if keep_open else []),
         *(["-N"] if numbered else []),
         "-s", str(sessions), "-m", str(messages), "-l", str(size), "-r", str(rcpts),
         "-f", sender, "-t", to, *(["-S", subject] if subject else []), f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=time_limit, env=postfix.postfix_env(),
    )


_SENT: content.Expected | None = None


def sent_message() -> content.Expected:
    """What smtp-source sends in a throughput run, captured once from smtp-source itself."""
    global _SENT
    if _SENT is None:
        raw = content.capture(lambda port: run_smtp_source(
            port, 1, 1, 1, MESSAGE_SIZE, 30, subject="reference", keep_open=False))
        _SENT = content.expected_from(raw)
        body = raw.partition(b"\r\n\r\n")[2]  # -l: body octets, CRLF counted, + final CRLF
        if _SENT.headers.get("Subject") != "reference" or not (
                MESSAGE_SIZE <= len(body) <= MESSAGE_SIZE + 2):
            raise RuntimeError(f"smtp-source's reference message is not as expected: "
                               f"{len(body)} octets of body, {_SENT}")
    return _SENT


def cleanup(path: Path) -> None:
    """Remove a measurement's files (and its file system, FRESH_FS), unless BENCH_KEEP is set
    (to read the servers' logs)."""
    if not os.environ.get("BENCH_KEEP"):
        freshfs.unmount(path)
        shutil.rmtree(path, ignore_errors=True)


#: Each server's turn on a fresh ext4 of its own (bench.freshfs); main() sets it when it can.
FRESH_FS = False


def turn_dir(path: Path) -> Path:
    """A new directory for one server's turn, made the root of a fresh file system when
    FRESH_FS: every peer meets the same disk state (see bench.freshfs for why)."""
    if FRESH_FS:
        freshfs.mount(path)
    else:
        path.mkdir(parents=True)
    return path


#: ``--baseline PYTHON``: a Python with another mailsrv installed, run as "mailsrv-base".
BASELINE: str | None = None


def make_server(name: str, workdir: Path, **kwargs: Any) -> peers.Server:
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "mailsrv-base":  # its own default: it may predate [server] processes
        kwargs.pop("processes", None)
        return Mailsrv(workdir, python=BASELINE, name=name, **kwargs)
    if name == "mailsrv":
        return Mailsrv(workdir, **{"processes": PROCESSES, **kwargs})
    return SERVERS[name](workdir, **kwargs)


#: Seconds of CPU load sampled before each server's turn, while the bench runs nothing.
QUIET_SAMPLE = 0.5


def alternate(names: list[str], repeats: int, body: Callable[[str, int], None],
              server: str | None = None) -> None:
    """Run ``body(server, repeat)`` for every server, the order rotating each repeat; before
    each turn, how busy the machine is without the bench (``Results.background``, under
    ``server`` when the names are variants of one server)."""
    began = time.monotonic()
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            with cpuload.Interval() as quiet:
                time.sleep(QUIET_SAMPLE)
            RESULTS.background.setdefault(server or name, []).append(quiet.result)
            try:
                body(name, r)
            except Exception as exc:  # one server's failure must not hide the others' figures
                print(f"  {name}: ERROR {exc!r}", flush=True)
                RESULTS.failures.append(f"{name}: {exc!r}")
    print(f"  (this measure took {time.monotonic() - began:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------- relay


class Sink:
    """Postfix's smtp-sink on 127.0.0.1, dumping each transaction to a file (the count)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "sink"
        self.dir.mkdir(parents=True)
        shutil.chown(self.dir, "nobody")
        self.port = peers.free_port()
        self.process = subprocess.Popen(
            [postfix.postfix_tool("smtp-sink"), "-u", "nobody", "-d", f"{self.dir}/%H%M%S.",
             f"127.0.0.1:{self.port}", "256"], stdout=subprocess.DEVNULL,
            stderr=open(workdir / "sink.log", "wb"), env=postfix.postfix_env())

        wait_until(lambda: postfix.greets(self.port), 20, "smtp-sink")
        # The probe's own (empty) session wrote nothing; the directory is the count.

    def count(self) -> int:
        return sum(1 for _ in os.scandir(self.dir))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


class DNS:
    """The tests' twisted.names server on 127.0.0.1: sink.test's MX is the sink's host, and
    ``records`` besides (``{name: [[type, value...], ...]}``, tests/support/dns_server.py)."""

    def __init__(self, workdir: Path, records: dict[str, list[list[Any]]] | None = None) -> None:
        zone = workdir / "zone.json"
        zone.write_text(json.dumps({"records": {"sink.test": [["MX", 10, "mx.sink.test"]],
                                                "mx.sink.test": [["A", "127.0.0.1"]],
                                                **(records or {})}}))
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH.parent / "tests" / "support" / "dns_server.py"),
             str(zone)], stdout=subprocess.PIPE, stderr=open(workdir / "dns.log", "wb"))
        line = self.process.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"DNS server did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


RESULTS = Results()
