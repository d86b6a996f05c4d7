"""DKIM signing in-process: key files (made, loaded, refused), the signature (verified by
dkimpy's verifier against the record keygen prints), the dkim_sign modifier's rule (who is
signed), bounces, the [dkim] table and ``mailsrv dkim``.  tests/e2e/test_dkim.py has a real
server's signatures verified by Perl's Mail::DKIM."""

from __future__ import annotations

import datetime
import os
import re
import stat
import threading
from dataclasses import replace
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from zope.interface.verify import verifyObject

from mailsrv import replies
from mailsrv.checks.builtin import builtin_pipeline
from mailsrv.checks.pipeline import Client, Draft
from mailsrv.checks.signing import DkimSign
from mailsrv.config import ConfigError, demo_config, parse_config
from mailsrv.interfaces import IModifier
from mailsrv.message import dkimkeys, dkimsign
from mailsrv.message.headsection import HeaderFacts
from mailsrv.outbound.bounce import sign_report
from mailsrv.replies import Refusal
from mailsrv.startup import load_dkim
from mailsrv.tools import cli
from mailsrv.tools.cli_dkim import default_selector

DOMAIN = "example.org"


def make_key(directory: Path, selector: str, algorithm: str, domain: str = DOMAIN) -> str:
    """A key written as keygen writes it; returns its record's text."""
    pem = dkimkeys.generate(algorithm)
    dkimkeys.write_key(directory, domain, selector, pem, None)
    return dkimkeys.txt_value(*dkimkeys.public_key(pem))


@pytest.fixture
def keydir(tmp_path):
    """Keys for example.org: an RSA and an Ed25519 selector; ``records`` for a verifier."""
    directory = tmp_path / "dkim"
    records = {
        f"{s}._domainkey.{DOMAIN}.": make_key(directory, s, a)
        for s, a in (("r1", "rsa"), ("e1", "ed25519"))
    }
    return directory, records


def verify_all(message: bytes, records: dict[str, str]) -> list[bool]:
    """dkimpy's verdict on every signature of ``message`` (CRLF or LF line ends)."""
    def dnsfunc(name, timeout=5):
        return records.get(name.decode()).encode() if name.decode() in records else None

    verifier = dkim.DKIM(message)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    def verdict(idx: int) -> bool:
        try:
            return verifier.verify(idx=idx, dnsfunc=dnsfunc)
        except dkim.DKIMException:  # a body hash mismatch is raised, not returned
            return False

    return [verdict(i) for i in range(count)]


MESSAGE = (
    b"From: Alice <alice@example.org>\nTo: bob@example.net\nSubject: Hello   there\n"
    b"Date: Fri, 02 Jan 2026 03:04:05 +0000\nMessage-ID: <1@example.org>\n\nHi Bob,  \n\n\n"
)


# -- keys ---------------------------------------------------------------------------------


def test_keys_are_written_private_and_loaded_with_their_algorithm(keydir):
    directory, _ = keydir
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(directory / DOMAIN).st_mode) == 0o700
    for name in ("r1.key", "e1.key"):
        path = directory / DOMAIN / name
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    keys = dkimkeys.load_keys(directory, None, required=True)
    assert [(k.selector, k.algorithm) for k in keys.for_domain(DOMAIN)] == [
        ("e1", "ed25519"), ("r1", "rsa")]
    assert keys.for_domain("example.net") == () and len(keys) == 2
    assert "PRIVATE" not in repr(keys.all()) and "e1._domainkey.example.org" in repr(keys.all())
    assert dkimkeys.describe_keys(keys) == "example.org: e1(ed25519) r1(rsa)"
    with pytest.raises(FileExistsError):
        dkimkeys.write_key(directory, DOMAIN, "r1", dkimkeys.generate("rsa"), None)


