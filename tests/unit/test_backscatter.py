"""Tests for mailsrv.checks.backscatter: when a forwarded message's failures are not bounced."""

from __future__ import annotations

import pytest

from mailsrv.checks.auth.dmarc import DMARCResult
from mailsrv.checks.auth.results import AuthResults
from mailsrv.checks.auth.spfcheck import SPFResult
from mailsrv.checks.backscatter import forged_sender
from mailsrv.checks.rspamd.protocol import Scan, ScanFailure


def auth(spf: str, dmarc: str, vouched: frozenset[str] = frozenset()) -> AuthResults:
    return AuthResults(
        spf=SPFResult(spf, "mailfrom", "dave@sender.test", "sender.test"),
        dmarc=(DMARCResult(dmarc, "sender.test"),), from_domains=("sender.test",),
        arc_vouched=vouched)


@pytest.mark.parametrize("spf, dmarc, forged", [
    ("fail", "fail", "spf=fail dmarc=fail for sender.test"),
    ("softfail", "fail", "spf=softfail dmarc=fail for sender.test"),
    # Either one alone is no proof: a forwarder's own forwarding breaks SPF, a list's footer DKIM.
    ("fail", "pass", None), ("fail", "none", None), ("pass", "fail", None),
    ("neutral", "fail", None), ("none", "fail", None), ("temperror", "fail", None),
    ("permerror", "fail", None), ("fail", "temperror", None),
])
def test_a_sender_that_failed_spf_and_dmarc_is_taken_as_forged(spf, dmarc, forged) -> None:
    assert forged_sender(auth(spf, dmarc), None) == forged


def test_a_dmarc_failure_a_trusted_arc_sealer_vouches_for_is_no_forgery() -> None:
    assert forged_sender(auth("fail", "fail", frozenset({"sender.test"})), None) is None


@pytest.mark.parametrize("scan, forged", [
    (Scan("add header", 7.0, 6.0), "rspamd add header"),
    (Scan("rewrite subject", 9.0, 8.0), "rspamd rewrite subject"),
    (Scan("no action", 0.5, 15.0), None), (Scan("greylist", 4.5, 15.0), None),
    (ScanFailure("timeout"), None), (None, None),
])
def test_mail_rspamd_judged_spam_is_not_bounced(scan, forged) -> None:
    assert forged_sender(None, scan) == forged
