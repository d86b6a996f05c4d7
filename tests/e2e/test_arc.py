"""
ARC (RFC 8617) end to end: a real twistd, the loopback DNS server, a client on 127.0.0.9
(not trusted).  The chains are made by Perl's Mail::DKIM::ARC::Signer
(tests/support/arc_seal.pl), an implementation independent of the dkimpy mailsrv verifies
with: a mailing list that changed a message from a p=reject domain and sealed what it found
on arrival.
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest
from test_mail_auth import OUTSIDE, auth_results, send, stored

from support.dkimkey import rsa_key
from support.harness import DNSServer, MailServer

SUPPORT = Path(__file__).parent.parent / "support"
LIST = "lists.example.net"  # trusted
OTHER_LIST = "lists.other.test"  # seals as well, but is not trusted


def _has_arc_signer() -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", "-MMail::DKIM::ARC::Signer", "-e", "1"],
                          capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not _has_arc_signer(), reason="Perl's Mail::DKIM::ARC is missing (libmail-dkim-perl)")


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    """An RSA key: (PEM file for the sealer, the key record)."""
    pem, public = rsa_key()
    path = tmp_path_factory.mktemp("arc") / "key.pem"
    path.write_bytes(pem)
    return path, "v=DKIM1; k=rsa; p=" + public


def zone(record: str) -> dict:
    spf_pass = f"v=spf1 ip4:{OUTSIDE} -all"
    return {"records": {
        LIST: [["TXT", spf_pass]],
        OTHER_LIST: [["TXT", spf_pass]],
        f"arc._domainkey.{LIST}": [["TXT", record]],
        f"arc._domainkey.{OTHER_LIST}": [["TXT", record]],
        "hop1.example": [["TXT", spf_pass]],
        "arc._domainkey.hop1.example": [["TXT", record]],
        "_dmarc.preject.example.com": [["TXT", "v=DMARC1; p=reject"]],
        "_dmarc.pnone.example.com": [["TXT", "v=DMARC1; p=none"]],
        "example.org": [["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
    }}


@pytest.fixture(scope="module")
def server(tmp_path_factory, key):
    workdir = tmp_path_factory.mktemp("arcserver")
    dns = DNSServer(workdir, zone(key[1]))
    mail = MailServer(workdir, dns.port, overrides={
        "relay": {"trusted_networks": ["127.0.0.1/32", "::1/128"]},
        "checks": {"dns_timeout": 2, "arc_trusted_sealers": [LIST]},
    }).start()
    yield mail
    mail.stop()
    dns.stop()


def ours(subject: str, server) -> str:
    """Our Authentication-Results: field (the list's own one stays as it came)."""
    [field] = [f for f in auth_results(stored(server, subject))
               if f.startswith("mx.example.org;")]
    return field


def list_message(author: str, subject: str, sealer: str = LIST, arrival: str = "") -> bytes:
    """What a list sends: the author's message with a footer (so the author's DKIM signature,
    left out here, would no longer verify), the list's Authentication-Results: of its
    arrival and the ARC set Perl seals it with."""
    domain = author.rpartition("@")[2]
    arrival = arrival or (f"spf=pass smtp.mailfrom={author};\r\n"
                          f"\tdkim=pass header.d={domain} header.s=s1;\r\n"
                          f"\tdmarc=pass header.from={domain}")
    data = (f"Authentication-Results: {sealer}; {arrival}\r\n"
            f"From: {author}\r\nTo: list@{sealer}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@{domain}>\r\n"
            f"List-Id: <list.{sealer}>\r\n\r\nHello, list.\r\n-- \r\nthe list's footer\r\n")
    return seal(data.encode(), sealer)


def seal(data: bytes, sealer: str, chain: str = "none") -> bytes:
    key_path = Path(pytest.arc_key_path)  # set by the autouse fixture below
    result = subprocess.run(
        ["perl", str(SUPPORT / "arc_seal.pl"), sealer, "arc", str(key_path), sealer, chain],
        input=data, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


@pytest.fixture(autouse=True)
def _key_path(key):
    pytest.arc_key_path = str(key[0])


def test_a_list_message_sealed_by_a_trusted_list_passes_a_dmarc_reject(server):
    data = list_message("news@preject.example.com", "trusted list")
    assert send(server, f"bounces@{LIST}", data)[0] == 250
    field = ours("trusted list", server)
    assert "dmarc=fail (p=reject dis=none arc=pass override=local_policy)" in field
    assert f"arc=pass (i=1) header.as-d={LIST} header.as-s=arc" in field
    assert "arc=pass arc_override=preject.example.com" in server.log_text()


def test_the_same_from_an_untrusted_sealer_is_refused(server):
    data = list_message("news@preject.example.com", "untrusted list", sealer=OTHER_LIST)
    code, text = send(server, f"bounces@{OTHER_LIST}", data)
    assert code == 550 and text.startswith("5.7.1") and "preject.example.com" in text
    assert "dmarc=fail arc=pass" in server.log_text()  # refused, with its chain's result


def test_a_trusted_list_that_recorded_no_pass_does_not_override(server):
    data = list_message("news@preject.example.com", "no pass on arrival",
                        arrival="spf=softfail smtp.mailfrom=news@preject.example.com;\r\n"
                                "\tdkim=fail header.d=preject.example.com; dmarc=fail")
    code, _ = send(server, f"bounces@{LIST}", data)
    assert code == 550


def test_our_own_domain_in_from_passes_through_a_trusted_list(server):
    data = list_message("bob@example.org", "own domain via list")
    assert send(server, f"bounces@{LIST}", data)[0] == 250
    field = ours("own domain via list", server)
    assert "arc=pass" in field
    # and refused from the untrusted one
    data = list_message("bob@example.org", "own domain via other list", sealer=OTHER_LIST)
    code, text = send(server, f"bounces@{OTHER_LIST}", data)
    assert code == 550 and text.startswith("5.7.1")


def test_a_tampered_chain_is_arc_fail(server):
    data = list_message("news@pnone.example.com", "tampered")
    data = data.replace(b"the list's footer", b"a changed footer")
    assert send(server, f"bounces@{LIST}", data)[0] == 250
    field = ours("tampered", server)
    assert "arc=fail" in field and f"header.as-d={LIST}" in field
    assert "dmarc=fail (p=none dis=none)" in field
    # and with a p=reject author, a tampered chain from the trusted list is refused
    data = list_message("news@preject.example.com", "tampered reject")
    data = data.replace(b"Subject: tampered reject", b"Subject: tampered, rejected")
    assert send(server, f"bounces@{LIST}", data)[0] == 550


def test_a_two_hop_chain_sealed_by_perl_passes(server):
    first = list_message("news@preject.example.com", "two hops", sealer="hop1.example")
    ar = f"Authentication-Results: {LIST}; arc=pass; dmarc=pass header.from=preject.example.com\r\n"
    data = seal(ar.encode() + first, LIST, chain="pass")
    assert send(server, f"bounces@{LIST}", data)[0] == 250
    field = ours("two hops", server)
    assert f"arc=pass (i=2) header.as-d={LIST}" in field and "override=local_policy" in field


def test_malformed_arc_fields_are_arc_fail_not_a_crash(server):
    data = list_message("news@pnone.example.com", "malformed")
    data = b"ARC-Seal: i=; cv=pass; garbage\r\n" + data
    assert send(server, f"bounces@{LIST}", data)[0] == 250
    field = ours("malformed", server)
    assert "arc=fail" in field


def test_no_chain_is_arc_none(server):
    data = (b"From: a@pnone.example.com\r\nTo: alice@example.org\r\nSubject: no chain\r\n"
            b"Message-ID: <nochain@pnone.example.com>\r\n\r\nHi.\r\n")
    assert send(server, f"bounces@{LIST}", data)[0] == 250
    field = ours("no chain", server)
    assert field.endswith("arc=none")


# -- our seals on forwarded mail, verified by Mail::DKIM::ARC::Verifier -------------------


def _has_arc_verifier() -> bool:
    return subprocess.run(["perl", "-MMail::DKIM::ARC::Verifier", "-MNet::DNS::Resolver",
                           "-e", "1"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def forwarding(tmp_path_factory, key):
    """A server whose alias fwd@example.org forwards to carol@remote.test (a sink on
    127.0.0.2) and alice; example.org (the SRS domain) has an RSA and an Ed25519 key."""
    import sys

    from support.harness import REPO, SMTPSink, free_port

    sys.path.insert(0, str(REPO))
    from mailsrv.message import dkimkeys

    work = tmp_path_factory.mktemp("arcfwd")
    records = zone(key[1])["records"]
    for selector, algorithm in (("r1", "rsa"), ("e1", "ed25519")):
        pem = dkimkeys.generate(algorithm)
        dkimkeys.write_key(work / "dkim", "example.org", selector, pem, None)
        records[f"{selector}._domainkey.example.org"] = [
            ["TXT", dkimkeys.txt_value(*dkimkeys.public_key(pem))]]
    records.update({"sender.test": [["TXT", f"v=spf1 ip4:{OUTSIDE} -all"]],
                    "remote.test": [["MX", 10, "mx.remote.test"]],
                    "mx.remote.test": [["A", "127.0.0.2"]]})
    dns = DNSServer(work, {"records": records})
    port = free_port(["127.0.0.2"])
    sink = SMTPSink(work / "sink", "127.0.0.2", hostname="mx.remote.test", port=port)
    secret = work / "srs-secret"
    secret.write_text("a-test-secret-for-srs-0123456789\n")
    secret.chmod(0o600)
    (work / "mailsrv").mkdir()
    server = MailServer(
        work / "mailsrv", dns.port,
        aliases=["postmaster: alice@example.org",
                 "fwd@example.org: alice@example.org, carol@remote.test"],
        overrides={"relay": {"port": port, "trusted_networks": ["127.0.0.1/32"]},
                   "srs": {"secret_file": str(secret)},
                   "dkim": {"keys": str(work / "dkim")},
                   "checks": {"dns_timeout": 2, "arc_trusted_sealers": [LIST]}},
    ).start()
    yield {"server": server, "sink": sink, "dns": dns, "work": work}
    server.stop()
    sink.stop()
    dns.stop()


def forward(env, sender: str, data: bytes, subject: str) -> tuple[dict, str]:
    """Send ``data`` to fwd@example.org from outside; (the copy carol's server got, Perl's
    ARC verdict on it: ``overall: result (detail)`` and one line per signature)."""
    from support.harness import wait_for

    server, sink = env["server"], env["sink"]
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=30,
                      source_address=(OUTSIDE, 0)) as client:
        client.sendmail(sender, ["fwd@example.org"], data)
    [copy] = wait_for(lambda: [m for m in sink.messages() if f"Subject: {subject}\r\n"
                               in m["data"]], 30, "the forwarded copy")
    result = subprocess.run(["perl", str(SUPPORT / "arc_verify.pl"), str(env["dns"].port)],
                            input=copy["data"].encode(), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return copy, result.stdout.decode()


@pytest.mark.skipif(not _has_arc_verifier(), reason="Mail::DKIM::ARC::Verifier or Net::DNS "
                    "is missing (libmail-dkim-perl, libnet-dns-perl)")
def test_a_forwarded_message_is_sealed_and_perl_verifies_the_seal(forwarding):
    data = (b"From: Dave <dave@sender.test>\r\nTo: fwd@example.org\r\nSubject: sealed fwd\r\n"
            b"Message-ID: <sealed.fwd@sender.test>\r\n\r\nForward me.\r\n")
    copy, verdict = forward(forwarding, "dave@sender.test", data, "sealed fwd")
    assert copy["mail_from"].startswith("SRS0=") and copy["mail_from"].endswith("@example.org")
    assert copy["data"].startswith("ARC-Seal: i=1; cv=none; a=rsa-sha256; d=example.org; s=r1;")
    assert "ARC-Authentication-Results: i=1; mx.example.org;" in copy["data"]
    assert verdict.splitlines()[-1].startswith("overall: pass"), verdict
    assert "seal 1 example.org r1 pass" in verdict and "ams 1 example.org r1 pass" in verdict
    # the local copy of the same message carries no ARC set
    [local] = [m for m in forwarding["server"].messages("alice@example.org")
               if m["Subject"] == "sealed fwd"]
    assert local["ARC-Seal"] is None and local["Authentication-Results"] is not None
    assert "arc id=" in forwarding["server"].log_text()


@pytest.mark.skipif(not _has_arc_verifier(), reason="Mail::DKIM::ARC::Verifier or Net::DNS "
                    "is missing (libmail-dkim-perl, libnet-dns-perl)")
def test_a_list_message_forwarded_continues_the_lists_chain(forwarding):
    data = list_message_to_fwd("news@preject.example.com", "list then fwd")
    copy, verdict = forward(forwarding, f"bounces@{LIST}", data, "list then fwd")
    assert copy["data"].startswith("ARC-Seal: i=2; cv=pass; a=rsa-sha256; d=example.org;")
    assert verdict.splitlines()[-1].startswith("overall: pass"), verdict
    assert "seal 1 lists.example.net arc pass" in verdict


@pytest.mark.skipif(not _has_arc_verifier(), reason="Mail::DKIM::ARC::Verifier or Net::DNS "
                    "is missing (libmail-dkim-perl, libnet-dns-perl)")
def test_perl_sees_our_seal_fail_when_the_forwarded_copy_is_changed(forwarding):
    data = (b"From: Dave <dave@sender.test>\r\nTo: fwd@example.org\r\nSubject: changed fwd\r\n"
            b"Message-ID: <changed.fwd@sender.test>\r\n\r\nForward me.\r\n")
    copy, _ = forward(forwarding, "dave@sender.test", data, "changed fwd")
    changed = copy["data"].replace("Forward me.", "Forward me, changed.").encode()
    result = subprocess.run(["perl", str(SUPPORT / "arc_verify.pl"),
                             str(forwarding["dns"].port)], input=changed, capture_output=True,
                            timeout=60)
    assert result.stdout.decode().splitlines()[-1].startswith("overall: fail")


def list_message_to_fwd(author: str, subject: str) -> bytes:
    """A list message addressed to our alias."""
    domain = author.rpartition("@")[2]
    data = (f"Authentication-Results: {LIST}; spf=pass smtp.mailfrom={author};\r\n"
            f"\tdmarc=pass header.from={domain}\r\n"
            f"From: {author}\r\nTo: fwd@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@{domain}>\r\n\r\nHello.\r\n")
    return seal(data.encode(), LIST)