def test_a_missing_directory_signs_nothing_unless_the_configuration_names_it(tmp_path):
    assert len(dkimkeys.load_keys(tmp_path / "none", None, required=False)) == 0
    with pytest.raises(ConfigError) as e:
        dkimkeys.load_keys(tmp_path / "none", Path("/etc/m.toml"), required=True)
    assert str(e.value).startswith("/etc/m.toml: dkim.keys: an existing directory")


@pytest.mark.parametrize("problem, expected", [
    ("readable", "a key file no other user can read (mode 0600), not mode 0640"),
    ("garbage", "a PEM private key without a passphrase"),
    ("ec", "an RSA or Ed25519 key, not"),
    ("selector", "is not a selector"),
])
def test_a_bad_key_file_is_a_configuration_error_naming_it(keydir, problem, expected):
    directory, _ = keydir
    path = directory / DOMAIN / "r1.key"
    if problem == "readable":
        os.chmod(path, 0o640)
    elif problem == "garbage":
        path.write_bytes(b"not a key\n")
    elif problem == "ec":
        path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    else:
        path = path.rename(directory / DOMAIN / "Bad_Selector.key")
    with pytest.raises(ConfigError) as e:
        dkimkeys.load_keys(directory, Path("m.toml"), required=True)
    assert e.value.key == "dkim.keys"
    assert e.value.expected.startswith(f"{path}: expected ")
    assert expected in e.value.expected


def test_a_domain_directory_must_be_a_normalised_domain_and_other_files_are_ignored(keydir):
    directory, _ = keydir
    (directory / DOMAIN / "r1.key.old").write_text("old key, kept by the admin")
    (directory / DOMAIN / ".e1.key.swp").write_text("editor")
    (directory / "README").write_text("not a domain")
    assert len(dkimkeys.load_keys(directory, None, required=True)) == 2
    (directory / "Example.NET").mkdir()
    with pytest.raises(ConfigError, match="a directory named after a domain, in lower case"):
        dkimkeys.load_keys(directory, None, required=True)


def test_the_record_is_split_into_strings_of_at_most_255_octets():
    pem = dkimkeys.generate("rsa")
    algorithm, public = dkimkeys.public_key(pem)
    record = dkimkeys.txt_record(DOMAIN, "s1", algorithm, public)
    assert record.startswith("s1._domainkey.example.org. IN TXT (\n")
    strings = re.findall(r'"([^"]*)"', record)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == f"v=DKIM1; k=rsa; p={public}"
    ed = dkimkeys.public_key(dkimkeys.generate("ed25519"))
    assert ed[0] == "ed25519" and len(ed[1]) == 44  # 32 octets, base64 (RFC 8463)


def test_selectors():
    assert default_selector("rsa").endswith("-rsa")
    assert default_selector("ed25519", datetime.date(2026, 3, 1)) == "202603-ed25519"
    for good in ("s1", "202601-rsa", "a.b-c"):
        assert dkimkeys.check_selector(good) == good
    for bad in ("", "-a", "a-", "A1", "a_b", "a..b", "a/b", "x" * 64):
        with pytest.raises(ValueError):
            dkimkeys.check_selector(bad)


# -- signatures ---------------------------------------------------------------------------


def test_signed_fields_oversign_from_and_skip_trace_fields():
    names = [b"Received", b"From", b"To", b"Subject", b"X-Mailer", b"Return-Path", b"To"]
    assert dkimsign.signed_fields(names) == [b"from", b"to", b"subject", b"to", b"from"]


def test_from_domain_needs_exactly_one_from_address():
    assert dkimsign.from_domain([("From", "a@Example.ORG")]) == "example.org"
    assert dkimsign.from_domain([("Sender", "s@x.org"), ("From", "a@b.org")]) == "b.org"
    assert dkimsign.from_domain([]) is None
    assert dkimsign.from_domain([("From", "a@b.org"), ("From", "c@b.org")]) is None
    assert dkimsign.from_domain([("Sender", "a@b.org")]) is None
    assert dkimsign.from_domain([("From", "a@bücher.example")]) == "xn--bcher-kva.example"
    assert dkimsign.from_domain([("From", "a@[192.0.2.1]")]) is None


