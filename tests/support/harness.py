"""
Real servers for the end-to-end tests: the DNS server and ``twistd -n mailsrv`` as subprocesses,
on loopback ports the kernel chose, with everything they write under the test's tmp_path.
"""

from __future__ import annotations

import json
import mailbox
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The checkout's code (and its twisted/plugins directory) comes first.
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


#: ``twistd`` with the checkout's plugin first: twisted.plugins.__path__ puts the installed
#: Twisted's own plugin directory first, so a mailsrv once pip-installed (not editable) in the
#: same environment would otherwise have twistd load that copy's mailsrv_plugin.py.
TWISTD = [
    sys.executable, "-c",
    "import twisted.plugins; twisted.plugins.__path__.insert(0, "
    f"{str(REPO / 'twisted' / 'plugins')!r}); "
    "from twisted.scripts.twistd import run; run()",
]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if it is still there 15 s later: how a test ends a twistd it ran."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class DNSServer:
    """tests/support/dns_server.py on 127.0.0.1, serving ``zone``."""

    def __init__(self, workdir: Path, zone: dict, port: int | None = None) -> None:
        """``port``: a given one (a test that restarts the server with another zone)."""
        self.workdir = workdir
        self.zone_file = workdir / "zone.json"
        self.zone_file.write_text(json.dumps(zone))
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("dns_server.py")), str(self.zone_file)]
            + ([str(port)] if port else []),
            stdout=subprocess.PIPE, stderr=open(workdir / "dns.log", "wb"), env=_env(),
        )
        line = self.process.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise AssertionError(f"DNS server did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def render_config(config: dict[str, Any]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for table, values in config.items():
        if isinstance(values, dict):
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


class MailServer:
    """``twistd -n mailsrv --config …`` listening on 127.0.0.1 on a port the kernel chose."""

    def __init__(
        self,
        workdir: Path,
        dns_port: int,
        *,
        users: list[str] | None = None,
        aliases: list[str] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        hostname: str = "mx.example.org",
    ) -> None:
        self.workdir = workdir
        self.root = workdir / "mailboxes"
        self.queue = workdir / "queue"
        self.log_path = workdir / "mailsrv.log"
        users_file = workdir / "users"
        users = users if users is not None else DEFAULT_USERS
        users_file.write_text("\n".join(users) + "\n")
        if any(line.partition(":")[2].strip() for line in users):
            users_file.chmod(0o640)  # password hashes: the server refuses a file others read
        aliases_file = workdir / "aliases"
        aliases_file.write_text("\n".join(aliases if aliases is not None else DEFAULT_ALIASES) + "\n")
        self.config: dict[str, Any] = {
            "hostname": hostname,
            "smtp": {"listen": ["tcp:0:interface=127.0.0.1"]},
            "domains": {"local": ["example.org", "example.net"]},
            "mailboxes": {"root": str(self.root), "users": str(users_file),
                          "aliases": str(aliases_file)},
            "queue": {"path": str(self.queue)},
            "relay": {"trusted_networks": ["127.0.0.0/8", "::1/128"],
                      "dns_servers": [f"127.0.0.1:{dns_port}"], "port": 2525},
            # No DKIM keys: never those of a mailsrv installed on this machine.
            "dkim": {"keys": str(workdir / "dkim")},
            # One process unless a test asks for more (tests/e2e/test_processes.py): the tests
            # read the log right after a reply, and a receiving process's lines reach the
            # parent's log just after it ([server] processes, README "Several processes").
            # MAILSRV_TEST_PROCESSES=2 runs every e2e test with that many.
            "server": {"processes": int(os.environ.get("MAILSRV_TEST_PROCESSES", "1"))},
        }
        (workdir / "dkim").mkdir(mode=0o755, exist_ok=True)  # empty: any user may read it
        for table, values in (overrides or {}).items():
            self.config.setdefault(table, {}).update(values)
        self.config_path = workdir / "mailsrv.toml"
        self.write_config()
        self.process: subprocess.Popen | None = None
        self.port = 0
        #: (configured endpoint, "smtp" or "submission", port) of every listener, in order.
        self.listeners: list[tuple[str, str, int]] = []
        #: twistd's own options before "mailsrv", e.g. ["--uid", "mail", "--gid", "mail"].
        self.twistd_options: list[str] = []
        #: False: twistd logs to its standard output, here the log file, as the Debian unit
        #: has it (receiving processes write their lines there themselves); True: to the
        #: file named by --logfile (twistd's LogFile; the parent relays those lines).
        self.logfile_option = False

    def write_config(self) -> None:
        """Write ``self.config`` to the file again, after the test changed it."""
        self.config_path.write_text(render_config(self.config))

    def set_config(self, table: str | None, key: str, value: Any) -> None:
        """Set one key of the configuration (top level when ``table`` is None) and write it."""
        if table is None:
            self.config[key] = value
        else:
            self.config.setdefault(table, {})[key] = value
        self.write_config()

    def command(self) -> list[str]:
        logfile = ["--logfile", str(self.log_path)] if self.logfile_option else []
        return [
            *TWISTD, "-n", "--pidfile=", *logfile, *self.twistd_options,
            "mailsrv", "--config", str(self.config_path),
        ]

    def start(self) -> "MailServer":
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = open(self.workdir / "twistd.out", "ab")
        self.process = subprocess.Popen(
            self.command(), cwd=self.workdir, env=_env(), stderr=out,
            stdout=out if self.logfile_option else open(self.log_path, "ab"),
        )

        def listening():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"mailsrv exited with {self.process.returncode}:\n"
                    + (self.workdir / "twistd.out").read_text()
                )
            text = self.log_text()[offset:] if self.log_path.exists() else ""
            found = re.findall(
                r"listening on (\S+) \(127\.0\.0\.1 port (\d+)\) for (\w+)", text
            )
            wanted = len(self.config["smtp"]["listen"]) + len(
                self.config.get("submission", {}).get("listen", [])
            )
            if len(found) < wanted:
                return None
            # With several processes the parent listens at once but answers connections
            # only once its receiving processes are ready ([server] processes).
            processes = self.config["server"].get("processes", 1) or len(
                os.sched_getaffinity(0))
            if processes > 1 and "accepting connections: " not in text:
                return None
            return found

        found = wait_for(listening, START_TIMEOUT, "mailsrv to listen")
        self.listeners = [(endpoint, kind, int(port)) for endpoint, port, kind in found]
        self.port = self.listeners[0][2]
        return self

    def port_of(self, kind: str, tls: bool = False) -> int:
        """The port of the first ``kind`` listener, implicit TLS (ssl:) or not."""
        for endpoint, listener_kind, port in self.listeners:
            if listener_kind == kind and endpoint.startswith("ssl:") == tls:
                return port
        raise AssertionError(f"no {kind} listener (tls={tls}) in {self.listeners}")

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        processes = self.config["server"].get("processes", 1) or len(os.sched_getaffinity(0))
        if processes > 1 and self.process is not None:
            # A receiving process's lines may reach the log a moment after the reply they
            # describe, through the parent or not (README "Several processes"): read once
            # the log has stopped growing for a moment, as an administrator reading it would.
            deadline, size = time.monotonic() + 2.0, -1
            while time.monotonic() < deadline:
                now = self.log_path.stat().st_size
                if now == size:
                    break
                size = now
                time.sleep(0.05)
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        """``mailsrv ARGS --config <this server's file>`` from the checkout, its output as text."""
        return subprocess.run(
            [sys.executable, "-m", "mailsrv.tools.cli", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=timeout)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a power cut of the process."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def mailbox_path(self, address: str) -> Path:
        """Where ``address``'s Maildir is (root/domain/user), made or not."""
        user, domain = address.split("@")
        return self.root / domain / user

    def maildir(self, address: str) -> mailbox.Maildir:
        return mailbox.Maildir(self.mailbox_path(address), create=False)

    def messages(self, address: str) -> list[Any]:
        path = self.mailbox_path(address)
        if not path.exists():
            return []
        try:
            return list(self.maildir(address))
        except FileNotFoundError:
            return []  # the server is creating this Maildir (cur/ is not there yet)

    def connect(self, timeout: float = 10.0) -> "RawClient":
        return RawClient(self.port, timeout)


DEFAULT_USERS = ["alice@example.org", "bob@example.org", "carol@example.net"]
DEFAULT_ALIASES = [
    "postmaster: alice@example.org",
    "sales@example.org: alice@example.org, bob@example.org",
    "team@example.org: sales@example.org, carol@example.net",
    "outside@example.org: alice@example.org, someone@remote.test",
]


class RawClient:
    """A plain socket speaking SMTP byte for byte, for hostile input; it can switch to TLS
    (``starttls``) or start in it (``context`` given: implicit TLS, as on port 465)."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1",
                 source: str | None = None, context: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname="mx.example.org")
        self.buffer = b""
        self.greeting = self.reply()

    def starttls(self, context: ssl.SSLContext) -> None:
        """After the server's 220 to STARTTLS: a TLS handshake on the same socket."""
        assert self.buffer == b"", f"the server sent more than its 220: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="mx.example.org")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; buffered {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        """One whole reply: (code, text of all its lines joined by newlines)."""
        lines = []
        while True:
            line = self.line()
            lines.append(line[4:].decode("ascii", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def command(self, text: bytes | str) -> tuple[int, str]:
        if isinstance(text, str):
            text = text.encode()
        self.send(text + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 10.0) -> bool:
        """True when the server has closed the connection (after any pending bytes)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def free_port(hosts: list[str], attempts: int = 50) -> int:
    """A TCP port number free on every one of ``hosts`` (all sinks of a test share it)."""
    for _ in range(attempts):
        probe = socket.socket()
        probe.bind((hosts[0], 0))
        port = probe.getsockname()[1]
        probe.close()
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port free on all of {hosts} after {attempts} tries")


class SMTPSink:
    """tests/support/sink.py on HOST (127.0.0.x): a remote MX that records what it accepts."""

    def __init__(self, workdir: Path, host: str = "127.0.0.2", *, hostname: str = "mx.remote.test",
                 port: int = 0, tls: tuple[Path, Path] | None = None,
                 auth: dict | None = None, rules: dict | None = None) -> None:
        self.workdir = Path(workdir)
        self.outdir = self.workdir / "received"
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.rules_file = self.workdir / "rules.json"
        self.set_rules(rules or {})
        self.host = host
        config = {"host": host, "port": port, "hostname": hostname, "outdir": str(self.outdir),
                  "rules_file": str(self.rules_file), "mail_log": str(self.workdir / "mail.log"),
                  "tls": {"cert": str(tls[0]), "key": str(tls[1])} if tls else None,
                  "auth": auth}
        config_path = self.workdir / "sink.json"
        config_path.write_text(json.dumps(config))
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("sink.py")), str(config_path)],
            stdout=subprocess.PIPE, stderr=open(self.workdir / "sink.log", "wb"), env=_env(),
        )
        line = self.process.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise AssertionError(f"SMTP sink did not start on {host}:{port}: {line!r} "
                                 + (self.workdir / "sink.log").read_text())
        self.port = int(line.split()[1])

    def set_rules(self, rules: dict) -> None:
        tmp = self.rules_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rules))
        os.replace(tmp, self.rules_file)

    def messages(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.outdir.glob("*.json"))]

    def mail_commands(self) -> list[str]:
        """Every MAIL command line the sink was sent, accepted or not."""
        path = self.workdir / "mail.log"
        return path.read_text().splitlines() if path.exists() else []

    def wait_for_messages(self, count: int, timeout: float = 20.0) -> list[dict]:
        return wait_for(lambda: (lambda m: m if len(m) >= count else None)(self.messages()),
                        timeout, f"{count} message(s) at the sink on {self.host}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
