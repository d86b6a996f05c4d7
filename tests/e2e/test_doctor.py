"""
``mailsrv doctor``, run as the administrator (and the daily timer) runs it, against a real
server and a loopback DNS zone with a fault of each kind: a PTR naming another host, a DKIM
key not published, a certificate five days from its end (with a key other users can read), our
address on a configured blocklist, a message deferred in the queue, and a spool on a small
file system this test mounts and fills.  Each is named with its fix; the exit status is 1; the
same findings come as JSON; debian/doctor-report mails them to the postmaster.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.certs import make_ca
from support.harness import REPO, DNSServer, MailServer, _env, free_port, wait_for
from support.mail import send_mail

ZONE = {
    "example.org": [["MX", 10, "mx.example.org"], ["TXT", "v=spf1 mx -all"]],
    "_dmarc.example.org": [["TXT", "v=DMARC1; p=none; rua=mailto:postmaster@example.org"]],
    "example.net": [["MX", 10, "mx.example.org"], ["TXT", "v=spf1 mx -all"]],
    "_dmarc.example.net": [["TXT", "v=DMARC1; p=reject"]],
    "mx.example.org": [["A", "127.0.0.1"]],
    # The fault: our address's reverse name is another host's.
    "1.0.0.127.in-addr.arpa": [["PTR", "wrong.example.net"]],
    "wrong.example.net": [["A", "127.0.0.1"]],
    # One blocklist lists us, the other does not.
    "1.0.0.127.bl.test": [["A", "127.0.0.2"]],
    # Where the deferred message goes: nothing listens there.
    "remote.test": [["MX", 10, "mx.remote.test"]],
    "mx.remote.test": [["A", "127.0.0.2"]],
}


def mailsrv(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailsrv.tools.cli", *args, "--config",
                           str(config)], capture_output=True, text=True, timeout=120, env=_env())


def _mount_small(target: Path, work: Path) -> str | None:
    """A 4 MiB file system at ``target``: tmpfs, else a loop-mounted ext2 image; None if
    neither can be mounted here, else how it was made."""
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs",
                            str(target)], capture_output=True, text=True)
    if tried.returncode == 0:
        return "tmpfs"
    image = work / "spool.img"
    with open(image, "wb") as f:
        f.truncate(4 * 1048576)
    made = subprocess.run(["mkfs.ext2", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode == 0 and subprocess.run(
            ["mount", "-o", "loop", str(image), str(target)], capture_output=True).returncode == 0:
        return "loop"
    pytest.skip(f"cannot mount a small file system for the spool: {tried.stderr.strip()}")
    return None


@pytest.fixture
def small_spool(tmp_path: Path):
    spool = tmp_path / "spool"
    spool.mkdir()
    _mount_small(spool, tmp_path)
    yield spool
    subprocess.run(["umount", "-l", str(spool)], capture_output=True)


def fill(directory: Path) -> None:
    """Write until the file system says it is full."""
    chunk = b"\0" * 65536
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno in (errno.ENOSPC, errno.EDQUOT), e


def finding(report: dict, check: str, subject: str) -> dict:
    found = [f for f in report["findings"] if f["check"] == check and subject in f["subject"]]
    assert len(found) >= 1, f"no {check} finding for {subject}: {report['findings']}"
    return found[0]


@pytest.fixture
def faulty(tmp_path: Path, small_spool: Path):
    """A running server with every fault but the full disk (the test fills it when it is
    ready), and its DNS."""
    dns = DNSServer(_workdir(tmp_path, "dns"), {"records": ZONE})
    ca = make_ca(tmp_path)
    cert, key = ca.issue(["mx.example.org"], tmp_path, days=5)
    key.chmod(0o644)  # the fault: any user can read the private key
    port = free_port(["127.0.0.1"])
    server = MailServer(_workdir(tmp_path, "server"), dns.port, overrides={
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "max_message_size": 1048576},
        "queue": {"path": str(small_spool / "queue")},
        "tls": {"cert": str(cert), "key": str(key)},
        "dnsbl": {"zones": {"bl.test": 2, "clean.test": 1}, "threshold": 3},
    })
    made = mailsrv(server.config_path, "dkim", "keygen", "example.org", "--selector", "s1")
    assert made.returncode == 0, made.stderr  # and its key is not published: the fault
    server.start()
    try:
        yield server
    finally:
        server.stop()
        dns.stop()


def _workdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def test_each_fault_is_named_with_its_fix(faulty: MailServer, small_spool: Path) -> None:
    send_mail(faulty.port, "alice@example.org", ["someone@remote.test"], "Subject: out\n\nx\n")
    wait_for(lambda: any("last_error" in p.read_text() and '"last_error": null' not in p.read_text()
                         for p in (small_spool / "queue" / "messages").glob("*.json")),
             30, "the remote delivery to be deferred")
    fill(small_spool)

    text = mailsrv(faulty.config_path, "doctor")
    assert text.returncode == 1, text.stdout + text.stderr
    as_json = mailsrv(faulty.config_path, "doctor", "--json")
    assert as_json.returncode == 1, as_json.stdout + as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["status"] == "problem"

    ptr = finding(report, "dns", "PTR mx.example.org")
    assert ptr["level"] == "problem"
    assert "127.0.0.1=wrong.example.net" in ptr["detail"]
    assert "set its PTR record to mx.example.org" in ptr["fix"] and "127.0.0.1" in ptr["fix"]

    dkim = finding(report, "dns", "DKIM s1._domainkey.example.org")
    assert dkim["level"] == "problem" and "no key published" in dkim["detail"]
    public = (faulty.workdir / "dkim" / "example.org" / "s1.key").exists()
    assert public and dkim["fix"].startswith("publish: s1._domainkey.example.org. IN TXT")
    assert "v=DKIM1; k=rsa; p=MII" in dkim["fix"]

    cert = [f for f in report["findings"] if f["check"] == "certificate"]
    expiring = [f for f in cert if "expires in" in f["detail"]]
    assert len(expiring) == 1 and expiring[0]["level"] == "problem"
    assert "expires in 4." in expiring[0]["detail"] or "expires in 5.0" in expiring[0]["detail"]
    assert "renew it (certbot renew)" in expiring[0]["fix"]
    assert any(f["level"] == "ok" and f["detail"] == "names mx.example.org" for f in cert)
    # The server serves the file's certificate: no "reload" warning.
    assert not any("serves another" in f["detail"] for f in cert)

    disk = finding(report, "disk", "queue.path")
    assert disk["level"] == "problem" and "of 4.0 MiB free" in disk["detail"]
    assert "not room for one message of smtp.max_message_size" in disk["detail"]
    assert disk["fix"].startswith("free space there")
    assert "mailboxes.root" not in disk["subject"]  # another file system, with room
    assert finding(report, "disk", "mailboxes.root")["level"] == "ok"

    listed = finding(report, "dnsbl", "127.0.0.1")
    assert listed["level"] == "problem" and listed["detail"].startswith("listed by bl.test (")
    assert "clean.test" not in listed["detail"] and "delist 127.0.0.1" in listed["fix"]

    key = finding(report, "permissions", "TLS key")
    assert key["level"] == "problem" and key["fix"] == f"chmod o-rwx {faulty.config['tls']['key']}"
    assert finding(report, "permissions", "DKIM key")["level"] == "ok"

    listener = finding(report, "listener", "smtp tcp:")
    assert listener["level"] == "ok" and "220 mx.example.org" in listener["detail"]
    queue = finding(report, "queue", str(small_spool / "queue"))
    assert queue["level"] == "ok" and "1 message(s), 1 recipient(s) waiting" in queue["detail"]
    assert "deferred: 1x " in queue["detail"]

    problems = {(f["check"], f["subject"]) for f in report["findings"] if f["level"] == "problem"}
    assert problems == {
        ("dns", "PTR mx.example.org"), ("dns", "DKIM s1._domainkey.example.org"),
        ("certificate", faulty.config["tls"]["cert"]), ("disk", disk["subject"]),
        ("dnsbl", "127.0.0.1"), ("permissions", key["subject"]),
    }
    for ok in ("MX example.org", "SPF example.org", "DMARC _dmarc.example.org",
               "MX example.net", "SPF example.net", "DMARC _dmarc.example.net", "A mx.example.org"):
        assert finding(report, "dns", ok)["level"] == "ok", ok
    assert finding(report, "config", str(faulty.config_path))["level"] == "ok"

    # The text: the same findings, problems first, each followed by its fix.
    lines = text.stdout.splitlines()
    assert lines[-1] == (f"6 problem(s), {report['counts']['warning']} warning(s), "
                         f"{report['counts']['ok']} ok")
    heads = [i for i, line in enumerate(lines) if not line.startswith(" ")][:-1]
    assert [lines[i].split()[0] for i in heads[:6]] == ["problem"] * 6
    assert all(lines[i + 1].lstrip().startswith("fix: ") for i in heads[:6])
    assert "problem  dns          PTR mx.example.org: 127.0.0.1=wrong.example.net" in text.stdout


def test_a_renewed_certificate_not_yet_loaded(faulty: MailServer, tmp_path: Path) -> None:
    """The file renewed, the server not reloaded: it still serves the old one (seen over
    STARTTLS); after SIGHUP, the new one."""
    (tmp_path / "renewed").mkdir()
    ca = make_ca(tmp_path / "renewed")
    cert, key = ca.issue(["mx.example.org"], tmp_path / "renewed", days=90)
    key.chmod(0o640)
    os.replace(cert, faulty.config["tls"]["cert"])
    os.replace(key, faulty.config["tls"]["key"])

    def certificate_findings() -> list[dict]:
        result = mailsrv(faulty.config_path, "doctor", "--json")
        return [f for f in json.loads(result.stdout)["findings"] if f["check"] == "certificate"]

    found = certificate_findings()
    assert [f["level"] for f in found] == ["ok", "ok", "warning"], found
    assert found[0]["detail"].startswith("valid until ")
    assert "still serves another certificate" in found[2]["detail"]
    assert found[2]["fix"] == "`systemctl reload mailsrv` to load the new one"
    os.kill(faulty.process.pid, signal.SIGHUP)
    wait_for(lambda: len(certificate_findings()) == 2, 20, "the server to serve the new certificate")
    assert permission_levels(faulty) == ["ok", "ok"]


def permission_levels(server: MailServer) -> list[str]:
    result = mailsrv(server.config_path, "doctor", "--json")
    return [f["level"] for f in json.loads(result.stdout)["findings"] if f["check"] == "permissions"]


def test_no_server_and_a_broken_configuration(tmp_path: Path) -> None:
    port = free_port(["127.0.0.1"])
    server = MailServer(tmp_path, dns_port=9, overrides={  # nothing answers DNS there
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}})
    result = mailsrv(server.config_path, "doctor", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    listener = finding(report, "listener", "smtp")
    assert listener["level"] == "problem" and "nothing answers on [127.0.0.1]" in listener["detail"]
    assert "systemctl start mailsrv" in listener["fix"]
    mx = finding(report, "dns", "MX example.org")
    assert mx["level"] == "warning" and "did not answer" in mx["detail"]

    server.set_config("smtp", "max_recipients", "ten")
    result = mailsrv(server.config_path, "doctor")
    assert result.returncode == 1
    assert result.stdout.startswith(f"problem  config       {server.config_path}: "
                                    f"{server.config_path}: smtp.max_recipients: expected")
    assert "fix: correct the key the message names" in result.stdout
    assert result.stdout.endswith("1 problem(s), 0 warning(s), 0 ok\n")


@pytest.mark.skipif(shutil.which("sh") is None, reason="no /bin/sh")
def test_the_daily_report_mails_the_postmaster_on_a_problem(tmp_path: Path, dns_server) -> None:
    """debian/doctor-report, as mailsrv-doctor.service runs it: the findings on stdout, and
    to the postmaster (alice@example.org, by the harness's aliases) when there is a problem."""
    port = free_port(["127.0.0.1"])
    server = MailServer(tmp_path, dns_server.port, overrides={
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, module in (("mailsrv", "mailsrv.tools.cli"), ("sendmail", "mailsrv.tools.sendmail")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable} -m {module} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = dict(_env(), MAILSRV_CONFIG=str(server.config_path), MAILSRV=str(bin_dir / "mailsrv"),
               SENDMAIL=str(bin_dir / "sendmail"))
    server.start()
    try:
        # The base zone has none of example.org's records: problems.
        result = subprocess.run([str(REPO / "debian" / "doctor-report")], env=env,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "problem  dns          MX example.org: no MX record" in result.stdout
        assert result.stderr == ""
        mail = wait_for(lambda: server.messages("alice@example.org"), 20, "the report")
        message = mail[0]
        assert message["Subject"].startswith("mailsrv doctor on ")
        assert message["Subject"].endswith(": problems found")
        assert message["Auto-Submitted"] == "auto-generated"
        body = message.get_payload()
        assert "problem  dns          MX example.org: no MX record" in body
        assert "fix: publish: example.org. IN MX 10 mx.example.org." in body
    finally:
        server.stop()
    assert os.access(REPO / "debian" / "doctor-report", os.X_OK)


def test_the_servers_daily_report_carries_the_doctors_findings(tmp_path: Path, dns_server) -> None:
    """[report] daily runs the real ``mailsrv doctor`` (as a command of its own) and puts
    what it finds wrong, with the fixes, in the report: here, the server is not running."""
    sys.path.insert(0, str(REPO))
    from mailsrv import config as config_module  # the checkout's, as the server's
    from mailsrv.outbound.daily import doctor_findings

    port = free_port(["127.0.0.1"])
    server = MailServer(tmp_path, dns_server.port, overrides={
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}})
    found = doctor_findings(config_module.load_config(server.config_path))
    assert found is not None
    [listener] = [line for line in found if line.startswith("problem: listener smtp")]
    assert "nothing answers on [127.0.0.1]" in listener and "; fix: " in listener
    assert "systemctl start mailsrv" in listener
    assert all(not line.startswith("ok:") for line in found)
