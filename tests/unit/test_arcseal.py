"""ARC sealing of forwarded mail (mailsrv.checks.signing.ArcSeal, dkimsign.arc_seal): which
messages are sealed, with which key, the set verified by dkimpy (the end-to-end tests verify
it with Perl's Mail::DKIM::ARC::Verifier)."""

from __future__ import annotations

from dataclasses import replace

import dkim
import pytest
from test_dkimsign import keydir  # noqa: F401  (a fixture of a sibling test module)
from zope.interface.verify import verifyObject

from mailsrv.checks.pipeline import Client, Draft
from mailsrv.checks.signing import ArcSeal, should_seal
from mailsrv.interfaces import IModifier
from mailsrv.message import dkimkeys
from mailsrv.message.headsection import HeaderFacts

BODY = (b"From: Dave <dave@sender.test>\nTo: fwd@example.org\nSubject: forwarded\n"
        b"Message-ID: <1@sender.test>\n\nHello.\n")
OUTSIDE = Client("192.0.2.9", "mx.sender.test[192.0.2.9]")
AR = (b"Authentication-Results: mx.example.org;\n\tspf=pass smtp.mailfrom=dave@sender.test;\n"
      b"\tdkim=none;\n\tdmarc=none header.from=sender.test;\n\tarc=none\n")
RECEIVED = b"Received: from mx.sender.test by mx.example.org; Fri, 2 Jan 2026 03:04:05 +0000\n"


def make_draft(tmp_path, body=BODY, **changes) -> Draft:
    spool = tmp_path / "spool"
    spool.write_bytes(body)
    draft = Draft(
        queue_id="Q1", hostname="mx.example.org", sender="dave@sender.test",
        queue_sender="SRS0=abcd=TT=sender.test=dave@example.org", prefix=RECEIVED + AR,
        head=HeaderFacts(True, True, 0, True, (("From", "dave@sender.test"),)),
        client=OUTSIDE, body_path=spool, queued=True,
    )
    return replace(draft, **changes)


def arc_verify(message: bytes, records: dict[str, str]):
    def dnsfunc(name, timeout=5):
        return records[name.decode()].encode() if name.decode() in records else None

    return dkim.arc_verify(message, dnsfunc=dnsfunc)


def test_a_forwarded_message_from_outside_is_sealed_on_its_queued_copy(keydir, tmp_path):  # noqa: F811
    directory, records = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    modifier = ArcSeal(lambda: keys)
    verifyObject(IModifier, modifier)
    draft = make_draft(tmp_path)
    sealed = modifier.modify(draft)
    assert sealed.prefix == draft.prefix  # the local copies are not changed
    assert sealed.queue_prefix.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=example.org;")
    assert b"s=r1;" in sealed.queue_prefix  # the RSA key: ARC allows no Ed25519
    assert b"ARC-Authentication-Results: i=1; mx.example.org;" in sealed.queue_prefix
    ams = [f for f in sealed.queue_prefix.split(b"\nARC-") if f.startswith(b"Message-Sig")][0]
    assert b"h=from : to : subject : message-id : from" in b" ".join(ams.split())
    cv, sets, reason = arc_verify(sealed.queue_prefix + draft.prefix + BODY, records)
    assert cv == dkim.CV_Pass, reason
    assert sets[0]["as-domain"] == b"example.org"


def test_an_existing_chain_is_continued(keydir, tmp_path):  # noqa: F811
    directory, records = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    first = ArcSeal(lambda: keys).modify(make_draft(tmp_path))
    # the next server (mx2, with the same keys) checked the chain and found it passing
    body = first.queue_prefix + first.prefix + BODY
    prefix = RECEIVED + AR.replace(b"arc=none", b"arc=pass").replace(b"mx.", b"mx2.", 1)
    second = ArcSeal(lambda: keys).modify(
        make_draft(tmp_path, body=body, prefix=prefix, hostname="mx2.example.org"))
    assert second.queue_prefix.startswith(b"ARC-Seal: i=2; cv=pass;")
    cv, sets, reason = arc_verify(second.queue_prefix + prefix + body, records)
    assert cv == dkim.CV_Pass and [s["instance"] for s in sets] == [2, 1], reason


@pytest.mark.parametrize("change", [
    {"queued": False},  # local copies only: nothing forwarded
    {"queue_sender": None},  # not rewritten: our own domain's sender
    {"authenticated_as": "alice@example.org"},  # ours: DKIM-signed instead
    {"client": Client("127.0.0.1", "localhost[127.0.0.1]", trusted_network=True)},
    {"client": None},
    {"head": HeaderFacts(False, False, 0)},  # no header section
    {"queue_sender": "SRS0=abcd=TT=sender.test=dave@example.net"},  # no key for the domain
    {"prefix": RECEIVED},  # no Authentication-Results: of ours (checks off): nothing to seal
])
def test_other_messages_are_not_sealed(keydir, tmp_path, change):  # noqa: F811
    directory, _ = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    draft = make_draft(tmp_path, **change)
    assert ArcSeal(lambda: keys).modify(draft).queue_prefix == b""
    assert ArcSeal(lambda: None).modify(make_draft(tmp_path)).queue_prefix == b""


def test_only_rsa_keys_seal(keydir, tmp_path):  # noqa: F811
    directory, _ = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    ed_only = dkimkeys.SigningKeys(tuple(k for k in keys.all() if k.algorithm != "rsa"))
    assert ArcSeal(lambda: ed_only).modify(make_draft(tmp_path)).queue_prefix == b""


def test_a_seal_that_cannot_be_made_forwards_the_message_unsealed(keydir, tmp_path):  # noqa: F811
    directory, _ = keydir
    keys = dkimkeys.load_keys(directory, None, True)
    broken = dkimkeys.SigningKeys(tuple(replace(k, private=b"garbage") for k in keys.all()))
    draft = make_draft(tmp_path)
    assert ArcSeal(lambda: broken).modify(draft) is draft
    # a chain dkimpy will not continue: arc=fail claimed for a message without ARC fields
    odd = make_draft(tmp_path, prefix=RECEIVED + AR.replace(b"arc=none", b"arc=fail"))
    assert ArcSeal(lambda: keys).modify(odd) is odd
    assert should_seal(draft)
