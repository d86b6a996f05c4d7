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
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    clients,
    content,
    cpuload,
    drain,
    endtoend,
    freshfs,
    gate,
    harness,
    mailauth,
    metrics,
    peers,
    postfix,
)
from bench.harness import (
    BENCH,
    CASES,
    FULL,
    MESSAGE_SIZE,
    QUICK,
    RESULTS,
    SERVERS,
    STYLES,
    Plan,
    Results,
    alternate,
    cleanup,
    cpu_measure,
    make_server,
    run_smtp_source,
    sent_message,
    turn_dir,
)
from bench.peers import rss_kib, wait_until
from bench.postfix import Postfix
from bench.report import chart, report


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


#: ``relay`` is both relay measures: ``drain`` (the queue filled beforehand) and ``e2e``.
MEASURES = ["throughput", "latency", "memory", "relay", "queue", "dkim", "auth", "gate",
            "rspamd", "metrics"]
PARTS = {"drain": "relay", "e2e": "relay"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few hundred messages, one repeat (about 3 minutes)")
    parser.add_argument("--repeats", type=int, help="repeats of every measure (3; quick: 1)")
    parser.add_argument("--only", default=",".join(MEASURES),
                        help=f"comma-separated measures of {MEASURES} (or, of relay, only "
                             "drain or e2e)")
    parser.add_argument("--processes", type=int, default=harness.PROCESSES,
                        help="[server] processes of the mailsrv under test (default: the "
                             f"number of cores, {harness.PROCESSES}, as the server's own default 0)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated servers")
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
    harness.BASELINE = args.baseline
    why_not = "--no-fresh-fs" if args.no_fresh_fs else freshfs.available()
    harness.FRESH_FS = why_not is None
    RESULTS.filesystem = (f"a fresh ext4 ({freshfs.SIZE} loop-mounted image) per server's turn"
                          if harness.FRESH_FS else f"directories under {args.workdir} ({why_not})")
    harness.PROCESSES = args.processes
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
        if name not in SERVERS and name != "mailsrv-base":
            parser.error(f"unknown server {name!r}")
    postfix.postfix_root()  # smtp-source, smtp-sink and the Postfix peer
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
            drain.measure_relay(plan, names, work)
        if "relay" in only or "e2e" in only:
            endtoend.measure_relay_e2e(plan, names, work)
        if "queue" in only and "mailsrv" in names:
            drain.measure_queue_scale(plan, work)
        if ("dkim" in only or "auth" in only) and "mailsrv" in names:
            if "dkim" in only:
                mailauth.measure_dkim_relay(plan, work)
            if "auth" in only:
                mailauth.measure_auth_receive(plan, work)
        if ("gate" in only or "rspamd" in only) and "mailsrv" in names:
            variants = ["off"] + [v for v in ("dnsbl+greylist", "rspamd")
                                  if ("gate" if v != "rspamd" else "rspamd") in only]
            gate.measure_gate(plan, work, variants)
        if "metrics" in only and "mailsrv" in names:
            metrics.measure_metrics(plan, work)
    finally:
        if not os.environ.get("BENCH_KEEP"):
            freshfs.unmount_all()
        cleanup(work)
    print(f"\n(took {time.monotonic() - started:.0f} s)\n")
    print(report(RESULTS, "quick" if args.quick else "full", plan, names, args.out,
                 harness.PROCESSES))
    png = chart(RESULTS, names, args.out) \
        if any(m.startswith("throughput") for m in RESULTS.samples) else None
    if png:
        print(f"chart: {png}")
    return 1 if RESULTS.failures else 0


if __name__ == "__main__":
    sys.exit(main())
