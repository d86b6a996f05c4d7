"""
The cost of the gate against spam (issue 14): DNS blocklists and greylisting, and rspamd,
each against the same mailsrv receiving the same messages without it, in the same run.

Every variant: durable local delivery of N messages of 5 KB, each with its own Message-ID,
from ten client addresses 127.0.0.10-19 (one per connection, outside
``relay.trusted_networks``, which is 127.0.0.1/32 here) over 10 connections of
bench/clients.py; the authentication checks ([checks] spf, dkim_verify, dmarc, arc,
protect_local_domains) off in every variant, so that only the gate differs.

- ``off``: neither layer.
- ``dnsbl+greylist``: ``[dnsbl]`` three zones (two blocklists, one allowlist) served by the
  loopback twisted.names server, which lists none of the clients (NXDOMAIN) but 127.0.0.2;
  ``[greylist]`` on with ``auto_allow = 0`` (every RCPT goes through the triplet store, the
  costlier path: with the default 5 the client network would skip it after five passes) and
  ``delay`` 0.5 s, the one triplet (127.0.0.0/24, sender, recipient) made known by a warm-up
  before the clock starts: its first attempt must get ``451 4.7.1``, a retry after the delay
  ``250``.
- ``rspamd``: ``[rspamd]`` pointed at a private Debian rspamd (tests/support/rspamd.py:
  the tests' configuration, its thresholds far above what these messages score, so every
  message gets ``no action``; hyperscan on, as an installed rspamd runs; RSPAMD_WORKERS
  normal workers), ``on_failure = "tempfail"`` so that a message that was not scanned is not
  delivered (the count check catches it).

Checked: every message delivered once with its own body (``content.check_each``); the gate
on (a listed client 127.0.0.2 refused at MAIL with 554, the first attempt greylisted) or off
(both accepted); with rspamd, one scan logged per message and none failed.

Where rspamd's time goes: beside the rate and mailsrv's own CPU per message, rspamd's
processes' CPU per message (/proc of its main process and its children), the scan wait per
message as mailsrv logs it (``rspamd id=… time=…``: from handing the request to the reactor
to having the answer, in the delivery thread), and rspamd's own time per task from its log.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

from bench import clients, content
from bench.harness import DNS, RESULTS, Plan, alternate, cleanup, make_server
from bench.peers import DOMAIN, wait_until
from bench.receipt import timed_receipt

VARIANTS = ["off", "dnsbl+greylist", "rspamd"]
SENDER = "bench@sender.test"
RECIPIENT = f"alice@{DOMAIN}"
#: One client address per connection, none in relay.trusted_networks (127.0.0.1/32 here).
SOURCES = [f"127.0.0.{n}" for n in range(10, 20)]
#: A client the blocklist lists (bl.test, weight 2: the threshold).
LISTED = "127.0.0.2"
GREY_DELAY = 0.5
WARM_UP = 20  # messages through each variant before the clock starts
RSPAMD_WORKERS = 2  # rspamd's normal workers (2 cores here)
ZONE = {"2.0.0.127.bl.test": [["A", "127.0.0.2"]]}
OFF_CHECKS = {"spf": False, "dkim_verify": False, "dmarc": False, "arc": False,
              "protect_local_domains": False}


def measure(variant: str, what: str = "msg/s") -> str:
    """``gate off msg/s``, ``gate rspamd CPU ms/msg`` (mailsrv's own), ``gate rspamd scan
    wait ms/msg``…"""
    return f"gate {variant} {what}"


def messages(count: int, tag: str) -> dict[str, bytes]:
    """``count`` messages of about 5 KB, each with its own Message-ID and first body line."""
    line = b"x" * 76 + b"\r\n"
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    made: dict[str, bytes] = {}
    for i in range(count):
        msgid = f"<gate{tag}{i}.{time.time_ns()}@sender.test>"
        made[msgid] = (f"From: Bench <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
                       f"Subject: gate {tag} {i}\r\nDate: {date}\r\nMessage-ID: {msgid}\r\n\r\n"
                       f"message {i}\r\n").encode() + line * 64
    return made


def overrides(variant: str, rspamd_url: str | None) -> dict[str, dict]:
    config: dict[str, dict] = {"relay": {"trusted_networks": ["127.0.0.1/32"]},
                               "checks": dict(OFF_CHECKS)}
    if variant == "dnsbl+greylist":
        config["dnsbl"] = {"zones": {"bl.test": 2, "weak.test": 1}, "threshold": 2,
                           "allow_zones": ["ok.test"], "timeout": 3}
        config["greylist"] = {"enabled": True, "delay": GREY_DELAY, "auto_allow": 0}
    if variant == "rspamd":
        config["rspamd"] = {"url": rspamd_url, "timeout": 20, "on_failure": "tempfail"}
    return config


def mail_reply(port: int, source: str) -> int:
    """The reply to MAIL FROM of a client connecting from ``source`` (then QUIT)."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, local_hostname=clients.CLIENT_NAME, timeout=30,
                      source_address=(source, 0)) as client:
        client.ehlo()
        code = client.mail(SENDER)[0]
        client.rset()
    return code


