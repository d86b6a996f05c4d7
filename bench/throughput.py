#!/usr/bin/env python3
"""
Throughput of mailsrv, end to end: ``twistd -n mailsrv`` started the way the tests start it
(tests/support/harness.py, with the loopback test DNS server), N messages sent from C client
threads, each over one persistent smtplib connection, all to alice@example.org.

    python bench/throughput.py [--messages 2000] [--clients 10] [--size 5000]

Prints messages/second (wall clock from the first connect to the last 250), checks that exactly
N new files are in the Maildir and that each holds its own message as sent (every message has
its own Message-ID and body: bench/content.py ``check_each``), splits the CPU time between this
client process and the server process, so that one can tell which side limits the figure, and
prints how idle the machine's CPUs were meanwhile (and their steal: bench/cpuload.py). Exits 1
if the count or a content is wrong or a client failed.
"""

from __future__ import annotations

import argparse
import os
import random
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench import content, cpuload  # noqa: E402
from support.harness import DNSServer, MailServer  # noqa: E402

#: The zone the end-to-end tests serve (tests/conftest.py BASE_ZONE): the loopback client has
#: a verified reverse name, and nothing is ever asked of the machine's own resolver.
ZONE = {
    "records": {
        "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
        "client.test": [["A", "127.0.0.1"]],
    }
}
RECIPIENT = "alice@example.org"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int | str = "self") -> tuple[float, float]:
    """(utime, stime) in seconds of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process."""
    return sum(cpu_times(pid))


def make_message(n: int, size: int, rng: random.Random) -> bytes:
    head = (
        f"From: Bench <bench@client.test>\r\nTo: {RECIPIENT}\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench{n}@client.test>\r\n\r\n"
    ).encode()
    lines = []
    total = len(head)
    while total < size:
        width = min(76, max(0, size - total - 2))
        line = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(width))
        lines.append(line + b"\r\n")
        total += width + 2
    return head + b"".join(lines)


class Client(threading.Thread):
    def __init__(self, port: int, messages: list[bytes], deadline: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.messages = messages
        self.deadline = deadline
        self.sent = 0
        self.last_250 = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, "client.test", timeout=60) as smtp:
                smtp.ehlo("client.test")
                for message in self.messages:
                    if time.monotonic() > self.deadline:
                        raise TimeoutError("run took longer than --timeout")
                    refused = smtp.sendmail("bench@client.test", [RECIPIENT], message)
                    if refused:
                        raise RuntimeError(f"refused: {refused}")
                    self.sent += 1
                    self.last_250 = time.monotonic()
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def run(messages: int, clients: int, size: int, timeout: float) -> int:
    rng = random.Random(1)
    # Pre-built bodies, so that the clock measures SMTP, not message generation.
    bodies = [make_message(n, size, rng) for n in range(messages)]
    shares = [bodies[i::clients] for i in range(clients)]

    with tempfile.TemporaryDirectory(prefix="mailsrv-bench-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "dns").mkdir()
        (tmp_path / "mailsrv").mkdir()
        dns = DNSServer(tmp_path / "dns", ZONE)
        server = None
        try:
            server = MailServer(
                tmp_path / "mailsrv", dns.port,
                overrides={"smtp": {"max_connections_per_ip": max(10, clients),
                                    "max_connections": max(100, clients)}},
            ).start()
            pid = server.process.pid
            threads = [Client(server.port, share, time.monotonic() + timeout) for share in shares]

            server_times0, client_cpu0 = cpu_times(pid), cpu_seconds()
            machine0 = cpuload.snapshot()
            start = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(max(0.1, start + timeout + 60 - time.monotonic()))
            load = cpuload.between(machine0, cpuload.snapshot())
            server_user, server_sys = (b - a for a, b in zip(server_times0, cpu_times(pid)))
            server_cpu = server_user + server_sys
            client_cpu = cpu_seconds() - client_cpu0
            hung = [t for t in threads if t.is_alive()]
            errors = [t.error for t in threads if t.error is not None]
            sent = sum(t.sent for t in threads)
            end = max((t.last_250 for t in threads), default=start)
            wall = end - start

            new = server.root / "example.org" / "alice" / "new"
            stored = len(os.listdir(new)) if new.is_dir() else 0
            sent_by_id = {f"<bench{n}@client.test>": body for n, body in enumerate(bodies)}
            files = content.read_files(new.parent.parent, content.new_files(new.parent.parent,
                                                                            ["alice"]))
            checked, problems = content.check_each(files, sent_by_id)

            print(f"mailsrv throughput: {messages} messages of {size} octets, "
                  f"{clients} clients (one connection each), to {RECIPIENT}")
            print(f"  accepted (250):   {sent}")
            print(f"  wall clock:       {wall:.2f} s (first connect to last 250)")
            print(f"  throughput:       {sent / wall if wall > 0 else 0:.0f} messages/s")
            print(f"  server CPU:       {server_cpu:.2f} s ({100 * server_cpu / wall:.0f}% of one core)"
                  if wall > 0 else f"  server CPU:       {server_cpu:.2f} s")
            print(f"    of which user {server_user:.2f} s, system {server_sys:.2f} s")
            print(f"  client CPU:       {client_cpu:.2f} s ({100 * client_cpu / wall:.0f}% of one core)"
                  if wall > 0 else f"  client CPU:       {client_cpu:.2f} s")
            print(f"  cores:            {os.cpu_count()}; meanwhile {cpuload.summary([load])} "
                  f"(of all cores, whoever used them)")
            count_ok = stored == messages
            print(f"  Maildir new/:     {stored} files "
                  f"({'OK, exactly' if count_ok else 'WRONG, expected'} {messages})")
            print(f"  content:          {checked} files read back, "
                  + ("each its own message as sent" if not problems else "WRONG:"))
            for problem in problems:
                print(f"    {problem}")
            for error in errors[:5]:
                print(f"  client error: {error!r}")
            if hung:
                print(f"  {len(hung)} client thread(s) did not finish")
            return 0 if count_ok and not problems and not errors and not hung else 1
        finally:
            if server is not None:
                server.stop()
            dns.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages in all (2000)")
    parser.add_argument("--clients", type=int, default=10, help="parallel connections (10)")
    parser.add_argument("--size", type=int, default=5000, help="octets per message (5000)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="give up after this many seconds (600)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.clients < 1 or args.size < 200:
        parser.error("--messages and --clients must be >= 1, --size >= 200")
    return run(args.messages, args.clients, args.size, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