def test_every_key_signs_relaxed_relaxed_and_dkimpy_verifies(keydir):
    directory, records = keydir
    keys = dkimkeys.load_keys(directory, None, True).for_domain(DOMAIN)
    fields = dkimsign.sign(MESSAGE, keys)
    assert fields.count(b"DKIM-Signature:") == 2 and b"\r" not in fields
    assert b"a=ed25519-sha256;" in fields and b"a=rsa-sha256;" in fields
    assert fields.count(b"c=relaxed/relaxed;") == 2
    h = re.search(rb"h=([^;]*);", fields).group(1)
    assert re.sub(rb"\s", b"", h) == b"from:to:subject:date:message-id:from"
    signed = fields + MESSAGE
    assert verify_all(signed, records) == [True, True]
    # Relaxed: refolded headers and changed white space in the body still verify (as after
    # a hop that rewrites them), and CRLF line ends too (as on the wire)...
    refolded = signed.replace(b"Subject: Hello   there", b"Subject:  Hello\n\tthere")
    refolded = refolded.replace(b"Hi Bob,  \n", b"Hi  Bob,\n")
    assert verify_all(refolded.replace(b"\n", b"\r\n"), records) == [True, True]
    # ...but a changed word, or a second From:, does not.
    assert verify_all(signed.replace(b"Hi Bob", b"Hi Eve"), records) == [False, False]
    forged = signed.replace(b"To: bob", b"From: ceo@example.org\nTo: bob")
    assert verify_all(forged, records) == [False, False]


# -- the modifier -------------------------------------------------------------------------


def make_draft(tmp_path, body=MESSAGE, **changes) -> Draft:
    tmp_path.mkdir(exist_ok=True)
    spool = tmp_path / "spool"
    spool.write_bytes(body)
    draft = Draft(
        queue_id="Q1", hostname="mx.example.org", sender="alice@example.org",
        prefix=b"Received: from x by mx.example.org; Fri, 2 Jan 2026 03:04:05 +0000\n",
        head=HeaderFacts(True, True, 0, True, (("From", "alice@example.org"),)),
        authenticated_as="alice@example.org", client=Client("192.0.2.1", "x[192.0.2.1]"),
        body_path=spool,
    )
    return replace(draft, **changes)


def test_the_modifier_signs_an_authenticated_users_message(keydir, tmp_path):
    directory, records = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    modifier = DkimSign(lambda: keys)
    verifyObject(IModifier, modifier)
    draft = make_draft(tmp_path)
    signed = modifier.modify(draft)
    assert signed.dkim == ("example.org/e1", "example.org/r1")
    assert signed.prefix.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;")
    assert signed.prefix.endswith(draft.prefix)
    assert verify_all(signed.prefix + MESSAGE, records) == [True, True]


def test_the_modifier_signs_a_trusted_networks_message(keydir, tmp_path):
    directory, _ = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    local = Client("127.0.0.1", "localhost[127.0.0.1]", trusted_network=True)
    draft = make_draft(tmp_path, authenticated_as=None, client=local)
    assert DkimSign(lambda: keys).modify(draft).dkim == ("example.org/e1", "example.org/r1")


@pytest.mark.parametrize("change", [
    {"authenticated_as": None},  # a server on the Internet: its mail is its to sign
    {"head": HeaderFacts(True, True, 0, True, (("From", "alice@example.net"),))},  # no key
    {"head": HeaderFacts(True, True, 0, True, (("From", "a@example.org"), ("From", "b@example.org")))},
    {"head": HeaderFacts(True, True, 0, True, ())},  # no From:
    {"head": HeaderFacts(False, False, 0)},  # no header section
])
def test_the_modifier_leaves_other_messages_unsigned(keydir, tmp_path, change):
    directory, _ = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    draft = make_draft(tmp_path, **change)
    assert DkimSign(lambda: keys).modify(draft) is draft
    assert DkimSign(lambda: None).modify(make_draft(tmp_path)).dkim == ()