def warm_up(port: int, variant: str) -> list[str]:
    """The gate seen on (or off), then WARM_UP messages: what was not as expected."""
    gate = variant == "dnsbl+greylist"
    problems = []
    code = mail_reply(port, LISTED)
    if code != (554 if gate else 250):
        problems.append(f"listed client {LISTED}: MAIL answered {code}")
    first = list(messages(1, "first").values())
    accepted, errors = clients.send_prepared(port, first, SENDER, RECIPIENT, connections=1,
                                             source=SOURCES[0])
    if gate and (accepted or not any("got 451" in e for e in errors)):
        problems.append(f"first attempt of the triplet not greylisted: {errors}")
    if not gate and accepted != 1:
        problems.append(f"first message refused: {errors}")
    if gate:
        time.sleep(GREY_DELAY + 0.3)
    accepted, errors = clients.send_prepared(port, list(messages(WARM_UP, "warm").values()),
                                             SENDER, RECIPIENT, source=SOURCES)
    if accepted != WARM_UP:
        problems.append(f"warm-up: {accepted} of {WARM_UP} accepted: {errors[:1]}")
    return problems


# ------------------------------------------------------------------------------- rspamd


def process_tree_seconds(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and of its children, now (/proc)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if int(entry.name) == root or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def whole_log(path: Path) -> str:
    """The server's log with the files twistd rotated away (at 1 MB: ``mailsrv.log.1`` is
    the one before ``mailsrv.log``, ``.2`` before it…), oldest first: a run's lines are those
    past the length it had before."""
    rotated = sorted(path.parent.glob(path.name + ".*"), reverse=True,
                     key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else -1)
    return "".join(p.read_text(errors="replace") for p in [*rotated, path] if p.exists())


def scan_times(log: str) -> tuple[list[float], int]:
    """mailsrv's scan waits (s) in a piece of its log, and the failed scans."""
    waits = [float(t) for t in re.findall(r"rspamd id=\S+ action=.*? time=([\d.]+)", log)]
    return waits, len(re.findall(r"rspamd id=\S+ failed:", log))


def rspamd_task_times(log: str) -> list[float]:
    """rspamd's own time per task (ms), from its log's task lines (``time: 5.12ms``)."""
    return [float(t) for t in re.findall(r"rspamd_task_write_log.*?time: ([\d.]+)ms", log)]


def start_rspamd(wd: Path, dns_port: int):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.rspamd import RspamdServer

    server = RspamdServer(wd / "rspamd", dns_port, workers=RSPAMD_WORKERS, hyperscan=True,
                          timeout=120)
    try:  # scans before the hyperscan database is loaded use PCRE: wait for every worker's
        wait_until(lambda: server.log_text().count("loading hyperscan expressions")
                   >= RSPAMD_WORKERS, 120, "rspamd's workers to load hyperscan", 0.2)
    except RuntimeError:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------------------------- run


def measure_gate(plan: Plan, work: Path, variants: list[str]) -> None:
    count = plan.gate_messages
    print(f"== gate: {count} messages of 5 KB from {SOURCES[0]}-{SOURCES[-1].rsplit('.')[-1]} "
          f"(not trusted), 10 connections, durable local delivery; variants {variants}",
          flush=True)

    def one(variant: str, r: int) -> None:
        wd = work / f"gate-{variant.replace('+', '-')}-{r}"
        wd.mkdir(parents=True)
        dns = DNS(wd, ZONE)
        server = rspamd = None
        try:
            if variant == "rspamd":
                rspamd = start_rspamd(wd, dns.port)
            server = make_server("mailsrv", wd, dns_port=dns.port,
                                 overrides=overrides(variant, rspamd and rspamd.url))
            server.start()
            problems = warm_up(server.port, variant)
            sent = messages(count, f"{r}{variant}")
            log_offset = len(whole_log(server.log_path))
            rspamd_log_offset = len(rspamd.log_text()) if rspamd else 0
            got = timed_receipt(
                server, list(sent.values()), SENDER, RECIPIENT, SOURCES,
                beside=(lambda: process_tree_seconds(rspamd.process.pid)) if rspamd else None)
            accepted, errors, new, load = got.accepted, got.errors, got.new, got.load
            cpu, rspamd_cpu, elapsed = got.cpu, got.beside_cpu, got.elapsed
            checked, wrong = content.check_each(
                content.read_files(server.maildir_root, new), sent)
            problems += wrong
            if rspamd:
                waits, failed = scan_times(whole_log(server.log_path)[log_offset:])
                tasks = rspamd_task_times(rspamd.log_text()[rspamd_log_offset:])
                if len(waits) != count or failed:
                    problems.append(f"{len(waits)} scans logged for {count} messages, "
                                    f"{failed} failed")
            ok = accepted == count and len(new) == count and not problems
            check = (f"{count} sent, {accepted} accepted, {len(new)} in new/, bodies "
                     + ("as sent" if not problems else "WRONG")
                     + {"off": ", gate off (listed client and first attempt accepted)",
                        "dnsbl+greylist": ", listed client 554, first attempt 451",
                        "rspamd": f", {count} scans, {RSPAMD_WORKERS} rspamd workers"}[variant])
            if errors:
                check += f" (client: {errors[0][:200]})"
            if problems:
                print(f"  CHECK FAILED: gate {variant}:\n    " + "\n    ".join(problems),
                      flush=True)
                check += ": " + "; ".join(problems[:2])
            RESULTS.add(measure(variant), "mailsrv", count / elapsed, check, ok, load)
            RESULTS.add(measure(variant, "CPU ms/msg"), "mailsrv", 1000 * cpu / count, check,
                        ok, load)
            if rspamd:
                RESULTS.add(measure(variant, "rspamd CPU ms/msg"), "mailsrv",
                            1000 * rspamd_cpu / count, check, ok, load)
                if waits:
                    RESULTS.add(measure(variant, "scan wait ms/msg"), "mailsrv",
                                1000 * statistics.fmean(waits), check, ok, load)
                    RESULTS.add(measure(variant, "scan wait p50 ms"), "mailsrv",
                                1000 * statistics.median(waits), check, ok, load)
                if tasks:
                    RESULTS.add(measure(variant, "rspamd task ms"), "mailsrv",
                                statistics.fmean(tasks), check, ok, load)
        finally:
            if server is not None:
                server.stop()
            if rspamd is not None:
                rspamd.stop()
            dns.stop()
            cleanup(wd)

    alternate(variants, plan.repeats, one, server="mailsrv")
