"""
mailsrv against Postfix, Twisted's mail server and aiosmtpd, on this machine, on loopback.

    python -m bench [--quick] [--repeats N] [--only throughput,latency,...] [--out DIR]

Every figure is a median of repeats; within a repeat the servers take turns (the order rotates
each repeat), so that all of them share the same noisy time window of this machine. Every
result line carries its count check: messages sent against files found in ``new/`` (or at the
relay sink). The table goes to stdout and to ``DIR/results.md`` / ``results.json``, the chart of
throughput against concurrency to ``DIR/throughput.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import clients, content, cpuload, freshfs, peers
from bench.peers import DOMAIN, SENDER, Mailsrv, Postfix, rss_kib, wait_until

BENCH = Path(__file__).resolve().parent
ORDER = ["mailsrv", "postfix", "twisted", "aiosmtpd"]


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
        [peers.postfix_tool("smtp-source"), *(["-d"] if keep_open else []),
         *(["-N"] if numbered else []),
         "-s", str(sessions), "-m", str(messages), "-l", str(size), "-r", str(rcpts),
         "-f", sender, "-t", to, *(["-S", subject] if subject else []), f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=time_limit, env=peers.postfix_env(),
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


def throughput(server: peers.Server, case: str, messages: int, results: Results,
               style: str = "open") -> None:
    """Messages/s from the first connect to the last link into new/, with its count check and
    the content check of every file the run delivered (bench/content.py), and the server's
    CPU per message (every process of it) over the same interval."""
    sessions, rcpts = CASES[case]
    subject = f"bench {server.name} {case} {os.urandom(6).hex()}"
    sent = dataclasses.replace(sent_message(),
                               headers={**sent_message().headers, "Subject": subject})
    before = server.delivered()
    expected = messages * rcpts
    with cpuload.Interval() as load:
        cpu = server.cpu_seconds()
        start = time.time()
        done = run_smtp_source(server.port, sessions, messages, rcpts, MESSAGE_SIZE, 300,
                               subject=subject, keep_open=STYLES[style])
        try:
            wait_until(lambda: server.count() - len(before) >= expected, 120,
                       f"{server.name}: {expected} files in new/", 0.01)
        except RuntimeError:
            pass
        cpu = server.cpu_seconds() - cpu
    elapsed = max(server.last_delivery() - start, 1e-6)
    new = server.delivered() - before
    checked, problems = content.check(content.read_files(server.maildir_root, new), sent)
    ok = done.returncode == 0 and len(new) == expected and not problems
    check = (f"{messages}x{rcpts} sent, {len(new)} in new/, content of {checked} "
             + ("as sent" if not problems else "WRONG"))
    if done.returncode:
        check += f" (smtp-source: {done.stderr.strip()[-200:]})"
    if problems:
        print(f"  CONTENT CHECK FAILED: {server.name} throughput {case}:\n    "
              + "\n    ".join(problems), flush=True)
        check += ": " + "; ".join(problems[:2])
    measure = f"throughput {case} {style}"
    results.add(measure, server.name, messages / elapsed, check, ok, load.result)
    results.add(cpu_measure(measure), server.name, 1000 * cpu / messages, check, ok, load.result)


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
    return peers.ALL[name](workdir, **kwargs)


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


def measure_throughput(plan: Plan, names: list[str], work: Path) -> None:
    print("== durable local delivery (smtp-source, 5 KB messages), sessions kept open (-d) "
          "and a connection per message", flush=True)

    def one(name: str, r: int) -> None:
        server = make_server(name, turn_dir(work / f"tp-{name}-{r}"))
        try:
            server.start()
            if isinstance(server, Postfix) and not RESULTS.postfix_settings:
                RESULTS.postfix_settings = server.non_default_settings()
            for case in CASES:
                for style in STYLES:
                    throughput(server, case, plan.messages[case], RESULTS, style)
        finally:
            server.stop()
            cleanup(server.workdir)

    alternate(names, plan.repeats, one)


#: Messages per second offered over the one session of the c1 latency measure: far below
#: any server's c1 throughput, so that each message meets an idle server (issue 18's target is
#: "the p99 latency of one message at 1 session").
C1_LATENCY_RATE = 20


def measure_latency(plan: Plan, names: list[str], work: Path) -> None:
    print("== latency at half the saturated rate (10 connections, end of DATA -> 250), and of "
          f"one session at {C1_LATENCY_RATE} msg/s", flush=True)

    def one(name: str, r: int) -> None:
        saturated = RESULTS.median("throughput c10 open", name)
        if not saturated:
            raise RuntimeError("no saturated rate measured (throughput c10 open)")
        rate = saturated / 2
        count = max(50, min(5000, int(rate * plan.latency_seconds)))
        server = make_server(name, turn_dir(work / f"lat-{name}-{r}"))
        try:
            server.start()
            c1_count = max(100, int(C1_LATENCY_RATE * plan.latency_seconds * 2))
            for label, offered, sent, connections in (
                    ("latency", rate, count, 10),
                    ("latency c1", C1_LATENCY_RATE, c1_count, 1)):
                before = server.count()
                with cpuload.Interval() as load:
                    lat = sorted(clients.latency(server.port, offered, sent,
                                                 connections=connections))
                if server.name == "postfix":  # delivery into new/ follows the 250
                    try:
                        wait_until(lambda b=before, n=sent: server.count() - b >= n, 60, "deliveries")
                    except RuntimeError:
                        pass
                found = server.count() - before
                ok = len(lat) == sent and found == sent
                check = (f"{sent} sent at {offered:.0f}/s over {connections} connection(s), "
                         f"{len(lat)} answered, {found} in new/")
                RESULTS.add(f"{label} p50 ms", name, 1000 * lat[len(lat) // 2], check, ok,
                            load.result)
                RESULTS.add(f"{label} p99 ms", name,
                            1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], check, ok,
                            load.result)
        finally:
            server.stop()
            cleanup(server.workdir)

    alternate(names, plan.repeats, one)


def tree_kib(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or VmHWM) summed over a server's processes: with ``[server] processes`` > 1,
    mailsrv's connections live in its receiving processes, not in the parent."""
    total = 0
    for p in cpuload.tree_pids(pid):
        try:
            total += rss_kib(p, field)
        except (OSError, RuntimeError):
            pass  # gone meanwhile, or a zombie without memory
    return total


