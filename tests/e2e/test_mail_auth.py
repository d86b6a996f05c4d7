"""
SPF, DKIM, DMARC and our own domains, end to end: a real twistd, the loopback DNS server
serving each scenario, clients on 127.0.0.x addresses that are not trusted, and messages
signed by Perl's Mail::DKIM (tests/support/dkim_sign.pl), not by the dkimpy that verifies.
"""

from __future__ import annotations

import email
import mailbox
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from support.certs import self_signed
from support.harness import REPO, DNSServer, MailServer
from support.mail import CLIENT_NAME

sys.path.insert(0, str(REPO))
from mailsrv.accounts.auth import hash_password  # noqa: E402  (the checkout's, like the server)
from support.dkimkey import rsa_key

SIGNER = Path(__file__).parent.parent / "support" / "dkim_sign.pl"
#: The client's address: outside relay.trusted_networks (127.0.0.1 only, below).
OUTSIDE = "127.0.0.9"
#: The address our own SPF record (example.org) authorizes besides 127.0.0.1.
OUR_OTHER_HOST = "127.0.0.5"
RCPT = "alice@example.org"


def _has_mail_dkim() -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", "-MMail::DKIM::Signer", "-e", "1"],
                          capture_output=True).returncode == 0


needs_mail_dkim = pytest.mark.skipif(
    not _has_mail_dkim(), reason="Perl's Mail::DKIM is missing (Debian: libmail-dkim-perl)")


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    """An RSA key: (PEM file for the signer, the p= value for the key record)."""
    pem, public = rsa_key()
    path = tmp_path_factory.mktemp("dkim") / "key.pem"
    path.write_bytes(pem)
    return path, public


def zone(public_key: str) -> dict:
    spf_pass = f"v=spf1 ip4:{OUTSIDE} -all"
    records = {
        # SPF of envelope senders
        "pass.example.com": [["TXT", spf_pass]],
        "fail.example.com": [["TXT", "v=spf1 ip4:192.0.2.1 -all"]],
        "softfail.example.com": [["TXT", "v=spf1 ~all"]],
        "neutral.example.com": [["TXT", "v=spf1 ?all"]],
        "none.example.com": [["A", "192.0.2.1"]],
        "mxspf.example.com": [["TXT", "v=spf1 mx a:alias.example.com -all"],
                              ["MX", 10, "mail.mxspf.example.com"]],
        "mail.mxspf.example.com": [["A", "192.0.2.1"]],
        "alias.example.com": [["CNAME", "host.example.com"]],
        "host.example.com": [["A", OUTSIDE]],
        "twospf.example.com": [["TXT", "v=spf1 -all"], ["TXT", "v=spf1 +all"]],
        "manylookups.example.com": [
            ["TXT", "v=spf1 " + " ".join(f"include:l{i}.example.com" for i in range(11))
             + " -all"]],
        **{f"l{i}.example.com": [["TXT", "v=spf1 ip4:192.0.2.1 -all"]] for i in range(11)},
        # an envelope sender whose SPF passes but that aligns with none of the From: domains
        "relay.test": [["TXT", spf_pass]],
        # DMARC policies
        "_dmarc.pnone.example.com": [["TXT", "v=DMARC1; p=none"]],
        "_dmarc.pquar.example.com": [["TXT", "v=DMARC1; p=quarantine"]],
        "_dmarc.preject.example.com": [["TXT", "v=DMARC1; p=reject"]],
        "_dmarc.pct0.example.com": [["TXT", "v=DMARC1; p=reject; pct=0"]],
        "_dmarc.strict.example.com": [["TXT", "v=DMARC1; p=reject; aspf=s"]],
        "mail.strict.example.com": [["TXT", spf_pass]],
        "_dmarc.relaxed.example.com": [["TXT", "v=DMARC1; p=reject"]],
        "mail.relaxed.example.com": [["TXT", spf_pass]],
        "_dmarc.example.edu": [["TXT", "v=DMARC1; p=none; sp=reject"]],
        "_dmarc.signed.example.com": [["TXT", "v=DMARC1; p=reject"]],
        "sel._domainkey.signed.example.com": [["TXT", f"v=DKIM1; k=rsa; p={public_key}"]],
        # our own domains: example.org publishes SPF, example.net nothing
        "example.org": [["TXT", f"v=spf1 ip4:127.0.0.1 ip4:{OUR_OTHER_HOST} -all"]],
    }
    return {"records": records, "servfail": ["temperror.example.com",
                                             "_dmarc.dnsfail.example.com"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory, key):
    workdir = tmp_path_factory.mktemp("auth")
    dns = DNSServer(workdir, zone(key[1]))
    mail = MailServer(workdir, dns.port, overrides={
        "relay": {"trusted_networks": ["127.0.0.1/32", "::1/128"]},
        "checks": {"dns_timeout": 2},
    }).start()
    yield mail
    mail.stop()
    dns.stop()


def message(sender_header: str, subject: str = "test", body: str = "Hello.\r\n",
            extra: str = "") -> bytes:
    return (f"From: {sender_header}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@client.test>\r\n{extra}\r\n{body}"
            ).encode()


def send(server, sender: str, data: bytes, source: str = OUTSIDE) -> tuple[int, str]:
    """(code, text) of the reply to the final dot (or to the first refused command)."""
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname=CLIENT_NAME, timeout=30,
                      source_address=(source, 0)) as client:
        try:
            client.sendmail(sender, [RCPT], data)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, ""


