"""
A private Dovecot for the tests: ``dovecot -F -c FILE`` with the configuration
``mailsrv dovecot-config`` printed, and only what a test run must change appended: its
directories (base_dir, state_dir, log_path) under the test's directory, listeners on loopback
ports the test chose, and Debian's internal and login users named.  Nothing system-wide is
started or touched.

Dovecot never reads mail as root, and its auth process (the ``dovecot`` user) must reach the
users file, so these tests need root (to run Dovecot at all), run mailsrv as Debian's
``mail`` user (``twistd --uid``), as the package runs it as ``mailsrv``, and keep their
files in a directory others may traverse (``reachable_dir``): pytest's own base directory
is ``0700`` root's.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.harness import REPO, MailServer, free_port, stop_process, wait_for

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
LIBEXEC = Path("/usr/lib/dovecot")
#: The user mailsrv runs as in these tests (Debian's package makes a ``mailsrv`` user).
MAIL_USER = "mail"
#: Lines of Dovecot's log that a test accepts: none below Info.
PROBLEM = re.compile(r"\b(Warning|Error|Fatal|Panic):")


def dovecot_lacks(*programs: str) -> str | None:
    """Why these tests cannot run here (None: they can): they need root, Dovecot, its
    ``programs`` (imap, lmtp …) and Debian's users for it."""
    if os.geteuid() != 0:
        return "Dovecot reads mail as the server's user and needs root to start"
    if not os.path.exists(DOVECOT):
        return "dovecot is not installed (apt install dovecot-imapd)"
    for program in ("imap", *programs):
        if not (LIBEXEC / program).exists():
            return f"Dovecot's {program} is not installed (apt install dovecot-{program}d)"
    for user in ("dovecot", "dovenull", MAIL_USER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no {user!r} user on this machine"
    return None


@contextmanager
def reachable_dir() -> Iterator[Path]:
    """A directory under /tmp that Dovecot's and mailsrv's users can traverse (0755)."""
    path = Path(tempfile.mkdtemp(prefix="mailsrv-dovecot-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owned_dir(path: Path, user: str = MAIL_USER) -> Path:
    """``path`` made, 0700, owned by ``user`` (as mailsrv makes its queue and Maildirs)."""
    path.mkdir(mode=0o700, exist_ok=True)
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def mailsrv(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """The admin command, as an administrator runs it (root)."""
    return subprocess.run(
        [sys.executable, "-m", "mailsrv.tools.cli", *args, "--config", str(config)],
        input=stdin.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60,
    )


def _runnable_by(user: str, path: str) -> bool:
    from mailsrv.privileges import effective_user

    entry = pwd.getpwnam(user)
    with effective_user(entry.pw_uid, entry.pw_gid):
        return os.access(path, os.X_OK, effective_ids=True)


def fresh_install(server: MailServer, passwords: dict[str, str]) -> None:
    """``server`` (not started) as a fresh install running as MAIL_USER: no users file until
    ``mailsrv user add`` makes one for each of ``passwords``; the queue and the Maildirs the
    server's user's, as the server makes them at its first start."""
    (server.workdir / "users").unlink()
    owned_dir(server.queue)
    owned_dir(server.root)
    server.twistd_options = ["--uid", MAIL_USER, "--gid", MAIL_USER]
    if not _runnable_by(MAIL_USER, sys.executable):
        # Receiving processes run this interpreter as MAIL_USER; one under root's home (a
        # pyenv build) cannot be, and the server would refuse to start (server.processes).
        server.set_config("server", "processes", 1)
    for address, password in passwords.items():
        result = mailsrv(server.config_path, "user", "add", address, "--password-stdin",
                         stdin=password + "\n")
        assert result.returncode == 0, result.stderr


def login(client: imaplib.IMAP4, user: str, password: str) -> str:
    """AUTHENTICATE PLAIN in UTF-8 (imaplib's LOGIN takes ASCII only), as mail clients do."""
    response = f"\0{user}\0{password}".encode()
    return client.authenticate("PLAIN", lambda challenge: response)[0]


class Dovecot:
    """``dovecot -F`` with ``config_text`` plus the test's directories and ports."""

    def __init__(self, workdir: Path, config_text: str, extra: str = "") -> None:
        self.dir = workdir
        self.dir.mkdir(mode=0o755, exist_ok=True)
        (self.dir / "state").mkdir(exist_ok=True)
        self.log_path = self.dir / "dovecot.log"
        self.imap_port = free_port(["127.0.0.1"])
        self.imaps_port = free_port(["127.0.0.1"]) if re.search(r"(?m)^ssl = yes$", config_text) \
            else 0
        imaps = f"  inet_listener imaps {{\n    port = {self.imaps_port}\n  }}\n"
        self.config_path = self.dir / "dovecot.conf"
        self.config_path.write_text(
            config_text
            + "\n# The test's own: directories, users, loopback ports.\n"
            f"base_dir = {self.dir / 'run'}\n"
            f"state_dir = {self.dir / 'state'}\n"
            f"log_path = {self.log_path}\n"
            "listen = 127.0.0.1\n"
            "default_internal_user = dovecot\n"
            "default_login_user = dovenull\n"
            "service imap-login {\n"
            f"  inet_listener imap {{\n    port = {self.imap_port}\n  }}\n"
            + (imaps if self.imaps_port else "")
            + "}\n" + extra
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> "Dovecot":
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config_path)],
            stdout=open(self.dir / "dovecot.out", "ab"), stderr=subprocess.STDOUT,
        )

        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"dovecot exited with {self.process.returncode}:\n"
                                     + (self.dir / "dovecot.out").read_text() + self.log_text())
            try:
                with socket.create_connection(("127.0.0.1", self.imap_port), timeout=2) as s:
                    return s.recv(100).startswith(b"* OK")
            except OSError:
                return False

        wait_for(listening, 30, "dovecot to listen", interval=0.1)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None
        time.sleep(0)  # its children end with the master

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def problems(self) -> list[str]:
        """Every warning, error or worse in Dovecot's log."""
        return [line for line in self.log_text().splitlines() if PROBLEM.search(line)]
