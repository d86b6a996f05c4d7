"""
``mailsrv dns DOMAIN`` and ``mailsrv dns --check DOMAIN``, run as the administrator runs them,
against a DNS server on loopback (relay.dns_servers): a key made by ``mailsrv dkim keygen``,
then a zone with one record missing (DMARC) and one wrong (the DKIM key), then the zone as
the command said to publish it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.harness import DNSServer, MailServer

PUBLISHED = {
    "example.org": [["MX", 10, "mx.example.org"], ["TXT", "v=spf1 mx -all"]],
    "mx.example.org": [["A", "127.0.0.1"]],
    "1.0.0.127.in-addr.arpa": [["PTR", "mx.example.org"]],
}


def mailsrv(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailsrv.tools.cli", *args, "--config",
                           str(config)], capture_output=True, text=True, timeout=60)


def zone_strings(text: str, name: str) -> list[str]:
    """The strings of the TXT record for ``name`` in the command's zone-file output."""
    block = text.split(f"{name}. IN TXT ", 1)[1]
    if block.startswith("("):
        block = block[1:].split(" )", 1)[0]
    else:
        block = block.split("\n", 1)[0]
    return [part for part in block.split('"')[1::2]]


def serve(tmp_path: Path, records: dict) -> DNSServer:
    work = tmp_path / f"dns{len(list(tmp_path.glob('dns*')))}"
    work.mkdir()
    return DNSServer(work, {"records": records})


def test_print_then_check_missing_and_wrong_then_fixed(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns_port=53)  # configured, never started
    keys = tmp_path / "dkim"
    server.set_config("dkim", "keys", str(keys))
    made = mailsrv(server.config_path, "dkim", "keygen", "example.org", "--selector", "s1")
    assert made.returncode == 0, made.stderr

    printed = mailsrv(server.config_path, "dns", "example.org")
    assert printed.returncode == 0, printed.stderr
    text = printed.stdout
    assert "example.org. IN MX 10 mx.example.org." in text
    assert 'example.org. IN TXT "v=spf1 mx -all"' in text
    dkim_text = "".join(zone_strings(text, "s1._domainkey.example.org"))
    assert dkim_text.startswith("v=DKIM1; k=rsa; p=MII")
    dmarc = zone_strings(text, "_dmarc.example.org")
    assert dmarc == ["v=DMARC1; p=none; rua=mailto:postmaster@example.org"]

    # DMARC missing, and a DKIM key that is not ours (an old one, say).
    wrong = dict(PUBLISHED, **{"s1._domainkey.example.org": [
        ["TXT", "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwrong"]]})
    dns = serve(tmp_path, wrong)
    try:
        server.set_config("relay", "dns_servers", [f"127.0.0.1:{dns.port}"])
        checked = mailsrv(server.config_path, "dns", "--check", "example.org")
    finally:
        dns.stop()
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = {line.split()[1]: line for line in checked.stdout.splitlines()
             if line.split() and line.split()[0] in ("ok", "missing", "wrong", "unknown")}
    assert lines["MX"].startswith("ok") and lines["SPF"].startswith("ok")
    assert lines["A"].startswith("ok") and lines["PTR"].startswith("ok")
    assert lines["DKIM"].startswith("wrong")
    assert lines["DMARC"].startswith("missing")
    assert "publish: _dmarc.example.org. IN TXT" in checked.stdout
    assert "4 of 6 records ok" in checked.stdout

    # Published as the command said: all ok, exit status 0.
    fixed = dict(PUBLISHED, **{
        "s1._domainkey.example.org": [["TXT", *zone_strings(text, "s1._domainkey.example.org")]],
        "_dmarc.example.org": [["TXT", *dmarc]],
    })
    dns = serve(tmp_path, fixed)
    try:
        server.set_config("relay", "dns_servers", [f"127.0.0.1:{dns.port}"])
        checked = mailsrv(server.config_path, "dns", "--check", "example.org")
    finally:
        dns.stop()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "6 of 6 records ok" in checked.stdout


def test_a_dns_server_that_does_not_answer_is_unknown_not_ok(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns_port=9)  # the discard port: nothing answers
    (tmp_path / "no-keys").mkdir()
    server.set_config("dkim", "keys", str(tmp_path / "no-keys"))
    checked = mailsrv(server.config_path, "dns", "--check", "example.org")
    assert checked.returncode == 1
    assert "unknown  MX" in checked.stdout and "0 of 5 records ok" in checked.stdout


def test_a_domain_that_is_not_local_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns_port=53)
    result = mailsrv(server.config_path, "dns", "other.test")
    assert result.returncode != 0 and "not one of [domains] local" in result.stderr
