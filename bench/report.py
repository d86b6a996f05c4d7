"""
The bench's report: the table of every measure (median, and the machine's idle and steal CPU
over each), the targets met or not with the same ratio from the servers' CPU per message, the
raw samples in results.json, and the chart of throughput against concurrency.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

from bench import cpuload
from bench.harness import QUIET_SAMPLE, STYLES, Plan, Results, cpu_measure

#: (label, measure, ratio against, minimum ratio): issue 18's targets (issue 6's queue drain
#: kept); each followed in the table by the same ratio of the servers' CPU per message.
TARGETS = [
    *((f"durable {case} {style} >= {ratio}x {peer.capitalize()}", f"throughput {case} {style}",
       peer, ratio)
      for case in ("c10", "c50") for peer, ratio in (("postfix", 1.5), ("aiosmtpd", 1.3))
      for style in STYLES),
    *((f"durable c10r10 {style} >= 1.2x Postfix", f"throughput c10r10 {style}", "postfix", 1.2)
      for style in STYLES),
    *((f"relay end to end c10 {style} >= 1.5x Postfix", f"relay e2e c10 {style} msg/s",
       "postfix", 1.5) for style in STYLES),
    ("relay queue drain >= 1.0x Postfix", "relay queue drain msg/s", "postfix", 1.0),
]
#: (label, measure, against, maximum ratio): lower is better.
AT_MOST = [
    ("latency p99 of one session <= Postfix's", "latency c1 p99 ms", "postfix", 1.0),
    ("latency p99 (10 connections at half the c10 rate) <= Postfix's", "latency p99 ms",
     "postfix", 1.0),
]
#: (label, measure, against which measure of the same server, minimum ratio): issue 13
RATIOS = [
    ("DKIM-signed relay (RSA-2048) >= 0.8x unsigned", "dkim relay rsa msg/s",
     "dkim relay unsigned msg/s", 0.8),
    ("DKIM-signed relay (Ed25519) >= 0.8x unsigned", "dkim relay ed25519 msg/s",
     "dkim relay unsigned msg/s", 0.8),
    ("receive with every check on >= 0.7x checks off", "auth receive checks on msg/s",
     "auth receive checks off msg/s", 0.7),
    ("receive with every check on >= 0.7x durable c10 (smtp-source, trusted client)",
     "auth receive checks on msg/s", "throughput c10 open", 0.7),
    # issue 14: within 15 % of the rate without them
    ("receive with DNSBL and greylisting on (triplet known) >= 0.85x without",
     "gate dnsbl+greylist msg/s", "gate off msg/s", 0.85),
]
#: (label, measure, against which measure of the same server): ratios shown without a target
INFO_RATIOS = [
    ("receive with rspamd on / off (issue 14: no target; the rate and where the time goes)",
     "gate rspamd msg/s", "gate off msg/s"),
]
LIMITS = [
    ("idle connection ({idle} held) <= 3 KiB", "idle bytes/conn", 3072),
    ("{big} MB message: RSS growth <= 5 MiB", "big msg RSS growth MiB", 5),
    ("start-up with {queue} queued messages < 5 s", "queue start-up s", 5),
]


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.splitlines()
    total = mem[1].split()[1] if len(mem) > 1 else "?"
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores "
            f"(nproc), {cpu}; {total} RAM (free -h); Linux {platform.release()}; "
            f"Python {platform.python_version()}")


def report(results: Results, plan_name: str, plan: Plan, names: list[str], out: Path,
           processes: int) -> str:
    """The table of every measure, the CPU load beside each, the targets; written to
    ``out/results.md`` and ``results.json``."""
    lines = [f"Run: `python -m bench{' --quick' if plan_name == 'quick' else ''}` — {machine()}",
             "", f"mailsrv: `[server] processes = {processes}`"
             + (" (one process)" if processes == 1 else " (receiving processes; the parent "
                "accepts and relays)"), "",
             f"The servers' files: {results.filesystem}.", "",
             "| measure | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for measure, per in results.samples.items():
        cells = []
        for name in names:
            value = results.median(measure, name)
            n = len(per.get(name, []))
            load = cpuload.summary(results.loads.get(measure, {}).get(name, []))
            notes = "; ".join(x for x in (f"n={n}" if n > 1 else "", load) if x)
            cells.append("—" if value is None
                         else f"{value:,.1f}" + (f" ({notes})" if notes else ""))
        lines.append(f"| {measure} | " + " | ".join(cells) + " |")
    lines.append("| CPU with the bench quiet | "
                 + " | ".join(cpuload.summary(results.background.get(name, [])) or "—"
                              for name in names) + " |")
    lines += ["", "In brackets: CPU idle (idle + iowait) and steal, in % of all "
              f"{os.cpu_count()} cores, from /proc/stat over each measured interval (a range: "
              "lowest-highest over repeats, or over turns in the last row). The server and "
              "the load generator are part of the busy share; the last row is the machine without the bench "
              f"({QUIET_SAMPLE} s before each turn of that server), where idle well below 100% "
              "or any steal means other load shared the run.",
              "", "| target | measured | met? |", "|---|---|---|"]
    for label, measure, peer, minimum in TARGETS:
        ours, theirs = results.median(measure, "mailsrv"), results.median(measure, peer)
        if ours is None or not theirs:
            lines.append(f"| {label} | not measured | — |")
            continue
        ratio = ours / theirs
        lines.append(f"| {label} | {ratio:.2f}x ({ours:,.0f} / {theirs:,.0f}) | "
                     f"{'yes' if ratio >= minimum else 'NO'} |")
        cpu = [results.median(cpu_measure(measure), n) for n in ("mailsrv", peer)]
        if all(cpu):
            lines.append(f"| ↳ the same from the servers' CPU per message | "
                         f"{cpu[1] / cpu[0]:.2f}x ({peer} {cpu[1]:.2f} / mailsrv {cpu[0]:.2f} "
                         f"ms) | {'yes' if cpu[1] / cpu[0] >= minimum else 'NO'} |")
    for label, measure, peer, maximum in AT_MOST:
        ours, theirs = results.median(measure, "mailsrv"), results.median(measure, peer)
        if ours is None or not theirs:
            lines.append(f"| {label} | not measured | — |")
            continue
        lines.append(f"| {label} | {ours / theirs:.2f}x ({ours:,.1f} / {theirs:,.1f}) | "
                     f"{'yes' if ours / theirs <= maximum else 'NO'} |")
    for label, measure, against, minimum in RATIOS:
        ours, theirs = results.median(measure, "mailsrv"), results.median(against, "mailsrv")
        if ours is None or not theirs:
            continue  # the measure was not run (--only)
        ratio = ours / theirs
        lines.append(f"| {label} | {ratio:.2f}x ({ours:,.0f} / {theirs:,.0f}) | "
                     f"{'yes' if ratio >= minimum else 'NO'} |")
        cpu = [results.median(m.replace(" msg/s", " CPU ms/msg"), "mailsrv")
               for m in (measure, against) if m.endswith(" msg/s")]
        if len(cpu) == 2 and all(cpu):
            lines.append(f"| ↳ the same from the server's CPU per message | "
                         f"{cpu[1] / cpu[0]:.2f}x ({cpu[1]:.2f} / {cpu[0]:.2f} ms) | "
                         f"{'yes' if cpu[1] / cpu[0] >= minimum else 'NO'} |")
    for label, measure, against in INFO_RATIOS:
        ours, theirs = results.median(measure, "mailsrv"), results.median(against, "mailsrv")
        if ours is not None and theirs:
            lines.append(f"| {label} | {ours / theirs:.2f}x ({ours:,.0f} / {theirs:,.0f}) | — |")
    for label, measure, limit in LIMITS:
        label = label.format(idle=f"{plan.idle_connections:,}", big=plan.big_message >> 20,
                             queue=f"{plan.queue_scale:,}")
        ours = results.median(measure, "mailsrv")
        if ours is None:
            lines.append(f"| {label} | not measured | — |")
            continue
        lines.append(f"| {label} | {ours:,.1f} | {'yes' if ours <= limit else 'NO'} |")
    lines += ["", "Count and content checks: " + ("all passed" if not results.failures
                                                   else "FAILED: " + "; ".join(results.failures))]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"machine": machine(), "plan": plan_name, "samples": results.samples,
         "checks": results.checks, "cpu": results.loads, "cpu_bench_quiet": results.background,
         "postfix_non_default_settings": results.postfix_settings,
         "mailsrv_processes": processes, "filesystem": results.filesystem,
         "failures": results.failures}, indent=1))
    return text


def chart(results: Results, names: list[str], out: Path) -> Path | None:
    """Throughput against concurrency, one panel per client style."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (bench/run installs it)")
        return None
    fig, axes = plt.subplots(1, len(STYLES), figsize=(11, 4.5), dpi=110, sharey=True)
    xs = [1, 10, 50]
    for ax, style in zip(axes, STYLES):
        for name in names:
            ys = [results.median(f"throughput c{c} {style}", name) for c in xs]
            if all(y is not None for y in ys):
                label = name + (" (no fsync)" if name == "twisted" else "")
                ax.plot(xs, ys, marker="o", label=label,
                        linestyle="--" if name == "twisted" else "-")
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("concurrent SMTP sessions (smtp-source -s)")
        ax.set_title("sessions kept open (-d)" if STYLES[style]
                     else "a connection per message")
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("messages/second into new/ (5 KB, 1 rcpt)")
    fig.suptitle(f"Local delivery throughput, {os.cpu_count()} cores, median of repeats")
    path = out / "throughput.png"
    fig.tight_layout()
    fig.savefig(path)
    return path