def test_a_signature_that_cannot_be_made_is_a_temporary_refusal(keydir, tmp_path):
    directory, _ = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    broken = dkimkeys.SigningKeys(tuple(replace(k, private=b"garbage") for k in keys.all()))
    with pytest.raises(Refusal) as e:
        DkimSign(lambda: broken).modify(make_draft(tmp_path))
    assert e.value.reply == replies.LOCAL_ERROR  # 451 4.3.0: the client keeps the message
    draft = make_draft(tmp_path)
    draft.body_path.unlink()
    with pytest.raises(Refusal):
        DkimSign(lambda: keys).modify(draft)


def test_the_builtin_pipeline_signs_and_seals_last(keydir):
    config = parse_config({"domains": {"local": [DOMAIN]}, "mailboxes": {"root": "/x"},
                           "queue": {"path": "/x"}}, None)
    pipeline = builtin_pipeline(config, dkim=lambda: None)
    assert [m.name for m in pipeline.modifiers] == [
        "missing_fields", "sender_rewriting", "dkim_sign", "arc_seal"]


def test_reports_are_signed_with_the_hosts_keys_or_its_parent_domains(keydir):
    directory, records = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    trace = b"Received: by mx.example.org; Fri, 2 Jan 2026 03:04:05 +0000\n"
    data = b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\nTo: a@example.org\n\nx\n"
    signed = sign_report(keys, "mx.example.org", "Q2", trace, data)
    assert signed.endswith(trace) and signed.count(b"DKIM-Signature:") == 2
    assert b"d=example.org;" in signed
    assert verify_all(signed + data, records) == [True, True]
    assert sign_report(keys, "mx.example.net", "Q2", trace, data) == trace
    broken = dkimkeys.SigningKeys(tuple(replace(k, private=b"x") for k in keys.all()))
    assert sign_report(broken, "mx.example.org", "Q2", trace, data) == trace  # never lost


# -- configuration and the command ---------------------------------------------------------


def base(tmp_path, **dkim_table):
    data = {"hostname": "mx.example.org", "domains": {"local": [DOMAIN]},
            "mailboxes": {"root": str(tmp_path / "mail")}, "queue": {"path": str(tmp_path / "q")}}
    if dkim_table:
        data["dkim"] = dkim_table
    return data


def test_the_dkim_table(tmp_path, keydir):
    directory, _ = keydir
    assert parse_config(base(tmp_path), None).dkim.directory == Path("/etc/mailsrv/dkim")
    config = parse_config(base(tmp_path, keys="dkim"), tmp_path / "m.toml")
    assert config.dkim.directory == directory
    assert len(load_dkim(config)) == 2
    with pytest.raises(ConfigError, match="dkim.nokeys: unknown key"):
        parse_config(base(tmp_path, nokeys="x"), None)
    missing = parse_config(base(tmp_path, keys=str(tmp_path / "none")), tmp_path / "m.toml")
    with pytest.raises(ConfigError, match="dkim.keys: an existing directory"):
        load_dkim(missing)
    assert load_dkim(demo_config(tmp_path)) is None  # the demo never signs


def write_config(tmp_path) -> Path:
    (tmp_path / "q").mkdir(exist_ok=True)
    path = tmp_path / "m.toml"
    path.write_text(
        'hostname = "mx.example.org"\n[domains]\nlocal = ["example.org"]\n'
        f'[mailboxes]\nroot = "{tmp_path}/mail"\n[queue]\npath = "{tmp_path}/q"\n'
        f'[dkim]\nkeys = "{tmp_path}/dkim"\n')
    return path