def measure_memory(plan: Plan, names: list[str], work: Path) -> None:
    print(f"== memory: {plan.idle_connections} idle connections; one "
          f"{plan.big_message >> 20} MB message", flush=True)
    single = [n for n in names if n != "postfix"]  # Postfix: a process per connection

    def one(name: str, r: int) -> None:
        server = make_server(name, turn_dir(work / f"mem-{name}-{r}"))
        try:
            server.start()
            pid = server.pids()[0]
            time.sleep(0.5)
            base = tree_kib(pid)
            with cpuload.Interval() as load:
                idle = clients.IdleConnections(server.port, plan.idle_connections)
                try:
                    time.sleep(1.0)
                    held = tree_kib(pid)
                    # Still answering? One more connection must get its greeting.
                    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                        alive = s.recv(100).startswith(b"220")
                finally:
                    idle.close()
            per = (held - base) * 1024 / plan.idle_connections
            RESULTS.add("idle bytes/conn", name, per,
                        f"{len(idle.sockets) or plan.idle_connections} connections held, "
                        f"server {'answering' if alive else 'NOT answering'}", alive,
                        load.result)
            time.sleep(1.0)
            before = server.count()
            base = tree_kib(pid)
            for p in cpuload.tree_pids(pid):
                peers.reset_hwm(p)
            with cpuload.Interval() as load:
                code = clients.big_message(server.port, plan.big_message)
                peak = tree_kib(pid, "VmHWM")
            found = server.count() - before
            RESULTS.add("big msg RSS growth MiB", name, (peak - base) / 1024,
                        f"reply {code}, {found} in new/", code == 250 and found == 1,
                        load.result)
        finally:
            server.stop()
            cleanup(server.workdir)

    alternate(single, plan.repeats, one)


# ---------------------------------------------------------------------------------- relay


