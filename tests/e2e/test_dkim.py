"""
DKIM signing end to end: a real server with keys made by ``mailsrv dkim keygen``, mail
submitted with AUTH, from a trusted network and by ``sendmail``, relayed to a remote MX on
127.0.0.2 or delivered here, and every signature verified by an independent implementation:
Perl's Mail::DKIM (Debian libmail-dkim-perl, Ed25519 through libcryptx-perl), which looks the
keys up with Net::DNS on a loopback DNS server serving the TXT records keygen printed.

The server trusts only 127.0.0.1; clients that must look like the Internet connect from
127.0.0.9.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.certs import make_ca
from support.harness import REPO, DNSServer, MailServer, SMTPSink, _env, free_port, wait_for
from support.mail import connect, send_mail

sys.path.insert(0, str(REPO))
from mailsrv.accounts.auth import hash_password  # noqa: E402  (the checkout's code)

SUPPORT = Path(__file__).parent.parent / "support"
PASSWORD = "alice pw"
UNTRUSTED = "127.0.0.9"
ZONE = {"records": {"remote.test": [["MX", 10, "mx.remote.test"]],
                    "mx.remote.test": [["A", "127.0.0.2"]],
                    # The outside client may send as example.org (SPF pass, so aligned): its
                    # mail is accepted, and must still not be signed by us.
                    "example.org": [["TXT", "v=spf1 ip4:127.0.0.9 -all"]]}}


def _perl_has(module: str) -> bool:
    return subprocess.run(["perl", f"-M{module}", "-e", "1"], capture_output=True).returncode == 0


def perl_missing() -> str | None:
    """Why Mail::DKIM cannot verify here (the Debian package to install), or None."""
    if shutil.which("perl") is None:
        return "perl is not installed"
    for module, package in (("Mail::DKIM::Verifier", "libmail-dkim-perl"),
                            ("Crypt::PK::Ed25519", "libcryptx-perl"),
                            ("Net::DNS::Resolver", "libnet-dns-perl")):
        if not _perl_has(module):
            return f"Perl's {module} is missing (apt install {package})"
    return None


def go_missing() -> str | None:
    """Why go-msgauth's dkim-verify cannot run in a namespace of its own here, or None."""
    if shutil.which("dkim-verify") is None:
        return "go-msgauth's dkim-verify is not installed (apt install go-msgauth)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare (util-linux) or ip (iproute2) is missing"
    if os.geteuid() != 0:
        return "dkim-verify runs in a network namespace of its own, which needs root"
    return None


pytestmark = pytest.mark.skipif(perl_missing() is not None, reason=perl_missing() or "")

#: Mail::DKIM verifies Ed25519 (RFC 8463) from 1.20230630; bookworm's 1.20230212 does not,
#: so there go-msgauth's dkim-verify is the independent verifier of those signatures.
PERL_ED25519 = perl_missing() is None and _perl_has("Mail::DKIM::Algorithm::ed25519_sha256")
GO_MISSING = go_missing()


def mailsrv_command(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailsrv.tools.cli", *args, "--config", str(config)],
        capture_output=True, text=True, env=_env(), timeout=60,
    )


def keygen(env, domain: str, selector: str, algorithm: str = "rsa") -> None:
    """``mailsrv dkim keygen``; the record it prints is what the verifiers' DNS serves."""
    result = mailsrv_command(env["server"].config_path, "dkim", "keygen", domain,
                             "--selector", selector, "--algorithm", algorithm)
    assert result.returncode == 0, result.stderr
    text = result.stdout[result.stdout.index(f"{selector}._domainkey."):]
    name = text.split()[0]
    assert name == f"{selector}._domainkey.{domain}." and " IN TXT (" in text
    env["records"][name.rstrip(".")] = [["TXT", *re.findall(r'"([^"]*)"', text)]]


