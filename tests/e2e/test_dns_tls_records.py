"""
``mailsrv dns`` with ``[mta_sts]`` and ``[tls_reports] rua``: our own MTA-STS records and
policy file and our TLS-RPT record printed, then checked against a loopback DNS server: first
missing, then as printed, then after a policy change that the published id no longer matches.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.harness import DNSServer, MailServer

BASE = {
    "example.org": [["MX", 10, "mx.example.org"], ["TXT", "v=spf1 mx -all"]],
    "mx.example.org": [["A", "127.0.0.1"]],
    "1.0.0.127.in-addr.arpa": [["PTR", "mx.example.org"]],
    "_dmarc.example.org": [["TXT", "v=DMARC1; p=none; rua=mailto:postmaster@example.org"]],
}


def mailsrv(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailsrv.tools.cli", *args, "--config",
                           str(config)], capture_output=True, text=True, timeout=60)


def check(tmp_path: Path, server: MailServer, records: dict) -> subprocess.CompletedProcess:
    work = tmp_path / f"dns{len(list(tmp_path.glob('dns*')))}"
    work.mkdir()
    dns = DNSServer(work, {"records": records})
    try:
        server.set_config("relay", "dns_servers", [f"127.0.0.1:{dns.port}"])
        return mailsrv(server.config_path, "dns", "--check", "example.org")
    finally:
        dns.stop()


def verdicts(output: str) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in output.splitlines()
            if line.split() and line.split()[0] in ("ok", "missing", "wrong", "unknown")}


def test_own_mta_sts_and_tlsrpt_records(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns_port=53, overrides={
        "mta_sts": {"mode": "enforce", "max_age": 86400},
        "tls_reports": {"rua": ["mailto:tlsrpt@example.org"]}})
    printed = mailsrv(server.config_path, "dns", "example.org")
    assert printed.returncode == 0, printed.stderr
    text = printed.stdout
    sts_line = next(line for line in text.splitlines() if line.startswith("_mta-sts."))
    sts_value = sts_line.split(" IN TXT ")[1].strip('"')
    assert sts_value.startswith("v=STSv1; id=")
    assert '_smtp._tls.example.org. IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@example.org"' in text
    assert "https://mta-sts.example.org/.well-known/mta-sts.txt" in text
    assert ";   mode: enforce\n;   mx: mx.example.org\n" in text
    policy = mailsrv(server.config_path, "dns", "example.org", "--mta-sts-policy")
    assert policy.stdout == "version: STSv1\nmode: enforce\nmx: mx.example.org\nmax_age: 86400\n"

    missing = check(tmp_path, server, BASE)
    assert missing.returncode == 1
    found = verdicts(missing.stdout)
    assert (found["MTA-STS"], found["STS-WEB"], found["TLSRPT"]) == ("missing",) * 3

    published = dict(BASE, **{
        "_mta-sts.example.org": [["TXT", sts_value]],
        "mta-sts.example.org": [["A", "127.0.0.1"]],
        "_smtp._tls.example.org": [["TXT", "v=TLSRPTv1; rua=mailto:tlsrpt@example.org"]],
    })
    fine = check(tmp_path, server, published)
    assert fine.returncode == 0, fine.stdout
    assert "8 of 8 records ok" in fine.stdout  # MX A PTR SPF DMARC + three of ours

    server.set_config("mta_sts", "mode", "testing")  # a new policy: a new id to publish
    stale = check(tmp_path, server, published)
    assert stale.returncode == 1
    assert verdicts(stale.stdout)["MTA-STS"] == "wrong"
    assert "serve the new policy file first, then publish the new id" in stale.stdout


def test_nothing_printed_without_configuration(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns_port=53)
    printed = mailsrv(server.config_path, "dns", "example.org")
    assert "_mta-sts" not in printed.stdout and "_smtp._tls" not in printed.stdout
    assert "MTA-STS" not in printed.stdout
    refused = mailsrv(server.config_path, "dns", "example.org", "--mta-sts-policy")
    assert refused.returncode == 1 and '[mta_sts] mode is "none"' in refused.stderr
