"""
Debian's Exim as a BDAT client: Exim sends with CHUNKING whenever the server offers it
(its smtp transport's ``hosts_try_chunking`` is ``*`` by default). It runs privately, once per
message, with a configuration of its own (``exim4 -C``: spool and log in a temporary directory of its user, a
manualroute router sending everything to the test's mailsrv on its loopback port), delivering
in the foreground (``-odf``) with ``-v`` so that its side of the SMTP dialogue is printed:
there the BDAT commands show that it did use CHUNKING. Debian's exim4 service is never started
(installed with a policy-rc.d that exits 101, see .ci/run).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.certs import self_signed
from support.harness import wait_for

EXIM = shutil.which("exim4")

def _exim_user() -> bool:
    try:
        pwd.getpwnam("Debian-exim")
    except KeyError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    EXIM is None or os.geteuid() != 0 or not _exim_user(),
    reason="needs Debian's exim4-daemon-light and root (apt install exim4-daemon-light)")

CONFIG = """\
primary_hostname = client.test
qualify_domain = client.test
spool_directory = {work}/spool
log_file_path = {work}/%slog
exim_user = Debian-exim
exim_group = Debian-exim
trusted_users = root
host_lookup =
rfc1413_hosts =
check_spool_space = 0
begin routers
to_mailsrv:
  driver = manualroute
  domains = *
  transport = to_mailsrv
  route_list = * 127.0.0.1
  self = send
begin transports
to_mailsrv:
  driver = smtp
  port = {port}
  allow_localhost
  hosts_try_chunking = *
begin retry
* * F,1m,1m
"""


@pytest.fixture
def exim_dir():
    """Exim's spool, log and configuration: its own user (Debian-exim) writes there, so not
    under tmp_path (pytest's base directory is root's alone)."""
    with tempfile.TemporaryDirectory(prefix="mailsrv-exim-") as work:
        shutil.chown(work, "Debian-exim", "Debian-exim")
        yield Path(work)


def exim_send(work: Path, port: int, recipient: str, message: bytes) -> str:
    config = work / "exim.conf"
    config.write_text(CONFIG.format(work=work, port=port))
    result = subprocess.run(
        [EXIM, "-C", str(config), "-odf", "-oi", "-v", "-f", "sender@client.test", recipient],
        input=message, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
    )
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, output
    return output


def test_exim_sends_with_bdat_and_the_message_is_delivered(mail_server, exim_dir):
    before = len(mail_server.messages("bob@example.org"))
    body = "".join(f"line {n:05d} " + "x" * 60 + "\n" for n in range(3000))  # ~220 kB
    message = (b"From: sender@client.test\nTo: bob@example.org\nSubject: via exim\n\n"
               b".a line with a dot\n" + body.encode())
    output = exim_send(exim_dir, mail_server.port, "bob@example.org", message)
    assert "250-CHUNKING" in output or "250 CHUNKING" in output
    chunks = re.findall(r"SMTP[>|+]> BDAT (\d+)( LAST)?", output)  # (+: pipelined)
    assert chunks and chunks[-1][1] == " LAST", output
    assert not re.search(r"SMTP[>|+]> DATA", output)
    wait_for(lambda: len(mail_server.messages("bob@example.org")) > before, 10,
             "the message in bob's Maildir")
    box = mail_server.maildir("bob@example.org")
    [stored] = [box.get_bytes(k) for k in box.keys() if b"Subject: via exim" in box.get_bytes(k)]
    assert stored.endswith(b"\n\n.a line with a dot\n" + body.encode())
    print(f"\nExim sent {len(chunks)} BDAT chunk(s): {[int(n) for n, _ in chunks]}")


def test_exim_sees_the_size_refusal_of_a_chunk(make_server, exim_dir):
    server = make_server(overrides={"smtp": {"max_message_size": 10000}}).start()
    message = b"Subject: too big\n\n" + b"y" * 70 + b"\n" + (b"z" * 70 + b"\n") * 200
    output = exim_send(exim_dir, server.port, "bob@example.org", message)
    # Exim announces SIZE= (it knows the limit from EHLO) and is refused at MAIL, or sends the
    # chunks and gets 552 after them: either way it bounces, and nothing is delivered.
    assert re.search(r"552[ -]5\.3\.4", output), output
    assert server.messages("bob@example.org") == []


def test_exim_over_starttls_gets_its_replies_and_delivers_once(make_server, exim_dir, tmp_path):
    cert, key = self_signed(["mx.example.org"], tmp_path)
    server = make_server(overrides={"tls": {"cert": str(cert), "key": str(key)}}).start()
    output = exim_send(exim_dir, server.port, "bob@example.org",
                       b"Subject: via exim over tls\n\nhello\n")
    assert "SMTP>> STARTTLS" in output and re.search(r"SMTP[>|+]> BDAT \d+ LAST", output), output
    assert "queued as" in output and " defer " not in output, output
    wait_for(lambda: server.messages("bob@example.org"), 10, "the message in bob's Maildir")
    assert len(server.messages("bob@example.org")) == 1
    print("\n" + "\n".join(line for line in output.splitlines() if "SMTP" in line))
