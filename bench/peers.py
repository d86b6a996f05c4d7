"""
The four servers under test, each set up from nothing in its own directory, started on a
127.0.0.1 port chosen here, and stopped afterwards:

- ``Mailsrv``: the real ``twistd -n mailsrv --config …`` (as installed in this Python).
- ``Postfix`` (bench/postfix.py): Debian's postfix with its own ``config_directory``
  (main.cf/master.cf written there), its own queue, virtual Maildir delivery for the test
  domain, ``inet_interfaces = 127.0.0.1`` and one smtpd on a high port; ``postfix -c DIR
  start`` / ``stop``.
- ``TwistedMail``: Twisted's own ESMTP + Maildir domain (bench/twisted_server.py), no fsync.
- ``Aiosmtpd``: aiosmtpd with an fsync'ing Maildir handler (bench/aiosmtpd_server.py).

Every server knows the same users (``alice`` and ``2alice`` … ``10alice``: smtp-source's
``-r N`` prepends a number to the recipient) at ``example.org`` and can count the files in their
``new/`` directories, which is the count check of every measurement.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import content, cpuload

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# The tests' TOML writer serves the bench's configurations too.
sys.path.insert(0, str(REPO / "tests"))
from support.harness import render_config  # noqa: E402

DOMAIN = "example.org"
USERS = ["alice"] + [f"{n}alice" for n in range(2, 11)]
SENDER = "bench@client.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it is true; RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or VmHWM…) of a process in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def reset_hwm(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def count_new(root: Path, users: list[str] = USERS) -> int:
    total = 0
    for user in users:
        try:
            total += sum(1 for _ in os.scandir(root / user / "new"))
        except FileNotFoundError:
            pass
    return total


def last_new_mtime(root: Path, users: list[str] = USERS) -> float:
    """When the last entry was linked into any new/ (a directory's mtime changes then)."""
    latest = 0.0
    for user in users:
        try:
            latest = max(latest, os.stat(root / user / "new").st_mtime)
        except FileNotFoundError:
            pass
    return latest


class Server:
    """A server under test: ``start`` returns its port; ``count`` is the files in every new/."""

    name = "?"
    durable = True

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def maildir_root(self) -> Path:
        """The directory holding ``<user>/new`` for every test user."""
        raise NotImplementedError

    def start(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def pids(self) -> list[int]:
        """The processes whose memory is the server's (one for the Python servers)."""
        return [self.process.pid] if self.process is not None else []

    def cpu_seconds(self) -> float:
        """CPU seconds the server has used so far: its first process, every process it started
        and those they reaped (cpuload.tree_seconds): a server's CPU per message, whether it
        is one process (aiosmtpd, Twisted) or many (Postfix, mailsrv's receiving processes)."""
        pids = self.pids()
        return cpuload.tree_seconds(pids[0]) if pids else 0.0

    def count(self) -> int:
        return count_new(self.maildir_root)

    def delivered(self) -> set[tuple[str, str]]:
        """Every ``(user, file name)`` in the users' new/ (a run's files: after - before)."""
        return content.new_files(self.maildir_root, USERS)

    def last_delivery(self) -> float:
        return last_new_mtime(self.maildir_root)

    def _start_script(self, script: str, *args: str) -> int:
        """Run a bench/*.py server that prints ``PORT <n>`` when it listens."""
        log = open(self.workdir / "server.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / script), *args],
            stdout=subprocess.PIPE, stderr=log, cwd=self.workdir,
        )
        line = self.process.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {line!r} "
                               + (self.workdir / "server.log").read_text()[-2000:])
        self.port = int(line.split()[1])
        return self.port


class TwistedMail(Server):
    name = "twisted"
    durable = False

    @property
    def maildir_root(self) -> Path:
        return self.workdir / "mail"

    def start(self) -> int:
        (self.workdir / "mail").mkdir(parents=True, exist_ok=True)
        return self._start_script("twisted_server.py", str(self.maildir_root), DOMAIN, *USERS)


class Aiosmtpd(Server):
    name = "aiosmtpd"

    @property
    def maildir_root(self) -> Path:
        return self.workdir / "mail"

    def start(self) -> int:
        (self.workdir / "mail").mkdir(parents=True, exist_ok=True)
        return self._start_script("aiosmtpd_server.py", str(self.maildir_root), DOMAIN, *USERS)


class Mailsrv(Server):
    """``twistd -n mailsrv`` with a generated config: loopback, no reverse DNS, high limits."""

    name = "mailsrv"

    def __init__(self, workdir: Path, *, dns_port: int = 0, relay_port: int = 25,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 python: str = sys.executable, name: str = "mailsrv",
                 processes: int | None = None) -> None:
        super().__init__(workdir)
        #: ``[server] processes`` (the bench's ``--processes``; None: not in the config, for a
        #: ``--baseline`` mailsrv that may predate the key); with more than one, connections
        #: are answered once the parent logs "accepting connections" (README "Several
        #: processes").
        self.processes = processes
        #: The Python whose installed mailsrv runs (another one: an older version, compared).
        self.python = python
        self.name = name
        self.queue = workdir / "queue"
        self.log_path = workdir / "mailsrv.log"
        (workdir / "users").write_text("".join(f"{u}@{DOMAIN}\n" for u in USERS))
        (workdir / "aliases").write_text(f"postmaster: alice@{DOMAIN}\n")
        config: dict[str, Any] = {
            "hostname": "mailsrv.bench",
            "smtp": {"listen": ["tcp:0:interface=127.0.0.1:backlog=4096"],
                     "reverse_dns": False,
                     "max_connections": 20000, "max_connections_per_ip": 20000,
                     "max_message_size": 200 * 1024 * 1024,
                     "idle_timeout": 600, "data_timeout": 600},
            "domains": {"local": [DOMAIN]},
            "mailboxes": {"root": str(workdir / "mailboxes"), "users": str(workdir / "users"),
                          "aliases": str(workdir / "aliases")},
            "queue": {"path": str(self.queue)},
            # Never the machine's resolver: a loopback twisted.names server when relaying is
            # measured, otherwise an address where nothing answers (no lookup is made then).
            "relay": {"trusted_networks": ["127.0.0.0/8"],
                      "dns_servers": [f"127.0.0.1:{dns_port or 9}"], "port": relay_port},
        }
        if processes is not None:
            config["server"] = {"processes": processes}
        for table, values in (overrides or {}).items():
            config.setdefault(table, {}).update(values)
        self.config_path = workdir / "mailsrv.toml"
        self.config_path.write_text(render_config(config))

    @property
    def maildir_root(self) -> Path:
        return self.workdir / "mailboxes" / DOMAIN

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60.0, accepting: bool = True) -> int:
        """Start the server; return once it listens and (``accepting``, with several
        processes) answers. ``accepting=False`` returns at "listening on", before the
        receiving processes are ready: the relayer may be sending already (the queue-drain
        measure starts its clock at "queue loaded", which comes first)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.started_at = time.monotonic()
        # Logging as the Debian unit does (twistd -n without --logfile: to standard output,
        # where the receiving processes write their lines themselves), into a file here.
        self.process = subprocess.Popen(
            [self.python, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "mailsrv", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=open(self.log_path, "ab"),
            stderr=open(self.workdir / "twistd.out", "ab"),
        )

        def listening() -> int:
            if self.process.poll() is not None:
                raise RuntimeError(f"mailsrv exited with {self.process.returncode}: "
                                   + (self.workdir / "twistd.out").read_text()[-2000:]
                                   + self.log_text()[-2000:])
            text = self.log_text()[offset:]
            m = re.search(r"listening on \S+ \(127\.0\.0\.1 port (\d+)\)", text)
            several = ((self.processes or len(os.sched_getaffinity(0))) > 1
                       if self.processes is not None else "receiving processes" in text)
            if m and accepting and several and "accepting connections: " not in text:
                return 0  # several processes: they answer once the parent says so
            return int(m.group(1)) if m else 0

        self.port = wait_until(listening, timeout, "mailsrv to listen", 0.02)
        return self.port
