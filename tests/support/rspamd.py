"""
A real rspamd (Debian's) for the tests: its normal worker alone on a loopback port, with a
configuration written into the test's directory that includes the system's (``$CONFDIR``,
/etc/rspamd) and overrides what must not touch the machine: pid file, databases, log, the
``local.d`` overrides (``--var LOCAL_CONFDIR``), DNS (the tests' loopback server only), and a
tiny TLD list (compiling the public suffix list takes rspamd 20 s).

The scores are made deterministic by ``local.d``: thresholds far above what a test message
scores by chance (reject 100, add header 50, no greylist or rewrite subject), and three
symbols of our own on the Subject: ``mailsrv-test-junk`` scores 60 (add header),
``mailsrv-test-soft`` and ``mailsrv-test-reject`` force soft reject and reject with a message
of ours (force_actions).  GTUBE is rspamd's own (reject, "Gtube pattern").
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
from pathlib import Path

from support.harness import free_port, stop_process, wait_for

__all__ = ["RspamdServer", "rspamd_missing"]

CONFIG = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "{dir}/rspamd.pid";
    disable_hyperscan = {no_hyperscan};
    url_tld = "{dir}/tld.dat";
    dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 1s; retransmits = 1; }}
    .include "$CONFDIR/options.inc"
}}
logging {{
    type = "file";
    filename = "{dir}/rspamd.log";
    level = "info";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    .include "$CONFDIR/worker-normal.inc"
    count = {workers};
}}
"""

LOCAL = {
    "actions.conf": "reject = 100;\nadd_header = 50;\nrewrite_subject = null;\ngreylist = null;\n",
    "milter_headers.conf": (
        'use = ["x-spam-status"];\nskip_local = false;\nskip_authenticated = false;\n'
    ),
    "regexp.conf": """\
MAILSRV_TEST_JUNK { re = 'Subject=/mailsrv-test-junk/H'; score = 60.0; }
MAILSRV_TEST_SOFT { re = 'Subject=/mailsrv-test-soft/H'; score = 0.0; }
MAILSRV_TEST_REJECT { re = 'Subject=/mailsrv-test-reject/H'; score = 0.0; }
""",
    # Its servers (fuzzy1.rspamd.com) are looked up with the system's resolver at start-up.
    "fuzzy_check.conf": "enabled = false;\n",
    "force_actions.conf": """\
rules {
  MAILSRV_SOFT { action = "soft reject"; expression = "MAILSRV_TEST_SOFT";
                 message = "mailsrv test: come back later"; }
  MAILSRV_REJECT { action = "reject"; expression = "MAILSRV_TEST_REJECT";
                   message = "mailsrv test: not wanted here"; }
}
""",
}


def rspamd_missing() -> str | None:
    """Why no rspamd can run here, or None."""
    if shutil.which("rspamd") is None:
        return "rspamd is not installed (Debian: apt install rspamd; .ci/run installs it)"
    if not Path("/etc/rspamd/common.conf").exists():
        return "rspamd's configuration /etc/rspamd is missing"
    return None


class RspamdServer:
    """``rspamd -f`` on 127.0.0.1:<port>, everything it writes under ``workdir``."""

    def __init__(self, workdir: Path, dns_port: int, workers: int = 1,
                 hyperscan: bool = False, timeout: float = 60.0) -> None:
        """``workers`` normal workers; ``hyperscan``: Debian's default regular expression
        engine (the tests turn it off: compiling its database takes rspamd tens of seconds;
        the benchmark keeps it, as an installed rspamd runs)."""
        self.workdir = workdir
        self.port = free_port(["127.0.0.1"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "rspamd.log"
        local = workdir / "local"
        (local / "local.d").mkdir(parents=True)
        (workdir / "db").mkdir()
        for name, text in LOCAL.items():
            (local / "local.d" / name).write_text(text)
        (workdir / "tld.dat").write_text("test\norg\nnet\ncom\n")
        self.config = workdir / "rspamd.conf"
        self.config.write_text(CONFIG.format(
            dir=workdir, port=self.port, dns_port=dns_port, workers=workers,
            no_hyperscan="false" if hyperscan else "true"))
        command = ["rspamd", "-f", "-c", str(self.config),
                   "--var", f"LOCAL_CONFDIR={local}", "--var", f"DBDIR={workdir / 'db'}",
                   "--var", f"RUNDIR={workdir}", "--var", f"LOGDIR={workdir}"]
        if os.geteuid() == 0:  # rspamd will not run its workers as root unless told
            command += ["-u", "root", "-g", "root", "--insecure"]
        self.process = subprocess.Popen(
            command, stdout=open(workdir / "rspamd.out", "wb"), stderr=subprocess.STDOUT)
        try:
            wait_for(self._pong, timeout, "rspamd to answer /ping", interval=0.2)
        except AssertionError:
            self.stop()
            raise AssertionError("rspamd did not start:\n" + self.log_text()[-3000:]) from None

    def _pong(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"rspamd exited with {self.process.returncode}:\n"
                                 + (self.workdir / "rspamd.out").read_text(errors="replace")
                                 + self.log_text()[-3000:])
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:  # http.client, not urllib: no proxy from the environment
            connection.request("GET", "/ping")
            return b"pong" in connection.getresponse().read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process)