def stored(server, subject: str, folder: str | None = None) -> email.message.Message:
    box = server.maildir(RCPT)
    if folder is not None:
        box = box.get_folder(folder)
    found = [m for m in box if m["Subject"] == subject]
    assert len(found) == 1, [m["Subject"] for m in box]
    return found[0]


def auth_results(msg: email.message.Message) -> list[str]:
    return [" ".join(v.split()) for v in msg.get_all("Authentication-Results", [])]


def sign(key_path: Path, data: bytes, domain: str = "signed.example.com",
         selector: str = "sel") -> bytes:
    result = subprocess.run(["perl", str(SIGNER), domain, selector, str(key_path)],
                            input=data, capture_output=True, check=True, timeout=60)
    return result.stdout


# -- SPF -------------------------------------------------------------------------------


@pytest.mark.parametrize(("domain", "result"), [
    ("pass.example.com", "pass"),
    ("mxspf.example.com", "pass"),  # through MX, A and CNAME answers
    ("fail.example.com", "fail"),
    ("softfail.example.com", "softfail"),
    ("neutral.example.com", "neutral"),
    ("none.example.com", "none"),
    ("temperror.example.com", "temperror"),
    ("twospf.example.com", "permerror"),
    ("manylookups.example.com", "permerror"),
])
def test_spf_result_is_recorded_and_the_message_accepted(server, domain, result):
    subject = f"spf {domain}"
    assert send(server, f"someone@{domain}", message(f"someone@{domain}", subject))[0] == 250
    [field] = auth_results(stored(server, subject))
    assert field.startswith("mx.example.org;")
    assert f"spf={result} " in field and f"smtp.mailfrom=someone@{domain}" in field
    assert "dkim=none" in field
    log = server.log_text()
    assert f"from=<someone@{domain}>" in log and f"spf={result} dkim=none" in log


def test_null_sender_checks_the_helo_name(server):
    # client.test has no record at all: none, for the HELO identity
    assert send(server, "", message("mailer-daemon@pass.example.com", "bounce"))[0] == 250
    [field] = auth_results(stored(server, "bounce"))
    assert "spf=none" in field and "smtp.helo=client.test" in field


def test_a_dns_server_that_never_answers_is_temperror_not_a_refusal(tmp_path):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # takes the queries, answers none
    try:
        mail = MailServer(tmp_path, silent.getsockname()[1], overrides={
            "relay": {"trusted_networks": ["127.0.0.1/32"]},
            "checks": {"dns_timeout": 1}, "smtp": {"reverse_dns": False},
        }).start()
        try:
            code, _ = send(mail, "someone@pass.example.com",
                           message("someone@pnone.example.com", "silent dns"))
            assert code == 250
            [field] = auth_results(stored(mail, "silent dns"))
            assert "spf=temperror" in field and "dmarc=temperror" in field
        finally:
            mail.stop()
    finally:
        silent.close()


# -- DKIM (signed by Perl's Mail::DKIM) ------------------------------------------------


