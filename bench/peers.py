"""
The four servers under test, each set up from nothing in its own directory, started on a
127.0.0.1 port chosen here, and stopped afterwards:

- ``Mailsrv``: the real ``twistd -n mailsrv --config …`` (as installed in this Python).
- ``Postfix``: Debian's postfix with its own ``config_directory`` (main.cf/master.cf written
  here), its own queue, virtual Maildir delivery for the test domain, ``inet_interfaces =
  127.0.0.1`` and one smtpd on a high port; ``postfix -c DIR start`` / ``stop``.
- ``TwistedMail``: Twisted's own ESMTP + Maildir domain (bench/twisted_server.py), no fsync.
- ``Aiosmtpd``: aiosmtpd with an fsync'ing Maildir handler (bench/aiosmtpd_server.py).

Every server knows the same users (``alice`` and ``2alice`` … ``10alice``: smtp-source's
``-r N`` prepends a number to the recipient) at ``example.org`` and can count the files in their
``new/`` directories, which is the count check of every measurement.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import select
import shutil
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
        self.process = subprocess.Popen(
            [self.python, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "--logfile", str(self.log_path),
             "mailsrv", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=open(self.workdir / "twistd.out", "ab"),
            stderr=subprocess.STDOUT,
        )

        def listening() -> int:
            if self.process.poll() is not None:
                raise RuntimeError(f"mailsrv exited with {self.process.returncode}: "
                                   + (self.workdir / "twistd.out").read_text()[-2000:])
            text = self.log_text()[offset:]
            m = re.search(r"listening on \S+ \(127\.0\.0\.1 port (\d+)\)", text)
            several = ((self.processes or len(os.sched_getaffinity(0))) > 1
                       if self.processes is not None else "receiving processes" in text)
            if m and accepting and several and "accepting connections: " not in text:
                return 0  # several processes: they answer once the parent says so
            return int(m.group(1)) if m else 0

        self.port = wait_until(listening, timeout, "mailsrv to listen", 0.02)
        return self.port


# ------------------------------------------------------------------------------- Postfix


#: Where the bench keeps its own copy of Debian's postfix package, unpacked (not installed).
POSTFIX_HOME = Path(os.environ.get("BENCH_POSTFIX_HOME", "/var/tmp/mailsrv-bench-postfix"))


def greets(port: int) -> bool:
    """Whether an SMTP server on 127.0.0.1:``port`` answers a connection with its 220."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(100).startswith(b"220")
    except OSError:
        return False


def postfix_root() -> Path:
    """Debian's postfix, unpacked under POSTFIX_HOME/root; fetched with ``apt-get download``.

    Why not ``apt-get install postfix``: mailsrv's own .deb Conflicts with
    mail-transport-agent, so installing one removes the other, and an installed Postfix may
    start a system instance on port 25. The unpacked copy is run with its own directories
    (daemon_directory, command_directory, shlib_directory… in the private main.cf) and
    LD_LIBRARY_PATH, so it needs nothing installed but its shared libraries (present on
    Debian) and the ``postfix`` user and ``postdrop`` group, which are created when missing.
    """
    root = POSTFIX_HOME / "root"
    if not (root / "usr/sbin/postfix").exists():
        if os.geteuid() != 0:
            raise SystemExit("bench: needs root (apt-get download postfix, postfix user)")
        POSTFIX_HOME.mkdir(parents=True, exist_ok=True)
        for deb in POSTFIX_HOME.glob("postfix_*.deb"):
            deb.unlink()
        fetch = subprocess.run(["apt-get", "download", "postfix"], cwd=POSTFIX_HOME,
                               capture_output=True, text=True)
        if fetch.returncode != 0:  # an empty package list: update it once, then again
            subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
            subprocess.run(["apt-get", "download", "postfix"], cwd=POSTFIX_HOME,
                           check=True, capture_output=True)
        deb = next(POSTFIX_HOME.glob("postfix_*.deb"))
        staging = POSTFIX_HOME / "root.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        os.replace(staging, root)
    try:
        grp.getgrnam("postdrop")
    except KeyError:
        subprocess.run(["groupadd", "--system", "postdrop"], check=True)
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                        "/nonexistent", "--shell", "/usr/sbin/nologin", "postfix"], check=True)
    return root