def test_keygen_prints_the_record_and_never_replaces_a_key(tmp_path, capsys):
    config = write_config(tmp_path)
    assert cli.main(["dkim", "keygen", "Example.ORG", "--selector", "s1", "--config",
                     str(config)]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "dkim" / DOMAIN / "s1.key"
    assert f"written to {path}" in out
    record = out[out.index("s1._domainkey.example.org. IN TXT ("):]
    value = "".join(re.findall(r'"([^"]*)"', record))
    assert value == dkimkeys.txt_value(*dkimkeys.public_key(path.read_bytes()))
    assert value.startswith("v=DKIM1; k=rsa; p=")
    before = path.read_bytes()
    assert cli.main(["dkim", "keygen", DOMAIN, "--selector", "s1", "--config",
                     str(config)]) == 1
    assert "exists" in capsys.readouterr().err and path.read_bytes() == before
    assert cli.main(["dkim", "keygen", DOMAIN, "--algorithm", "ed25519", "--config",
                     str(config)]) == 0
    assert "k=ed25519; p=" in capsys.readouterr().out
    assert cli.main(["dkim", "list", "--records", "--config", str(config)]) == 0
    listed = capsys.readouterr().out
    assert f"example.org\ts1\trsa\t{path}" in listed
    assert f"example.org\t{default_selector('ed25519')}\ted25519" in listed
    assert listed.count("IN TXT (") == 2
    assert cli.main(["dkim", "keygen", DOMAIN, "--selector", "Bad_One", "--config",
                     str(config)]) == 1
    assert "is not a selector" in capsys.readouterr().err
    assert cli.main(["check-config", "--config", str(config)]) == 0
    assert "dkim: example.org: " in capsys.readouterr().out
    os.chmod(path, 0o644)
    assert cli.main(["check-config", "--config", str(config)]) == 2
    assert f"dkim.keys: {path}: expected a key file no other user" in capsys.readouterr().err


@pytest.mark.parametrize("large, most", [(0, 1), (1 << 30, 4)])
def test_large_messages_are_signed_one_at_a_time(keydir, tmp_path, monkeypatch, large, most):
    directory, _ = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    modifier = DkimSign(lambda: keys)
    modifier.LARGE = large
    running, peak, lock = [0], [0], threading.Lock()
    barrier = threading.Barrier(4, timeout=0.5)

    def slow_sign(message, signing_keys):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            barrier.wait()  # all four meet here unless serialised
        except threading.BrokenBarrierError:
            pass
        with lock:
            running[0] -= 1
        return b"DKIM-Signature: x\n"

    monkeypatch.setattr(dkimsign, "sign", slow_sign)
    drafts = [make_draft(tmp_path / str(i)) for i in range(4)]
    threads = [threading.Thread(target=modifier.modify, args=(d,)) for d in drafts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] == most


def test_rsa_signatures_are_openssls_and_the_same_as_dkimpys(keydir):
    # dkimpy's own RSA (Python integers, 7.5 ms) is replaced by OpenSSL's; PKCS#1 v1.5 is
    # deterministic, so both must give the very same octets.
    import hashlib

    from dkim.crypto import RSASSA_PKCS1_v1_5_sign, parse_pem_private_key

    assert dkim.RSASSA_PKCS1_v1_5_sign is dkimsign.openssl_rsa_sign
    directory, _ = keydir
    [key] = [k for k in dkimkeys.load_keys(directory, None, True).all() if k.algorithm == "rsa"]
    parsed = parse_pem_private_key(key.private)
    for text in (b"", b"a message", b"x" * 10000):
        digest = hashlib.sha256(text)
        assert dkimsign.openssl_rsa_sign(digest, parsed) == bytes(
            RSASSA_PKCS1_v1_5_sign(digest, parsed))


def test_the_private_key_is_parsed_once_for_many_messages(keydir):
    # dkimpy parses the PEM key for every signature; mailsrv keeps the parsed key.
    directory, _ = keydir
    keys = [k for k in dkimkeys.load_keys(directory, None, True).all() if k.algorithm == "rsa"]
    before = dkim.parse_pem_private_key.cache_info()
    for n in range(3):
        dkimsign.sign(f"From: a@example.org\nSubject: {n}\n\nbody\n".encode(), keys)
    after = dkim.parse_pem_private_key.cache_info()
    assert after.hits - before.hits >= 2 and after.misses - before.misses <= 1