@needs_mail_dkim
def test_dkim_pass_aligns_dmarc_despite_an_unaligned_spf(server, key):
    data = sign(key[0], message("news@signed.example.com", "dkim pass"))
    assert send(server, "bounces@relay.test", data)[0] == 250
    [field] = auth_results(stored(server, "dkim pass"))
    assert "spf=pass" in field
    assert "dkim=pass header.d=signed.example.com" in field and "header.s=sel" in field
    assert "dmarc=pass" in field and "header.from=signed.example.com" in field


@needs_mail_dkim
def test_a_changed_body_fails_dkim_and_then_dmarc_p_reject(server, key):
    data = sign(key[0], message("news@signed.example.com", "dkim changed"))
    data = data.replace(b"Hello.", b"Hello, changed.")
    code, text = send(server, "bounces@relay.test", data)
    assert code == 550 and text.startswith("5.7.1") and "signed.example.com" in text
    assert "dkim=fail" in server.log_text()


@needs_mail_dkim
def test_a_signature_without_its_key_is_permerror_and_a_broken_one_neutral(server, key):
    data = sign(key[0], message("news@pnone.example.com", "dkim nokey"), selector="gone")
    assert send(server, "bounces@relay.test", data)[0] == 250
    [field] = auth_results(stored(server, "dkim nokey"))
    assert "dkim=permerror" in field and "header.s=gone" in field

    broken = message("news@pnone.example.com", "dkim broken",
                     extra="DKIM-Signature: v=1; a=rsa-sha256; d=pnone.example.com; nonsense\r\n")
    assert send(server, "bounces@relay.test", broken)[0] == 250
    [field] = auth_results(stored(server, "dkim broken"))
    assert "dkim=neutral" in field and "dmarc=fail" in field


# -- DMARC ------------------------------------------------------------------------------


def test_dmarc_p_none_failure_is_delivered(server):
    assert send(server, "x@relay.test", message("boss@pnone.example.com", "p none"))[0] == 250
    [field] = auth_results(stored(server, "p none"))
    assert "dmarc=fail (p=none dis=none) header.from=pnone.example.com" in field


def test_dmarc_p_quarantine_failure_goes_to_junk(server):
    assert send(server, "x@relay.test", message("boss@pquar.example.com", "p quar"))[0] == 250
    msg = stored(server, "p quar", folder="Junk")
    assert "dmarc=fail (p=quarantine dis=quarantine)" in auth_results(msg)[0]
    assert (server.mailbox_path(RCPT) / ".Junk" / "new").is_dir()


def test_dmarc_p_reject_failure_is_refused(server):
    code, text = send(server, "x@relay.test", message("boss@preject.example.com", "p reject"))
    assert code == 550 and text.startswith("5.7.1")
    assert "DMARC policy of preject.example.com" in text
    assert not [m for m in server.maildir(RCPT) if m["Subject"] == "p reject"]


def test_dmarc_pct_0_applies_the_next_weaker_policy(server):
    assert send(server, "x@relay.test", message("boss@pct0.example.com", "pct 0"))[0] == 250
    assert "dis=quarantine" in auth_results(stored(server, "pct 0", folder="Junk"))[0]


def test_dmarc_relaxed_alignment_passes_a_subdomain_strict_does_not(server):
    relaxed = message("boss@relaxed.example.com", "relaxed")
    assert send(server, "x@mail.relaxed.example.com", relaxed)[0] == 250
    assert "dmarc=pass" in auth_results(stored(server, "relaxed"))[0]
    strict = message("boss@strict.example.com", "strict")
    code, _ = send(server, "x@mail.strict.example.com", strict)
    assert code == 550


def test_dmarc_subdomain_policy(server):
    # example.edu: p=none; sp=reject.  Its subdomain without a record of its own gets sp=.
    code, text = send(server, "x@relay.test", message("a@news.example.edu", "sp"))
    assert code == 550 and "news.example.edu" in text
    assert send(server, "x@relay.test", message("a@example.edu", "org p"))[0] == 250
    assert "dmarc=fail (p=none" in auth_results(stored(server, "org p"))[0]


