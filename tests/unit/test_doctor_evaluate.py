"""``mailsrv doctor``'s judgement (mailsrv.tools.doctor.evaluate, evaluate_mail, findings):
facts in, level and fix out, each threshold tried on both sides; and the probes that read
files (certificate, file systems, secret files, the queue)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest

from mailsrv.checks.dnsbl import Listing
from mailsrv.tools import dnsrecords
from mailsrv.tools.dnsrecords import Record, Verdict
from mailsrv.tools.doctor import probe
from mailsrv.tools.doctor.evaluate import (
    CertFacts,
    FileFacts,
    ListenerFacts,
    certificate_findings,
    config_findings,
    listener_finding,
    name_matches,
    permission_finding,
)
from mailsrv.tools.doctor.evaluate_mail import (
    DiskFacts,
    QueueFacts,
    blocklist_findings,
    disk_finding,
    dns_finding,
    queue_findings,
)
from mailsrv.tools.doctor.findings import OK, PROBLEM, WARNING, Finding, exit_status, to_json, to_text
from support.certs import make_ca

NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
MX = "mx.example.org"


# --------------------------------------------------------------------------- findings


def test_exit_status_is_one_for_a_problem_only() -> None:
    assert exit_status([]) == 0
    assert exit_status([Finding("a", "b", OK, ""), Finding("a", "c", WARNING, "", "x")]) == 0
    assert exit_status([Finding("a", "b", OK, ""), Finding("a", "c", PROBLEM, "", "x")]) == 1


def test_text_puts_problems_first_with_their_fix_below() -> None:
    text = to_text([Finding("queue", "q", OK, "empty"),
                    Finding("disk", "d", WARNING, "8% free", "free space"),
                    Finding("dns", "MX x", PROBLEM, "missing", "publish: a\nb")])
    assert text.splitlines() == [
        "problem  dns          MX x: missing",
        " " * 22 + "fix: publish: a",
        " " * 27 + "b",
        "warning  disk         d: 8% free",
        " " * 22 + "fix: free space",
        "ok       queue        q: empty",
        "1 problem(s), 1 warning(s), 1 ok",
    ]


def test_json_keeps_the_order_and_counts() -> None:
    report = json.loads(to_json([Finding("a", "1", OK, "d"), Finding("b", "2", WARNING, "e", "f")]))
    assert report == {"status": "warning", "counts": {"problem": 0, "warning": 1, "ok": 1},
                      "findings": [
                          {"check": "a", "subject": "1", "level": "ok", "detail": "d", "fix": ""},
                          {"check": "b", "subject": "2", "level": "warning", "detail": "e",
                           "fix": "f"}]}
    assert json.loads(to_json([]))["status"] == "ok"


# --------------------------------------------------------------------------- configuration


def test_config_error_is_a_problem_and_warnings_keep_their_advice() -> None:
    [bad] = config_findings("/etc/m.toml", "/etc/m.toml: smtp.listen: expected a list")
    assert bad.level == PROBLEM and bad.detail.endswith("expected a list")
    assert "mailsrv check-config" in bad.fix
    ok, warned = config_findings("/etc/m.toml", None, "valid", [
        "postmaster@x.org goes to a@y.org, not to a mailbox here: mail leaves (name a local "
        "mailbox in the aliases file /etc/a)"])
    assert ok.level == OK and ok.detail == "valid"
    assert warned.level == WARNING and warned.detail.endswith("mail leaves")
    assert warned.fix == "name a local mailbox in the aliases file /etc/a"


# --------------------------------------------------------------------------- listeners


def test_listener_findings() -> None:
    port0 = listener_finding(ListenerFacts("tcp:0", "smtp", None))
    assert port0.level == WARNING and "fixed port" in port0.fix
    down = listener_finding(ListenerFacts("tcp:25", "smtp", ("127.0.0.1", 25), error="refused"))
    assert down.level == PROBLEM and "systemctl start mailsrv" in down.fix
    busy = listener_finding(ListenerFacts("tcp:25", "smtp", ("::1", 25), greeting="421 busy"))
    assert busy.level == PROBLEM and "[::1]:25 answers '421 busy'" in busy.detail
    up = listener_finding(ListenerFacts("ssl:465", "submission", ("127.0.0.1", 465),
                                        greeting="220 mx ESMTP"))
    assert up.level == OK and up.subject == "submission ssl:465"


# --------------------------------------------------------------------------- certificate


@pytest.mark.parametrize("pattern, host, matches", [
    (MX, MX, True), ("MX.Example.org.", MX, True), ("*.example.org", MX, True),
    ("*.example.org", "a.mx.example.org", False), ("*.example.org", "example.org", False),
    ("mail.example.org", MX, False),
])
def test_name_matches(pattern: str, host: str, matches: bool) -> None:
    assert name_matches(pattern, host) is matches


def cert(days_left: float, names: tuple[str, ...] = (MX,), **kw) -> CertFacts:
    return CertFacts("/c.pem", NOW - 30 * DAY, NOW + days_left * DAY, names, fingerprint="f", **kw)


def levels(found: list[Finding]) -> list[str]:
    return [f.level for f in found]


@pytest.mark.parametrize("days, level", [
    (-1, PROBLEM), (0, PROBLEM), (7, PROBLEM), (7.01, WARNING), (21, WARNING), (21.01, OK), (90, OK),
])
def test_certificate_days_left(days: float, level: str) -> None:
    expiry, named = certificate_findings(cert(days), MX, NOW)
    assert expiry.level == level and named.level == OK
    if level != OK:
        assert "certbot renew" in expiry.fix and "systemctl reload mailsrv" in expiry.fix


def test_certificate_not_yet_valid_wrong_name_none_unreadable_and_not_reloaded() -> None:
    early = CertFacts("/c.pem", NOW + DAY, NOW + 90 * DAY, (MX,), fingerprint="f")
    assert "not valid before" in certificate_findings(early, MX, NOW)[0].detail
    wrong = certificate_findings(cert(60, ("mail.example.org",)), MX, NOW)
    assert levels(wrong) == [OK, PROBLEM] and "get a certificate for mx.example.org" in wrong[1].fix
    [none] = certificate_findings(None, MX, NOW)
    assert none.level == WARNING and "certbot certonly" in none.fix
    [bad] = certificate_findings(CertFacts("/c.pem", error="no PEM"), MX, NOW)
    assert bad.level == PROBLEM and "no PEM" in bad.detail
    stale = certificate_findings(cert(60, served_fingerprint="old"), MX, NOW)
    assert levels(stale) == [OK, OK, WARNING] and "systemctl reload mailsrv" in stale[2].fix
    assert levels(certificate_findings(cert(60, served_fingerprint="f"), MX, NOW)) == [OK, OK]


def test_certificate_probe_reads_the_leaf(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    path, _ = ca.issue([MX, "*.example.net"], tmp_path, days=10)
    facts = probe.certificate(path)
    assert facts.names == (MX, "*.example.net") and facts.error is None
    assert facts.not_after.tzinfo is not None
    days = (facts.not_after - datetime.datetime.now(datetime.timezone.utc)).days
    assert days in (9, 10) and len(facts.fingerprint) == 64
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert probe.certificate(tmp_path / "junk.pem").error is not None
    assert probe.certificate(tmp_path / "missing.pem").error is not None


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("mode, level", [
    (0o600, OK), (0o640, OK), (0o400, OK), (0o660, WARNING), (0o644, PROBLEM), (0o601, PROBLEM),
    (0o602, PROBLEM),
])
def test_secret_file_modes(mode: int, level: str) -> None:
    found = permission_finding(FileFacts("/k", "TLS key", 0o100000 | mode, "root"))
    assert found.level == level
    if level == PROBLEM:
        assert found.fix == "chmod o-rwx /k"


def test_a_missing_secret_file_is_a_problem() -> None:
    assert permission_finding(FileFacts("/k", "TLS key", error="gone")).level == PROBLEM


def test_secret_files_probe(tmp_path: Path) -> None:
    from mailsrv.config import load_config

    users = tmp_path / "users"
    users.write_text("alice@example.org\n")
    (tmp_path / "dkim" / "example.org").mkdir(parents=True)
    (tmp_path / "dkim" / "example.org" / "s1.key").write_text("k")
    config_path = tmp_path / "m.toml"
    config_path.write_text(
        f'hostname = "{MX}"\n[domains]\nlocal = ["example.org"]\n'
        f'[mailboxes]\nroot = "{tmp_path / "mail"}"\nusers = "{users}"\n'
        f'[queue]\npath = "{tmp_path / "q"}"\n[dkim]\nkeys = "{tmp_path / "dkim"}"\n')
    config = load_config(config_path)
    assert [f.what for f in probe.secret_files(config)] == ["DKIM key"]  # no passwords in users
    users.write_text("alice@example.org:{BLF-CRYPT}$2b$12$x\n")
    assert [f.what for f in probe.secret_files(config)] == ["DKIM key", "users file (password hashes)"]


# --------------------------------------------------------------------------- DNS


def test_dns_verdicts_get_a_level_and_a_fix() -> None:
    mx = Record("MX", "example.org", "MX", f"10 {MX}.")
    assert dns_finding(mx, Verdict(dnsrecords.OK, "MX mx"), MX).level == OK
    unknown = dns_finding(mx, Verdict(dnsrecords.UNKNOWN, "no answer"), MX)
    assert unknown.level == WARNING and "relay.dns_servers" in unknown.fix
    missing = dns_finding(mx, Verdict(dnsrecords.MISSING, "no MX"), MX)
    assert missing.level == PROBLEM and missing.fix == f"publish: example.org. IN MX 10 {MX}."
    dmarc = Record("DMARC", "_dmarc.example.org", "TXT", "v=DMARC1; p=none")
    assert dns_finding(dmarc, Verdict(dnsrecords.MISSING, ""), MX).level == WARNING
    assert dns_finding(dmarc, Verdict(dnsrecords.WRONG, ""), MX).level == PROBLEM
    dkim = Record("DKIM", "s._domainkey.example.org", "TXT", "v=DKIM1; k=rsa; p=AB", key="AB")
    assert dns_finding(dkim, Verdict(dnsrecords.MISSING, ""), MX).fix == \
        'publish: s._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=AB"'
    a = dns_finding(Record("A", MX, "A", "", comment=True), Verdict(dnsrecords.MISSING, ""), MX)
    assert a.level == PROBLEM
    assert a.fix.startswith(f"publish an A record (and an AAAA record for IPv6) for {MX}")


def test_our_tls_records_are_warnings_with_their_fix() -> None:
    from mailsrv.tools.tlsrecords import tls_records

    sts, web, rpt = tls_records("example.org", MX, "enforce", 86400, ["mailto:t@example.org"])
    missing = dns_finding(sts, Verdict(dnsrecords.MISSING, "no MTA-STS record"), MX)
    assert missing.level == WARNING and missing.fix.startswith(
        "publish: _mta-sts.example.org. IN TXT \"v=STSv1; id=")
    assert dns_finding(rpt, Verdict(dnsrecords.WRONG, ""), MX).level == WARNING
    host = dns_finding(web, Verdict(dnsrecords.MISSING, ""), MX)
    assert host.level == WARNING
    assert "https://mta-sts.example.org/.well-known/mta-sts.txt" in host.fix


def test_ptr_fix_names_each_address() -> None:
    ptr = Record("PTR", MX, "PTR", "", comment=True)
    wrong = dns_finding(ptr, Verdict(dnsrecords.WRONG, "192.0.2.1=a.test, 2001:db8::1=b.test: "
                                                       f"should name {MX}"), MX)
    assert wrong.level == PROBLEM
    assert wrong.fix.startswith("ask whoever owns 192.0.2.1, 2001:db8::1 (your hosting provider")
    assert f"set its PTR record to {MX}" in wrong.fix
    none = dns_finding(ptr, Verdict(dnsrecords.MISSING, "no PTR for 192.0.2.1"), MX)
    assert none.fix.startswith("ask whoever owns 192.0.2.1 ")
    no_address = dns_finding(ptr, Verdict(dnsrecords.MISSING, f"{MX} has no address to look up"), MX)
    assert no_address.fix.startswith("publish an A record")


def test_blocklists() -> None:
    zones = {"bl.test": 2, "other.test": 1}
    listed, clean = blocklist_findings(
        {"192.0.2.1": Listing(("bl.test",), 2), "2001:db8::1": Listing()}, zones, 3)
    assert listed.level == PROBLEM and listed.detail == "listed by bl.test (score 2, our own threshold 3)"
    assert "delist 192.0.2.1" in listed.fix
    assert clean.level == OK and clean.detail == "not listed by bl.test, other.test"


# --------------------------------------------------------------------------- queue


T0 = 1_800_000_000.0


def queue(**kw) -> QueueFacts:
    return QueueFacts("/q", **kw)


@pytest.mark.parametrize("waited, count, level", [
    (86400, 1, OK), (86401, 1, WARNING), (60, 999, OK), (60, 1000, WARNING),
    (5 * 86400 + 3600, 1, WARNING), (5 * 86400 + 3601, 1, PROBLEM),
])
def test_queue_age_and_size(waited: float, count: int, level: str) -> None:
    [found] = queue_findings(queue(messages=count, waiting=count, oldest=T0 - waited,
                                   reasons=(("451 busy", 2), ("421 later", 1))), T0, 5 * 86400.0)
    assert found.level == level
    assert "deferred: 2x 451 busy; 1x 421 later" in found.detail
    if level != OK:
        assert found.fix


def test_queue_empty_corrupt_and_unreadable() -> None:
    assert levels(queue_findings(queue(), T0, 1.0)) == [OK]
    empty, corrupt = queue_findings(queue(corrupt=2), T0, 1.0)
    assert corrupt.level == WARNING and "ls -l /q/corrupt" in corrupt.fix
    [bad] = queue_findings(queue(error="EACCES"), T0, 1.0)
    assert bad.level == PROBLEM and "runuser -u mailsrv" in bad.fix


def test_queue_probe(tmp_path: Path) -> None:
    from mailsrv.storage import queue as spool

    qdir = tmp_path / "q"
    spool.queue_dirs(qdir)
    assert probe.queue_state(qdir) == QueueFacts(str(qdir))
    (qdir / "corrupt" / "x.json").write_text("{")
    assert probe.queue_state(qdir).corrupt == 1
    assert probe.queue_state(tmp_path / "nowhere").messages == 0


# --------------------------------------------------------------------------- disk

MIB = 1048576


@pytest.mark.parametrize("available, files_available, level", [
    (50 * MIB, 500, OK), (10 * MIB, 500, OK), (10 * MIB - 1, 500, WARNING),
    (5 * MIB, 500, WARNING), (5 * MIB - 1, 500, PROBLEM), (50 * MIB, 100, OK),
    (50 * MIB, 99, WARNING), (50 * MIB, 49, PROBLEM),
])
def test_disk_thresholds_are_shares_of_the_file_system(available, files_available, level) -> None:
    facts = DiskFacts(("queue.path /q",), 100 * MIB, available, 1000, files_available)
    found = disk_finding(facts, max_message_size=MIB)
    assert found.level == level
    if level != OK:
        assert found.fix.startswith("free space there")


def test_disk_smaller_than_one_message_and_no_inode_count() -> None:
    roomy = DiskFacts(("q",), 10 * MIB, 9 * MIB, 0, 0)  # btrfs: f_files 0
    assert disk_finding(roomy, 9 * MIB).level == OK
    found = disk_finding(roomy, 9 * MIB + 1)
    assert found.level == PROBLEM and "not room for one message" in found.detail
    assert disk_finding(DiskFacts(("q",), error="EACCES"), 1).level == PROBLEM


def test_disk_probe_one_finding_per_file_system(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    found = probe.disks([("queue.path", tmp_path / "a"), ("mailboxes.root", tmp_path / "b" / "c")])
    assert len(found) == 1  # the same file system: "b/c" does not exist yet, its parent counts
    assert found[0].paths == (f"queue.path {tmp_path / 'a'}", f"mailboxes.root {tmp_path / 'b' / 'c'}")
    st = os.statvfs(tmp_path)
    assert found[0].size == st.f_blocks * st.f_frsize
