"""
Postfix, the peer every ratio is against, and its tools smtp-source and smtp-sink: Debian's
package unpacked under the bench's own directory (never installed system-wide), and a private
instance of it (``Postfix``) with its own ``config_directory``, queue and port.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

from bench.peers import DOMAIN, USERS, Server, free_port, wait_until

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