def postfix_env() -> dict[str, str]:
    return dict(os.environ, LD_LIBRARY_PATH=str(postfix_root() / "usr/lib/postfix"))


def postfix_tool(name: str) -> str:
    """The path of a Postfix command (smtp-source, smtp-sink, postconf…) in the unpacked copy."""
    return str(postfix_root() / "usr/sbin" / name)


#: Every setting here that differs from Postfix's defaults (``postconf -d``) is listed, with
#: its reason, in bench/README.md ("Postfix's settings"); a run records the actual difference
#: (``Postfix.non_default_settings``) in results.json. Keep the three in step.
MAIN_CF = """\
# mailsrv bench: a private Postfix instance on 127.0.0.1:{port} only.
compatibility_level = 3.6
config_directory = {dir}
daemon_directory = {root}/usr/lib/postfix/sbin
command_directory = {root}/usr/sbin
meta_directory = {root}/etc/postfix
shlib_directory = {root}/usr/lib/postfix
sample_directory = {root}/etc/postfix
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ XAUTHORITY DISPLAY LANG=C
    POSTLOG_SERVICE POSTLOG_HOSTNAME LD_LIBRARY_PATH
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydomain = bench
myorigin = postfix.bench
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
message_size_limit = 209715200
mailbox_size_limit = 0
virtual_mailbox_limit = 0
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {dir}/mail
virtual_mailbox_maps = texthash:{dir}/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
default_process_limit = 200
relayhost = {relayhost}
smtp_dns_support_level = disabled
disable_dns_lookups = yes
smtpd_peername_lookup = no
"""

