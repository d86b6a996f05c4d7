"""
Relaying end to end (issue 18): mail accepted over SMTP for a remote recipient, queued, and
relayed to Postfix's ``smtp-sink`` on loopback; the clock stops when the last message is at
the sink. Beside the queue-drain figure (bench/drain.py ``measure_relay``), which times only the
sending of a queue filled beforehand, this one includes what accepting remote mail costs.

- Load: ``smtp-source -N -s 10 -m N -l 5120 -t u@sink.test`` from 127.0.0.1, in both client
  styles (sessions kept open with ``-d``, and a connection per message); ``-N`` numbers the
  recipients (``1u@sink.test`` … ``Nu@sink.test``), so the sink shows which messages came.
- mailsrv: ``relay.trusted_networks`` holds 127.0.0.1; sink.test's MX (``mx.sink.test``,
  127.0.0.1) comes from the loopback twisted.names server (``relay.dns_servers``), the
  sink's port is ``relay.port``, ``relay.tls = "none"``. Postfix: ``relayhost =
  [127.0.0.1]:PORT`` (no DNS), as in the queue-drain measure.
- Clock: from just before smtp-source starts until the last dump file at the sink was last
  written (its mtime); the sink writes one file per transaction (``smtp-sink -d``).
- Checks: the sink holds exactly N messages, one for each of the N recipients (none twice,
  none missing), each with the run's Subject and exactly the body smtp-source sent
  (bench/content.py); for mailsrv, its log has a ``status=sent`` line through
  ``mx.sink.test`` for each, i.e. every one went where the bench's DNS said.
- Beside the rate: how fast the server accepted them (until smtp-source had its last ``250``
  and quit: ``… accepted msg/s``), the server's CPU per message (every process of it: mailsrv's parent, which
  relays, and its receiving processes; Postfix's master and all its daemons) and the machine's
  idle and steal over the run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections import Counter
from pathlib import Path

from bench import content, cpuload
from bench.gate import whole_log
from bench.harness import (
    DNS,
    MESSAGE_SIZE,
    RESULTS,
    STYLES,
    Plan,
    Sink,
    alternate,
    cleanup,
    cpu_measure,
    make_server,
    run_smtp_source,
    sent_message,
    turn_dir,
)
from bench.mailauth import sink_message
from bench.peers import wait_until
from bench.postfix import Postfix

SESSIONS = 10
RCPT = "u@sink.test"


def measure(style: str, what: str = "msg/s") -> str:
    """``relay e2e c10 open msg/s`` (at the sink), ``relay e2e c10 open accepted msg/s``."""
    return f"relay e2e c{SESSIONS} {style} {what}"


def sink_files(sink_dir: Path) -> list[tuple[str, bytes]]:
    """Every dump file at the sink: (name, bytes)."""
    return [(p.name, p.read_bytes()) for p in sorted(sink_dir.iterdir())]


def check_sink(files: list[tuple[str, bytes]], count: int,
               expected: content.Expected) -> tuple[int, list[str]]:
    """The sink's dump files against what was sent: exactly one message for each recipient
    ``1u@sink.test`` … ``<count>u@sink.test`` (smtp-source -N), one recipient each, and every
    message as sent (content.check: Subject, From, body). Returns (files, problems)."""
    problems: list[str] = []
    rcpts: Counter[str] = Counter()
    messages = []
    for name, data in files:
        head = data.split(b"\n\n", 1)[0]
        found = re.findall(rb"(?m)^X-Rcpt-Args: <([^>]*)>", head)
        if len(found) != 1:
            problems.append(f"{name}: {len(found)} recipients, expected one")
        rcpts.update(r.decode(errors="replace").lower() for r in found)
        # The dump ends with an empty line of the sink's own after the message.
        messages.append(("sink", name, sink_message(data.removesuffix(b"\n"))))
    wanted = {f"{i}{RCPT}" for i in range(1, count + 1)}
    twice = sorted(r for r, n in rcpts.items() if n > 1)
    missing = sorted(wanted - set(rcpts))
    other = sorted(set(rcpts) - wanted)
    for what, which in (("relayed more than once", twice), ("never at the sink", missing),
                        ("not sent", other)):
        if which:
            problems.append(f"{len(which)} recipient(s) {what}, e.g. {which[:3]}")
    checked, wrong = content.check(messages, expected)
    return checked, problems + wrong


def sent_lines(log: str) -> int:
    """mailsrv's ``relay … relay=mx.sink.test[…] … status=sent`` lines: a message sent to the
    host the bench's DNS server named as sink.test's MX."""
    return len(re.findall(r"(?m)^.*\brelay id=\S+ .*\brelay=mx\.sink\.test\[.*\bstatus=sent\b",
                          log))


def measure_relay_e2e(plan: Plan, names: list[str], work: Path) -> None:
    count = plan.relay_e2e_messages
    print(f"== relay end to end: {count} messages of 5 KB over SMTP ({SESSIONS} sessions, kept "
          "open and a connection per message) to a remote recipient, relayed to a loopback "
          "smtp-sink", flush=True)
    relay_names = [n for n in names if n in ("mailsrv", "mailsrv-base", "postfix")]

    def one(name: str, r: int) -> None:
        for style in STYLES:
            relay(name, style, count, work / f"e2e-{name}-{style.replace('/', '-')}-{r}")

    alternate(relay_names, plan.repeats, one)


def relay(name: str, style: str, count: int, wd: Path) -> None:
    turn_dir(wd)
    sink = Sink(wd)
    dns = None
    server = None
    subject = f"bench {name} e2e {style} {os.urandom(6).hex()}"
    expected = dataclasses.replace(sent_message(), headers={
        "From": sent_message().headers["From"], "Subject": subject})
    try:
        if name == "postfix":
            server = Postfix(wd, relayhost=f"[127.0.0.1]:{sink.port}")
        else:
            dns = DNS(wd)
            server = make_server(name, wd, dns_port=dns.port, relay_port=sink.port,
                                 overrides={"queue": {"retry_schedule": [3600]},
                                            "relay": {"tls": "none"}})
        server.start()
        with cpuload.Interval() as load:
            cpu = server.cpu_seconds()
            start = time.time()
            done = run_smtp_source(server.port, SESSIONS, count, 1, MESSAGE_SIZE, 300,
                                   to=RCPT, subject=subject, keep_open=STYLES[style],
                                   numbered=True)
            accepted = time.time()  # smtp-source has had its last 250 and quit
            try:
                wait_until(lambda: sink.count() >= count, 300, "every message at the sink",
                           0.005)
            except RuntimeError:
                pass
            cpu = server.cpu_seconds() - cpu
        mailsrv = name.startswith("mailsrv")

        def settled() -> tuple[list[tuple[str, bytes]], int, list[str], int]:
            files = sink_files(sink.dir)
            checked, problems = check_sink(files, count, expected)
            via_dns = sent_lines(whole_log(server.log_path)) if mailsrv else count
            return files, checked, problems, via_dns

        # A transaction's file is made when it starts and complete at its end, and mailsrv
        # logs a send after the sink's 250: on a busy machine either may come a moment late.
        def complete() -> tuple[list[tuple[str, bytes]], int, list[str], int] | None:
            found = settled()
            return found if not found[2] and found[3] == count else None

        try:
            files, checked, problems, via_dns = wait_until(
                complete, 15, "every message complete at the sink and logged as sent", 0.3)
        except RuntimeError:
            files, checked, problems, via_dns = settled()
        stop = max((e.stat().st_mtime for e in os.scandir(sink.dir)), default=start)
        elapsed = max(stop - start, 1e-6)
        check = f"{count} sent, {len(files)} at the sink"
        if mailsrv:
            check += f", {via_dns} sent via sink.test's MX"
            if via_dns != count:
                problems.append(f"{via_dns} relay lines with relay=mx.sink.test[...] "
                                f"status=sent in mailsrv's log, expected {count}")
        check += ", each recipient once, content as sent" if not problems else ": WRONG"
        if done.returncode:
            check += f" (smtp-source: {done.stderr.strip()[-200:]})"
        if problems:
            print(f"  RELAY CHECK FAILED: {name} relay e2e {style}:\n    "
                  + "\n    ".join(problems), flush=True)
            check += " " + "; ".join(problems[:2])
        ok = done.returncode == 0 and len(files) == count and checked == count and not problems
        RESULTS.add(measure(style), name, count / elapsed, check, ok, load.result)
        RESULTS.add(cpu_measure(measure(style)), name, 1000 * cpu / count, check, ok,
                    load.result)
        RESULTS.add(measure(style, "accepted msg/s"), name,
                    count / max(accepted - start, 1e-6), check, ok, load.result)
    finally:
        if server is not None:
            server.stop()
        if dns is not None:
            dns.stop()
        sink.stop()
        cleanup(wd)