class Sink:
    """Postfix's smtp-sink on 127.0.0.1, dumping each transaction to a file (the count)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "sink"
        self.dir.mkdir(parents=True)
        shutil.chown(self.dir, "nobody")
        self.port = peers.free_port()
        self.process = subprocess.Popen(
            [peers.postfix_tool("smtp-sink"), "-u", "nobody", "-d", f"{self.dir}/%H%M%S.",
             f"127.0.0.1:{self.port}", "256"], stdout=subprocess.DEVNULL,
            stderr=open(workdir / "sink.log", "wb"), env=peers.postfix_env())

        wait_until(lambda: peers.greets(self.port), 20, "smtp-sink")
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


RELAY_BODY = b"Subject: relay bench\n\n" + (b"x" * 76 + b"\n") * 66  # about 5 KB


def fill_mailsrv_queue(qdir: Path, count: int, due_in: float = 0.0, durable: bool = True) -> None:
    """``count`` queued messages of 5 KB to ``uN@sink.test``, as the server would store them.

    ``durable``: through ``queue.enqueue`` (fsync'd, as after SMTP); otherwise written plainly
    and synced once at the end (for 100,000 messages, where only the load matters).
    """
    from mailsrv.storage import envelope, queue

    queue.queue_dirs(qdir)
    now = time.time()
    messages = qdir / "messages"
    for i in range(count):
        queue_id = queue.new_queue_id()
        prefix = f"Received: by bench (mailsrv) id {queue_id}\n".encode()
        if durable:
            body = qdir / "incoming" / queue_id
            body.write_bytes(RELAY_BODY)
            queue.enqueue(qdir, queue_id, sender="alice@example.org",
                          recipients=[f"u{i}@sink.test"], prefix=prefix, body_path=body,
                          created=now, received_from="bench")
            continue
        message = envelope.new_message(queue_id, sender="alice@example.org",
                                       recipients=[f"u{i}@sink.test"], prefix=prefix,
                                       created=now, received_from="bench")
        if due_in:
            message = dataclasses.replace(message, recipients=tuple(
                dataclasses.replace(r, next_attempt=now + due_in) for r in message.recipients))
        (messages / f"{queue_id}.body").write_bytes(RELAY_BODY)
        (messages / f"{queue_id}.json").write_bytes(envelope.encode(message))
    os.sync()


#: The relay measure of issue 6: draining a queue filled beforehand (the end-to-end relay of
#: issue 18 is bench/endtoend.py).
DRAIN = "relay queue drain msg/s"


def measure_relay(plan: Plan, names: list[str], work: Path) -> None:
    count = plan.relay_messages
    print(f"== relay, queue drain: {count} queued messages of 5 KB to a loopback smtp-sink",
          flush=True)
    relay_names = [n for n in names if n in ("mailsrv", "mailsrv-base", "postfix")]

    def one(name: str, r: int) -> None:
        wd = turn_dir(work / f"relay-{name}-{r}")
        sink = Sink(wd)
        dns = DNS(wd) if name.startswith("mailsrv") else None
        server: peers.Server | None = None
        try:
            if name.startswith("mailsrv"):
                # One process: the relayer (the parent's) alone. Receiving processes would
                # start while it sends the queue, on the same cores, and be ready after.
                server = make_server(name, wd, dns_port=dns.port, relay_port=sink.port,
                                     processes=1,
                                     overrides={"queue": {"retry_schedule": [3600]},
                                                "relay": {"tls": "none"}})
                fill_mailsrv_queue(server.queue, count)
                server.start(accepting=False)
                wait_until(lambda: "queue loaded" in server.log_text(), 120,
                           "the queue to load", 0.005)
                start = time.monotonic()
                early = sink.count()
                cpu_start = cpuload.snapshot()
                cpu = server.cpu_seconds()
            else:
                server = Postfix(wd, relayhost=f"[127.0.0.1]:{sink.port}",
                                 extra={"defer_transports": "smtp"})
                server.start()
                done = run_smtp_source(server.port, 10, count, 1, 5120, 300, to="u@sink.test")
                if done.returncode:
                    raise RuntimeError(f"smtp-source: {done.stderr[-300:]}")
                queue_dir = server.dir / "queue"

                def queued() -> int:
                    return sum(len(f) for sub in ("incoming", "active", "deferred")
                               for _, _, f in os.walk(queue_dir / sub))

                wait_until(lambda: queued() >= count, 120, "every message in Postfix's queue",
                           0.05)
                server.postconf(defer_transports="")
                server.command("reload")
                start = time.monotonic()
                cpu_start = cpuload.snapshot()
                cpu = server.cpu_seconds()
                early = sink.count()
                server.command("flush")
            try:
                wait_until(lambda: sink.count() >= count, 300, "every message at the sink",
                           0.005)
            except RuntimeError:
                pass
            elapsed = time.monotonic() - start
            cpu = server.cpu_seconds() - cpu
            load = cpuload.between(cpu_start, cpuload.snapshot())
            got = sink.count()
            check = f"{count} queued, {got} at the sink"
            if early:  # the clock started late: the figure would be too high
                check += f", but {early} of them there before the clock started: WRONG"
            ok = got == count and not early
            RESULTS.add(DRAIN, name, count / elapsed, check, ok, load)
            RESULTS.add(cpu_measure(DRAIN), name, 1000 * cpu / count, check, ok, load)
        finally:
            if server is not None:
                server.stop()
            if dns is not None:
                dns.stop()
            sink.stop()
            cleanup(wd)

    alternate(relay_names, plan.repeats, one)


def measure_queue_scale(plan: Plan, work: Path) -> None:
    count = plan.queue_scale
    print(f"== queue scale: mailsrv start-up with {count} queued messages", flush=True)
    wd = turn_dir(work / "scale")
    server = Mailsrv(wd, processes=PROCESSES, overrides={"queue": {"retry_schedule": [3600]}})
    try:
        fill_mailsrv_queue(server.queue, count, due_in=3600, durable=False)
        for _ in range(plan.repeats):
            offset = len(server.log_text())
            cpu_start = cpuload.snapshot()
            t0 = time.monotonic()
            server.start(timeout=300)
            m = wait_until(lambda offset=offset: re.search(r"queue loaded: (\d+) message",
                                             server.log_text()[offset:]), 300,
                           "the queue to load", 0.01)
            elapsed = time.monotonic() - t0
            load = cpuload.between(cpu_start, cpuload.snapshot())
            time.sleep(0.5)
            rss = rss_kib(server.pids()[0]) / 1024
            loaded = int(m.group(1))
            check = f"{count} queued, {loaded} loaded"
            RESULTS.add("queue start-up s", "mailsrv", elapsed, check, loaded == count, load)
            RESULTS.add("queue RSS MiB", "mailsrv", rss, check, loaded == count, load)
            server.stop()
    finally:
        server.stop()
        cleanup(wd)


RESULTS = Results()
#: ``relay`` is both relay measures: ``drain`` (the queue filled beforehand) and ``e2e``.
MEASURES = ["throughput", "latency", "memory", "relay", "queue", "dkim", "auth", "gate",
            "rspamd", "metrics"]
PARTS = {"drain": "relay", "e2e": "relay"}


def main(argv: list[str] | None = None) -> int:
    global BASELINE, PROCESSES, FRESH_FS
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few hundred messages, one repeat (about 3 minutes)")
    parser.add_argument("--repeats", type=int, help="repeats of every measure (3; quick: 1)")
    parser.add_argument("--only", default=",".join(MEASURES),
                        help=f"comma-separated measures of {MEASURES} (or, of relay, only "
                             "drain or e2e)")
    parser.add_argument("--processes", type=int, default=PROCESSES,
                        help="[server] processes of the mailsrv under test (default: the "
                             f"number of cores, {PROCESSES}, as the server's own default 0)")
    parser.add_argument("--servers", default=",".join(ORDER), help="comma-separated servers")
    parser.add_argument("--out", type=Path,
                        help="where the table and chart go (bench/results for a full run of "
                             "every measure, bench/results/partial otherwise, so that a quick "
                             "or partial run never replaces the published figures)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="disk-backed directory for the servers' files (/var/tmp)")
    parser.add_argument("--no-fresh-fs", action="store_true",
                        help="plain directories under --workdir, not a fresh ext4 per "
                             "server's turn (bench.freshfs; made when root and mkfs.ext4 can)")
    parser.add_argument("--baseline", metavar="PYTHON",
                        help="also run the mailsrv installed in this Python, as mailsrv-base "
                             "(before/after comparisons of a change)")
    args = parser.parse_args(argv)
    BASELINE = args.baseline
    why_not = "--no-fresh-fs" if args.no_fresh_fs else freshfs.available()
    FRESH_FS = why_not is None
    RESULTS.filesystem = (f"a fresh ext4 ({freshfs.SIZE} loop-mounted image) per server's turn"
                          if FRESH_FS else f"directories under {args.workdir} ({why_not})")
    PROCESSES = args.processes
    plan = dataclasses.replace(QUICK if args.quick else FULL)
    if args.repeats:
        plan.repeats = args.repeats
    only = args.only.split(",")
    for measure in only:
        if measure not in MEASURES and measure not in PARTS:
            parser.error(f"unknown measure {measure!r}")
    if args.out is None:
        complete = not args.quick and set(MEASURES) <= set(only)
        args.out = BENCH / "results" if complete else BENCH / "results" / "partial"
    names = [n for n in args.servers.split(",") if n]
    if args.baseline and "mailsrv-base" not in names:
        names.insert(1, "mailsrv-base")
    for name in names:
        if name not in peers.ALL and name != "mailsrv-base":
            parser.error(f"unknown server {name!r}")
    peers.postfix_root()  # smtp-source, smtp-sink and the Postfix peer
    # 10,000 idle connections: descriptors for them here and in the servers (inherited).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < plan.idle_connections + 1000:
        plan.idle_connections = max(100, hard - 1000)
        print(f"RLIMIT_NOFILE hard limit {hard}: holding {plan.idle_connections} connections")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mailsrv-bench-", dir=args.workdir))
    work.chmod(0o755)  # Postfix's daemons (users postfix, nobody) must reach their files
    started = time.monotonic()
    print(f"mailsrv bench ({'quick' if args.quick else 'full'}), work in {work}, the servers' "
          f"files on {RESULTS.filesystem}", flush=True)
    try:
        if "throughput" in only or "latency" in only:
            measure_throughput(plan, names, work)
        if "latency" in only:
            measure_latency(plan, names, work)
        if "memory" in only:
            measure_memory(plan, names, work)
        if "relay" in only or "drain" in only:
            measure_relay(plan, names, work)
        if "relay" in only or "e2e" in only:
            from bench import endtoend  # issue 18's measure; it imports this module

            endtoend.measure_relay_e2e(plan, names, work)
        if "queue" in only and "mailsrv" in names:
            measure_queue_scale(plan, work)
        if ("dkim" in only or "auth" in only) and "mailsrv" in names:
            from bench import mailauth  # issue 13's measures; it imports this module

            if "dkim" in only:
                mailauth.measure_dkim_relay(plan, work)
            if "auth" in only:
                mailauth.measure_auth_receive(plan, work)
        if ("gate" in only or "rspamd" in only) and "mailsrv" in names:
            from bench import gate  # issue 14's measures; it imports this module

            variants = ["off"] + [v for v in ("dnsbl+greylist", "rspamd")
                                  if ("gate" if v != "rspamd" else "rspamd") in only]
            gate.measure_gate(plan, work, variants)
        if "metrics" in only and "mailsrv" in names:
            from bench import metrics  # issue 17's measure; it imports this module

            metrics.measure_metrics(plan, work)
    finally:
        if not os.environ.get("BENCH_KEEP"):
            freshfs.unmount_all()
        cleanup(work)
    print(f"\n(took {time.monotonic() - started:.0f} s)\n")
    from bench.report import chart, report  # it imports this module

    print(report(RESULTS, "quick" if args.quick else "full", plan, names, args.out, PROCESSES))
    png = chart(RESULTS, names, args.out) \
        if any(m.startswith("throughput") for m in RESULTS.samples) else None
    if png:
        print(f"chart: {png}")
    return 1 if RESULTS.failures else 0


if __name__ == "__main__":
    sys.exit(main())
