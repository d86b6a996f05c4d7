"""SRS (mailsrv.routing.srs) and where it is used: the srs_address check, the sender_rewriting
modifier, the routing of a bounce to an SRS address, the secret file and its configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsrv import replies
from mailsrv.accounts.files import read_srs_secrets
from mailsrv.checks.builtin import SenderRewriting, SrsAddress
from mailsrv.checks.pipeline import ACCEPT, Client, Draft, Facts, Reject, Stage
from mailsrv.checks.policy import route
from mailsrv.config import ConfigError, parse_config
from mailsrv.message.headsection import inspect_head
from mailsrv.routing.address import parse_rcpt_to
from mailsrv.routing.router import Directory, RemoteTarget
from mailsrv.routing.srs import SRS, SRSError, is_srs_local_part
from mailsrv.startup import srs_domain

DAY = 86400.0
NOW = 1_800_000_000.0  # a fixed day: stamps are days modulo 1024


def srs(now: float = NOW, secrets=(b"a-new-secret-of-some-length",), max_age: int = 21) -> SRS:
    return SRS(list(secrets), "example.org", max_age=max_age, clock=lambda: now)


def local(address: str) -> str:
    return address.rpartition("@")[0]


def test_forward_then_reverse() -> None:
    made = srs().forward("alice@sender.test")
    assert made.startswith("SRS0=") and made.endswith("=sender.test=alice@example.org")
    assert srs().reverse(local(made)) == "alice@sender.test"
    assert is_srs_local_part(local(made))


def test_a_sender_in_the_srs_domain_is_left_alone() -> None:
    assert srs().forward("bob@Example.org") == "bob@Example.org"


def test_a_quoted_local_part_is_not_rewritten() -> None:
    with pytest.raises(SRSError):
        srs().forward('"john doe"@sender.test')


def test_good_for_max_age_days_and_not_one_more() -> None:
    made = local(srs().forward("alice@sender.test"))
    assert srs(NOW + 21 * DAY).reverse(made) == "alice@sender.test"
    with pytest.raises(SRSError, match="expired"):
        srs(NOW + 22 * DAY).reverse(made)
    with pytest.raises(SRSError, match="expired"):
        srs(NOW - DAY).reverse(made)  # made "tomorrow": from the future


def test_a_changed_address_or_hash_is_refused() -> None:
    made = local(srs().forward("alice@sender.test"))
    tag = made.split("=")[1]
    for forged in (made.replace("alice", "mallory"), made.replace("sender.test", "evil.test"),
                   made.replace(tag, "AAAA" if tag != "AAAA" else "BBBB")):
        with pytest.raises(SRSError, match="invalid SRS hash"):
            srs().reverse(forged)


def test_a_lower_cased_address_still_reverses() -> None:
    made = local(srs().forward("Alice@Sender.test"))
    assert srs().reverse(made.lower()).lower() == "alice@sender.test"


def test_an_old_secret_still_verifies_the_new_one_signs() -> None:
    old = srs(secrets=[b"the-old-secret-0123456789"])
    rotated = srs(secrets=[b"the-new-secret-0123456789", b"the-old-secret-0123456789"])
    made_before = local(old.forward("alice@sender.test"))
    assert rotated.reverse(made_before) == "alice@sender.test"
    made_after = local(rotated.forward("alice@sender.test"))
    assert made_after != made_before
    with pytest.raises(SRSError):
        old.reverse(made_after)


def test_an_srs0_address_forwarded_again_becomes_srs1_and_goes_back_to_the_first_hop() -> None:
    first_hop = SRS([b"first-hop-secret-0123456789"], "fwd1.test", clock=lambda: NOW)
    srs0 = first_hop.forward("alice@sender.test")
    srs1 = srs().forward(srs0)
    assert srs1.startswith("SRS1=") and srs1.endswith("@example.org")
    back = srs().reverse(local(srs1))
    assert back == srs0  # to fwd1.test, which reverses its own part
    assert first_hop.reverse(local(back)) == "alice@sender.test"
    # Forwarded a third time: still one SRS1 naming the first hop.
    third = SRS([b"third-hop-secret-01234567"], "fwd3.test", clock=lambda: NOW).forward(srs1)
    assert third.startswith("SRS1=") and "=fwd1.test==" in third


@pytest.mark.parametrize("bad", ["SRS0=abcd", "SRS0=abcd=TT=host", "SRS1=abcd=host", "srs0",
                                 "alice"])
def test_malformed_addresses_are_refused(bad: str) -> None:
    with pytest.raises(SRSError):
        srs().reverse(bad)


def directory(with_srs: bool = True) -> Directory:
    return Directory(["example.org", "example.net"], frozenset({"alice@example.org"}), {},
                     srs=srs() if with_srs else None)


def mailbox(address: str):
    return parse_rcpt_to(f"TO:<{address}>".encode())[0]


def test_a_bounce_to_our_srs_address_routes_to_the_original_sender() -> None:
    made = srs().forward("carol@sender.test")
    assert route(mailbox(made), directory(), may_relay=False) == (
        RemoteTarget("carol@sender.test"),)
    # In another local domain, or with SRS off, it is just an unknown local part.
    other = made.replace("@example.org", "@example.net")
    assert route(mailbox(other), directory(), may_relay=False) is None
    assert route(mailbox(made), directory(with_srs=False), may_relay=False) is None


def rcpt_facts(address: str, d: Directory) -> Facts:
    rcpt = mailbox(address)
    return Facts(Stage.RCPT, Client(ip="192.0.2.1", name="unknown[192.0.2.1]"), d,
                 recipient=rcpt, recipient_is_local=d.is_local_domain(rcpt.domain),
                 targets=route(rcpt, d, may_relay=False))


def test_the_srs_address_check() -> None:
    d = directory()
    made = srs().forward("carol@sender.test")
    assert SrsAddress().check(rcpt_facts(made, d)) is ACCEPT
    assert SrsAddress().check(rcpt_facts("alice@example.org", d)) is ACCEPT
    forged = made.replace("carol", "mallory")
    verdict = SrsAddress().check(rcpt_facts(forged, d))
    assert verdict == Reject(replies.SRS_INVALID.format(reason="invalid SRS hash"))
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    expired = SRS(d.srs.secrets, "example.org", clock=lambda: NOW - 30 * DAY).forward("c@x.test")
    assert "expired" in SrsAddress().check(rcpt_facts(expired, d)).reply.text


def draft(sender: str | None, d: Directory | None) -> Draft:
    return Draft(queue_id="q1", hostname="mx.example.org", sender=sender, prefix=b"",
                 head=inspect_head(b"Subject: x\n\n"), directory=d)


def test_sender_rewriting_gives_the_queued_copy_of_a_foreign_sender_an_srs_sender() -> None:
    modifier = SenderRewriting()
    rewritten = modifier.modify(draft("carol@sender.test", directory()))
    assert rewritten.sender == "carol@sender.test"  # local copies keep it in Return-Path:
    assert srs().reverse(local(rewritten.queue_sender)) == "carol@sender.test"
    for unchanged in (draft("alice@example.org", directory()), draft(None, directory()),
                      draft("carol@sender.test", directory(with_srs=False)),
                      draft('"a b"@sender.test', directory())):
        assert modifier.modify(unchanged).queue_sender is None


def write_secret(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "srs-secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_secret_file(tmp_path: Path) -> None:
    path = write_secret(tmp_path, "# rotated 2026-12\n\nnew-secret-0123456789\nold-secret-0123456789\n")
    assert read_srs_secrets(path) == [b"new-secret-0123456789", b"old-secret-0123456789"]


@pytest.mark.parametrize("text, mode, expected", [
    ("a-long-enough-secret-123\n", 0o604, "others cannot read"),
    ("# only a comment\n\n", 0o600, "at least one secret"),
    ("short-secret-15\n", 0o600, "16 characters or more"),  # 15: one under the minimum
])
def test_a_bad_secret_file_is_refused(tmp_path: Path, text: str, mode: int, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        read_srs_secrets(write_secret(tmp_path, text, mode))


def test_a_missing_secret_file_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="srs.secret_file"):
        read_srs_secrets(tmp_path / "nowhere")


def config(**srs_table):
    return parse_config({"hostname": "mx.example.net",
                         "domains": {"local": ["example.org", "example.net"]},
                         "mailboxes": {"root": "/nonexistent"}, "queue": {"path": "/nonexistent"},
                         "srs": srs_table}, None)


def test_the_srs_domain() -> None:
    assert srs_domain(config()) == "example.net"  # the hostname's domain, local
    assert srs_domain(config(domain="example.org")) == "example.org"
    with pytest.raises(ConfigError, match="srs.domain.*local domains"):
        config(domain="elsewhere.test")
    with pytest.raises(ConfigError, match="srs.max_age"):
        config(max_age=1001)
