"""
The relay measure of issue 6, draining a queue filled beforehand (mailsrv and Postfix, to a
loopback smtp-sink), and mailsrv's start-up with a large queue. The end-to-end relay of
issue 18 (accepted over SMTP, then relayed) is bench/endtoend.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

from bench import cpuload, harness, peers
from bench.harness import (
    DNS,
    RESULTS,
    Plan,
    Sink,
    alternate,
    cleanup,
    cpu_measure,
    make_server,
    run_smtp_source,
    turn_dir,
)
from bench.peers import Mailsrv, rss_kib, wait_until
from bench.postfix import Postfix

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


#: The queue-drain figure's name.
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
    server = Mailsrv(wd, processes=harness.PROCESSES, overrides={"queue": {"retry_schedule": [3600]}})
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