MASTER_CF = """\
# service type private unpriv chroot wakeup maxproc command
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(Server):
    """A private Postfix instance: virtual Maildir delivery, optionally relaying to a sink."""

    name = "postfix"

    def __init__(self, workdir: Path, relayhost: str = "", extra: dict[str, str] | None = None):
        super().__init__(workdir)
        self.dir = workdir / "postfix"
        self.relayhost = relayhost
        self.extra = extra or {}

    @property
    def maildir_root(self) -> Path:
        return self.dir / "mail" / DOMAIN

    def postconf(self, **settings: str) -> None:
        subprocess.run([postfix_tool("postconf"), "-c", str(self.dir), "-e",
                        *(f"{k}={v}" for k, v in settings.items())], check=True,
                       env=postfix_env())

    def command(self, *args: str) -> subprocess.CompletedProcess:
        """``postfix -c DIR ARGS`` with the unpacked copy; its output in ``stdout``.

        Postfix writes its messages to stderr only when stderr is a terminal; otherwise they
        go to syslog (absent here) or to ``maillog_file`` (which a failed start may never have
        opened), and ``postfix start`` fails with no word. So both its outputs are a
        pseudo-terminal here, read while it runs, and a failure reads in Postfix's own words.
        """
        leader, follower = os.openpty()
        try:
            process = subprocess.Popen([postfix_tool("postfix"), "-c", str(self.dir), *args],
                                       stdin=subprocess.DEVNULL, stdout=follower,
                                       stderr=follower, env=postfix_env())
        finally:
            os.close(follower)
        out = bytearray()
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([leader], [], [], 0.2)
                if ready:
                    try:
                        chunk = os.read(leader, 65536)
                    except OSError:  # EIO: every writer has closed the terminal
                        chunk = b""
                    if not chunk:
                        break
                    out += chunk
                elif process.poll() is not None:
                    break  # exited, and nothing left to read
        finally:
            os.close(leader)
        try:
            returncode = process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait(10)
        text = out.decode(errors="replace").replace("\r\n", "\n")
        return subprocess.CompletedProcess(process.args, returncode, text, "")

    def failure(self, what: str, result: subprocess.CompletedProcess | None = None) -> str:
        """Why Postfix did not start: its fatal/error lines first, then the ends of its output
        and of its maillog."""
        output = result.stdout if result is not None else ""
        log = self.dir / "maillog"
        logged = log.read_text(errors="replace") if log.exists() else ""
        serious = [line for line in (output + "\n" + logged).splitlines()
                   if re.search(r"\b(fatal|panic|error):", line)]
        text = f"postfix {what}"
        if result is not None:
            text += f" (postfix {' '.join(result.args[3:])}: exit {result.returncode})"
        if serious:
            text += ":\n  " + "\n  ".join(serious[-10:])
        rest = "\n".join(line for line in output.splitlines() if line not in serious).strip()
        if rest:
            text += "\n  output: ..." + rest[-800:]
        if logged.strip():
            text += f"\n  {log}: ..." + logged.strip()[-800:]
        if not (serious or rest or logged.strip()):
            text += ": Postfix said nothing (no output, no maillog)"
        return text

    def start(self) -> int:
        root = postfix_root()
        nobody = pwd.getpwnam("nobody")
        self.port = free_port()
        d = self.dir
        for sub in ("data", "mail", "queue"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(d / "data", "postfix")
        (d / "main.cf").write_text(MAIN_CF.format(
            port=self.port, dir=d, domain=DOMAIN, uid=nobody.pw_uid, gid=nobody.pw_gid,
            relayhost=self.relayhost, root=root))
        (d / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (d / "vmailbox").write_text("".join(f"{u}@{DOMAIN} {DOMAIN}/{u}/\n" for u in USERS))
        for user in USERS:
            for sub in ("tmp", "new", "cur"):
                (d / "mail" / DOMAIN / user / sub).mkdir(parents=True, exist_ok=True)
        for path in [d / "mail", d / "mail" / DOMAIN, *(d / "mail" / DOMAIN).rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        if self.extra:
            self.postconf(**self.extra)
        result = self.command("start")
        if result.returncode != 0:
            raise RuntimeError(self.failure("did not start", result))
        try:
            wait_until(lambda: greets(self.port), 60, "postfix to answer")
        except RuntimeError:
            raise RuntimeError(self.failure(f"started but did not answer on port {self.port}",
                                            result)) from None
        return self.port

    def non_default_settings(self) -> dict[str, dict[str, str]]:
        """Every main.cf setting of this instance whose value is not Postfix's default:
        ``{name: {"value": ..., "default": ...}}`` (``postconf -n`` against ``postconf -d``),
        recorded with the results so that they say exactly how the peer was set up."""
        def settings(*flags: str, names: list[str] | None = None) -> dict[str, str]:
            out = subprocess.run([postfix_tool("postconf"), "-c", str(self.dir), *flags,
                                  *(names or [])], capture_output=True, text=True,
                                 check=True, env=postfix_env()).stdout
            return dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                        for line in out.splitlines() if line.strip())

        explicit = settings("-n")
        defaults = settings("-d", names=sorted(explicit))
        return {name: {"value": value, "default": defaults.get(name, "")}
                for name, value in explicit.items() if defaults.get(name, "") != value}

    def master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        """master and every child of it (smtpd, cleanup, qmgr, virtual, …)."""
        master = self.master_pid()
        if master is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True,
                             text=True).stdout.split()
        return [master, *map(int, out)]

    def stop(self) -> None:
        if self.dir.exists():
            self.command("stop")
            master = self.master_pid()
            deadline = time.monotonic() + 20
            while master is not None and time.monotonic() < deadline:
                try:
                    os.kill(master, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)


ALL = {"mailsrv": Mailsrv, "postfix": Postfix, "twisted": TwistedMail, "aiosmtpd": Aiosmtpd}