def test_dmarc_record_lookup_failure_is_temperror_and_accepted(server):
    assert send(server, "x@relay.test", message("a@dnsfail.example.com", "dmarc dns"))[0] == 250
    assert "dmarc=temperror" in auth_results(stored(server, "dmarc dns"))[0]


# -- our own domains ------------------------------------------------------------------


def test_our_domain_in_mail_from_needs_our_spf(server):
    code, text = send(server, "ceo@example.org", message("ceo@example.org", "forged env"))
    assert code == 550 and text.startswith("5.7.1") and "example.org" in text
    assert ('check=own_domains reason="forged own domain example.org (MAIL FROM, spf=fail)" '
            "spf=fail dkim=none dmarc=none") in server.log_text()
    # The host our SPF record names may use it (and From: aligns through SPF).
    assert send(server, "ceo@example.org", message("ceo@example.org", "our host"),
                source=OUR_OTHER_HOST)[0] == 250


@pytest.mark.parametrize("domain", ["example.org", "example.net"])
def test_our_domain_in_from_needs_alignment_dmarc_record_or_not(server, domain):
    code, text = send(server, "x@relay.test", message(f"CEO <ceo@{domain}>", f"forged {domain}"))
    assert code == 550 and text.startswith("5.7.1") and domain in text


# -- Authentication-Results: ----------------------------------------------------------


def test_an_incoming_field_claiming_our_authserv_id_is_renamed(server):
    extra = ("Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=x@example.org\r\n"
             "Authentication-Results: other.example; spf=pass\r\n")
    data = message("x@pnone.example.com", "claimed", extra=extra)
    assert send(server, "x@pass.example.com", data)[0] == 250
    msg = stored(server, "claimed")
    fields = auth_results(msg)
    ours = [f for f in fields if f.startswith("mx.example.org")]
    assert len(ours) == 1 and "smtp.mailfrom=x@pass.example.com" in ours[0]
    assert "other.example; spf=pass" in fields
    assert msg["Untrusted-Auth-Results"] == "mx.example.org; spf=pass smtp.mailfrom=x@example.org"


def test_trusted_clients_are_not_checked(server):
    # 127.0.0.1 is in relay.trusted_networks: no checks, no field, our domain is fine.
    assert send(server, "ceo@example.net", message("ceo@example.net", "trusted"),
                source="127.0.0.1")[0] == 250
    assert auth_results(stored(server, "trusted")) == []


def test_junk_folder_is_a_maildir_plus_plus_folder(server):
    # Dovecot's layout: <mailbox>/.Junk with its own cur/new/tmp.
    assert isinstance(server.maildir(RCPT).get_folder("Junk"), mailbox.Maildir)


def test_an_authenticated_user_is_not_checked(tmp_path):
    # The same message that is refused from outside (our domain, no aligned identity) is
    # taken from the logged-in user, and gets no Authentication-Results: field.
    cert, key_file = self_signed(["mx.example.org"], tmp_path)
    dns = DNSServer(tmp_path, {"records": {}})
    mail = MailServer(tmp_path, dns.port, users=[
        f"alice@example.org:{hash_password('secret pw')}", "bob@example.org"],
        aliases=["postmaster: alice@example.org"], overrides={
        "relay": {"trusted_networks": ["127.0.0.1/32"]},
        "smtp": {"auth": True, "reverse_dns": False},
        "tls": {"cert": str(cert), "key": str(key_file)},
    }).start()
    try:
        data = message("Alice <alice@example.org>", "from alice").replace(
            f"To: {RCPT}".encode(), b"To: bob@example.org")
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        with smtplib.SMTP("127.0.0.1", mail.port, local_hostname=CLIENT_NAME, timeout=30,
                          source_address=(OUTSIDE, 0)) as client:
            client.starttls(context=context)
            client.login("alice@example.org", "secret pw")
            client.sendmail("alice@example.org", ["bob@example.org"], data)
        [msg] = list(mail.maildir("bob@example.org"))
        assert msg["Subject"] == "from alice" and auth_results(msg) == []
        with smtplib.SMTP("127.0.0.1", mail.port, local_hostname=CLIENT_NAME, timeout=30,
                          source_address=(OUTSIDE, 0)) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("alice@example.org", ["bob@example.org"], data)
        assert refused.value.smtp_code == 550
    finally:
        mail.stop()
        dns.stop()