def perl_verify(env, message: bytes) -> tuple[list[str], str]:
    """Mail::DKIM's verdict: one line per signature (``domain selector algorithm result
    (detail)``), sorted, and the overall result; the keys from the tests' DNS server."""
    work = env["work"] / f"perl{next(env['count'])}"
    work.mkdir()
    dns = DNSServer(work, {"records": env["records"]})
    try:
        result = subprocess.run(["perl", str(SUPPORT / "dkim_verify.pl"), str(dns.port)],
                                input=message, capture_output=True, timeout=60)
    finally:
        dns.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.decode().splitlines()
    return sorted(lines[:-1]), lines[-1].removeprefix("overall: ")


def go_verify(env, message: bytes) -> list[str]:
    """go-msgauth's dkim-verify: one line per signature, in the message's order
    ("Valid signature for example.org", "Invalid signature for example.org: why")."""
    work = env["work"] / f"go{next(env['count'])}"
    work.mkdir()
    (work / "zone.json").write_text(json.dumps({"records": env["records"]}))
    (work / "message").write_bytes(message)
    result = subprocess.run(
        ["unshare", "--net", "--mount", "sh", str(SUPPORT / "netns_dkim_verify.sh"),
         sys.executable, str(SUPPORT / "dns_server.py"), str(work / "zone.json"),
         str(work / "message")], capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return [re.sub(r"^\S+ \S+ ", "", line) for line in result.stdout.splitlines()]


def assert_verified(env, message: bytes, *signatures: tuple[str, str, str]) -> None:
    """Every one of ``signatures`` ((domain, selector, algorithm), in header order) and no
    other passes Mail::DKIM and, where it can run, dkim-verify."""
    expected = []
    for domain, selector, algorithm in signatures:
        if algorithm == "ed25519-sha256" and not PERL_ED25519:
            if GO_MISSING is not None:
                pytest.skip(f"no verifier of Ed25519 signatures: Mail::DKIM is too old and "
                            f"{GO_MISSING}")
            result = "invalid (invalid (unsupported algorithm ed25519-sha256))"
        else:
            result = "pass (pass)"
        expected.append(f"{domain} {selector} {algorithm} {result}")
    assert perl_verify(env, message) == (sorted(expected), "pass" if signatures else "none")
    if GO_MISSING is None:
        assert go_verify(env, message) == [f"Valid signature for {d}" for d, _, _ in signatures]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("dkim")
    dns = DNSServer(work, ZONE)
    sink_port = free_port(["127.0.0.2"])
    sink = SMTPSink(work / "sink", "127.0.0.2", hostname="mx.remote.test", port=sink_port)
    ca = make_ca(work)
    cert, key = ca.issue(["mx.example.org"], work, ips=("127.0.0.1",))
    users = [f"alice@example.org:{hash_password(PASSWORD, cost=4)}", "bob@example.org",
             "carol@example.net"]
    port = free_port(["127.0.0.1"])  # fixed: sendmail finds it in smtp.listen
    (work / "server").mkdir()
    server = MailServer(work / "server", dns.port, users=users, overrides={
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "auth": True},
        "tls": {"cert": str(cert), "key": str(key)},
        "relay": {"trusted_networks": ["127.0.0.1/32"], "port": sink_port},
        "dkim": {"keys": str(work / "dkim")},
    })
    env = {"work": work, "sink": sink, "server": server, "ca": ca, "records": {},
           "count": itertools.count()}
    keygen(env, "example.org", "r1", "rsa")
    keygen(env, "example.org", "e1", "ed25519")
    keygen(env, "example.net", "old", "rsa")
    server.start()
    yield env
    server.stop()
    sink.stop()
    dns.stop()


def message(sender: str, to: str, subject: str) -> bytes:
    return (f"From: Someone <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Fri, 02 Jan 2026 03:04:05 +0000\r\nMessage-ID: <{subject}@test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "Hello,  with  spaces   and a line\r\n.dot line\r\n\r\n\r\n").encode()


def relayed(env, subject: str) -> bytes:
    sink = env["sink"]
    found = wait_for(lambda: [m for m in sink.messages() if f"Subject: {subject}\r\n"
                              in m["data"]] or None, 20, f"{subject!r} at the sink")
    return found[0]["data"].encode("latin-1")


def delivered(env, address: str, subject: str) -> bytes:
    server = env["server"]

    def find():
        return [m for m in server.messages(address) if m["Subject"] == subject] or None

    return wait_for(find, 20, f"{subject!r} for {address}")[0].as_bytes()


def submit(env, subject: str, to: str) -> None:
    """alice, from outside (127.0.0.9), after STARTTLS and AUTH."""
    with connect(env["server"].port, source=UNTRUSTED) as client:
        client.starttls(context=env["ca"].client_context())
        client.ehlo()
        client.login("alice@example.org", PASSWORD)
        client.sendmail("alice@example.org", [to],
                        message("alice@example.org", to, subject))


#: example.org's two keys, in the order their signatures come (selectors sorted).
ORG_BOTH = (("example.org", "e1", "ed25519-sha256"), ("example.org", "r1", "rsa-sha256"))


def test_an_authenticated_users_relayed_mail_is_signed_with_rsa_and_ed25519(env):
    submit(env, "auth-relay", "someone@remote.test")
    data = relayed(env, "auth-relay")
    assert data.count(b"DKIM-Signature:") == 2
    assert_verified(env, data, *ORG_BOTH)
    assert re.search(r"accepted id=\S+ client=\S+ .*user=alice@example\.org "
                     r"dkim=example\.org/e1,example\.org/r1", env["server"].log_text())
    # Each signature covers the oversigned From: and the body: one more From: or one
    # changed word fails the RSA signature for Mail::DKIM, and both for dkim-verify.
    forged = data.replace(b"To: someone", b"From: ceo@example.org\r\nTo: someone", 1)
    altered = data.replace(b"Hello,", b"Hallo,")
    for bad, why in ((forged, "signature"), (altered, "body")):
        lines, overall = perl_verify(env, bad)
        assert overall == "fail", lines
        assert [line for line in lines if " r1 " in line][0].startswith(
            "example.org r1 rsa-sha256 fail"), lines
        if GO_MISSING is None:
            verdicts = go_verify(env, bad)
            assert len(verdicts) == 2 and all(
                v.startswith("Invalid signature for example.org") and why in v
                for v in verdicts), verdicts


def test_local_delivery_from_an_authenticated_user_is_signed(env):
    submit(env, "auth-local", "bob@example.org")
    data = delivered(env, "bob@example.org", "auth-local")
    assert data.startswith(b"Return-Path: <alice@example.org>\nDelivered-To: bob@example.org\n")
    assert_verified(env, data, *ORG_BOTH)


def test_mail_from_a_trusted_network_and_from_sendmail_is_signed(env):
    send_mail(env["server"].port, "bob@example.org", ["x@remote.test"],
              message("bob@example.org", "x@remote.test", "trusted"))
    assert_verified(env, relayed(env, "trusted"), *ORG_BOTH)
    # sendmail -t: the From: and Date: it adds are signed, and so is the Message-ID: the
    # server adds (the modifier before the signer), which comes first.
    result = subprocess.run(
        [sys.executable, "-m", "mailsrv.tools.sendmail", "-C", str(env["server"].config_path),
         "-t", "-f", "bob@example.org"],
        input=b"To: y@remote.test\nSubject: by-sendmail\n\nfrom cron\n",
        capture_output=True, env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    data = relayed(env, "by-sendmail")
    signed = re.findall(rb"[; ]h=([^;]*);", re.sub(rb"\r\n[ \t]+", b" ", data))
    assert [re.sub(rb"\s", b"", h) for h in signed] == [b"message-id:to:subject:from:date:from"] * 2
    assert_verified(env, data, *ORG_BOTH)


def test_mail_from_the_internet_is_not_signed(env):
    # An unauthenticated client outside the trusted networks, even with our From: (its
    # mail is not ours to sign), delivered to a local user.
    with connect(env["server"].port, source=UNTRUSTED) as client:
        client.sendmail("alice@example.org", ["bob@example.org"],
                        message("alice@example.org", "bob@example.org", "from-outside"))
    data = delivered(env, "bob@example.org", "from-outside")
    assert b"DKIM-Signature" not in data
    assert_verified(env, data)  # no signature: Mail::DKIM says "none"


def test_a_from_domain_without_a_key_is_not_signed(env):
    send_mail(env["server"].port, "app@nokey.test", ["z@remote.test"],
              message("app@nokey.test", "z@remote.test", "no-key"))
    assert b"DKIM-Signature" not in relayed(env, "no-key")


def test_our_bounces_are_signed_with_the_hosts_parent_domain(env):
    # hostname mx.example.org has no keys; its parent example.org's sign the DSN.
    env["sink"].set_rules({"rcpt": [["^gone@", "550 5.1.1 <gone@remote.test>: no such user"]]})
    try:
        send_mail(env["server"].port, "bob@example.org", ["gone@remote.test"],
                  message("bob@example.org", "gone@remote.test", "will-bounce"))
        server = env["server"]
        dsn = wait_for(lambda: [m for m in server.messages("bob@example.org")
                                if "Undelivered" in (m["Subject"] or "")] or None,
                       30, "the bounce for bob")[0].as_bytes()
    finally:
        env["sink"].set_rules({})
    assert b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>" in dsn
    assert_verified(env, dsn, *ORG_BOTH)


def test_rotation_two_selectors_then_the_new_one_alone(env):
    server = env["server"]

    def send(subject: str) -> bytes:
        send_mail(server.port, "carol@example.net", ["r@remote.test"],
                  message("carol@example.net", "r@remote.test", subject))
        return relayed(env, subject)

    old = ("example.net", "old", "rsa-sha256")
    new = ("example.net", "new", "rsa-sha256")
    assert_verified(env, send("rotate-1"), old)

    def reloaded(count: int) -> None:
        os.kill(server.process.pid, signal.SIGHUP)
        wait_for(lambda: server.log_text().count("reload (SIGHUP): dkim:") >= count, 20,
                 "the keys reloaded")

    keygen(env, "example.net", "new", "rsa")
    reloaded(1)
    assert_verified(env, send("rotate-2"), new, old)
    (env["work"] / "dkim" / "example.net" / "old.key").unlink()
    reloaded(2)
    assert_verified(env, send("rotate-3"), new)
    # A bad key on SIGHUP is refused: the keys that worked go on signing.
    bad = env["work"] / "dkim" / "example.net" / "bad.key"
    bad.write_text("not a key")
    bad.chmod(0o600)
    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: "refused, keeping the previous DKIM keys" in server.log_text(), 20,
             "the bad key refused")
    assert f"{bad}: expected a PEM private key" in server.log_text()
    assert_verified(env, send("rotate-4"), new)
    bad.unlink()


def test_a_bad_key_stops_the_start_naming_the_file(env, tmp_path):
    keys = tmp_path / "dkim" / "example.org"
    keys.mkdir(parents=True)
    (keys / "s1.key").write_text("garbage")
    (keys / "s1.key").chmod(0o644)
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", 53, overrides={"dkim": {"keys": str(tmp_path / "dkim")}})
    result = subprocess.run(server.command(), capture_output=True, text=True, env=_env(),
                            timeout=60, cwd=tmp_path / "s")
    assert result.returncode == 2
    assert (f"mailsrv: configuration error: {server.config_path}: dkim.keys: "
            f"{keys / 's1.key'}: expected a key file no other user can read") in result.stderr
