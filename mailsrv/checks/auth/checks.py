"""
The pipeline checks that act on the authentication results (mailsrv.checks.auth.results),
all at the MESSAGE stage, all pure: the results are a fact (``Facts.auth``) computed before
the stage, in the delivery thread; a message whose client is not checked has none, and these
checks accept it.

- ``own_domains`` (issue 13 item 3): an envelope sender in one of our domains needs our SPF
  record's ``pass``; a From: address in one of our domains needs an SPF- or DKIM-aligned
  identity (relaxed alignment), DMARC record or not (550 5.7.1; 451 4.7.1 when a DNS failure
  left it open);
- ``dmarc_policy``: a DMARC failure gets the policy's disposition: ``reject`` (after
  ``pct=``) is refused (550 5.7.1, with ``[checks] dmarc_reject``; otherwise, and for
  ``quarantine``, the copies go to the Junk folder); 451 4.7.1 when a DNS failure left it open;
- ``authentication_results``: the ``Authentication-Results:`` field (RFC 8601).

A From: domain a trusted ARC sealer vouches for (``AuthResults.arc_vouched``, see
mailsrv.checks.auth.arccheck) passes both From: checks: RFC 8617 §7.2's local policy
override, as OpenDMARC and rspamd apply it for a mailing list that changed the message.  The
envelope check is not overridden (a list sends from its own envelope domain).  When a DNS
failure left a trusted sealer's chain open (``arc_unsure``), a refusal is 451 4.7.1 instead.
"""

from __future__ import annotations

from zope.interface import implementer

from mailsrv import replies
from mailsrv.checks.auth.dmarc import aligned, dkim_aligned, spf_aligned
from mailsrv.checks.auth.results import AuthResults, header_field
from mailsrv.checks.pipeline import (
    ACCEPT,
    AddHeaders,
    Facts,
    FileInto,
    Reject,
    Stage,
    TempFail,
    Verdict,
)
from mailsrv.config import Config
from mailsrv.interfaces import ICheck

__all__ = ["JUNK_FOLDER", "AuthenticationResults", "DmarcPolicy", "OwnDomains", "auth_checks"]

#: The Maildir++ folder quarantined mail goes to (Dovecot shows ``.Junk`` as Junk).
JUNK_FOLDER = "Junk"


@implementer(ICheck)
class AuthenticationResults:
    """Adds the ``Authentication-Results:`` field naming ``hostname`` (the authserv-id)."""

    name = "authentication_results"
    stage = Stage.MESSAGE

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def check(self, facts: Facts) -> Verdict:
        if facts.auth is None:
            return ACCEPT
        return AddHeaders((header_field(self.hostname, facts.auth),))


def _temporary(auth: AuthResults, domain: str) -> bool:
    """Whether a DNS failure of the SPF or of a DKIM check for ``domain`` left it open."""
    spf = auth.spf
    spf_temp = spf is not None and spf.result == "temperror" and aligned(spf.domain, domain, "r")
    return spf_temp or any(r.result == "temperror" and aligned(r.domain, domain, "r")
                           for r in auth.dkim)


@implementer(ICheck)
class OwnDomains:
    """Our own domains cannot be forged from outside, by the envelope or by From:."""

    name = "own_domains"
    stage = Stage.MESSAGE

    def check(self, facts: Facts) -> Verdict:
        auth = facts.auth
        if auth is None:
            return ACCEPT
        directory = facts.directory
        sender = facts.sender
        if sender is not None and auth.spf is not None and directory.is_local_domain(
                sender.domain):
            if auth.spf.result == "temperror":
                return TempFail(replies.AUTH_DNS_TEMPORARY.format(domain=sender.domain),
                                reason=f"own domain {sender.domain}: spf=temperror")
            if auth.spf.result != "pass":
                return Reject(replies.LOCAL_SENDER_FORGED.format(
                    sender=str(sender), domain=sender.domain, ip=facts.client.ip,
                    result=auth.spf.result), reason=f"forged own domain {sender.domain} "
                    f"(MAIL FROM, spf={auth.spf.result})")
        for domain in auth.from_domains:
            if not directory.is_local_domain(domain):
                continue
            if spf_aligned(auth.spf, domain, "r") or dkim_aligned(auth.dkim, domain, "r"):
                continue
            if domain in auth.arc_vouched:
                continue
            if _temporary(auth, domain) or auth.arc_unsure:
                return TempFail(replies.AUTH_DNS_TEMPORARY.format(domain=domain),
                                reason=f"own domain {domain} in From: unverified (temperror)")
            return Reject(replies.LOCAL_FROM_FORGED.format(domain=domain),
                          reason=f"forged own domain {domain} (From:, {auth.summary()})")
        return ACCEPT


@implementer(ICheck)
class DmarcPolicy:
    """What a DMARC failure's policy asks: refuse (``reject``, when ``dmarc_reject``) or the
    Junk folder (``quarantine``, and ``reject`` without ``dmarc_reject``)."""

    name = "dmarc_policy"
    stage = Stage.MESSAGE

    def __init__(self, dmarc_reject: bool = True) -> None:
        self.dmarc_reject = dmarc_reject

    def check(self, facts: Facts) -> Verdict:
        auth = facts.auth
        if auth is None:
            return ACCEPT
        junk = False
        for result in auth.dmarc:
            if result.result != "fail" or result.disposition == "none":
                continue
            if result.from_domain in auth.arc_vouched:
                continue
            if result.disposition == "reject" and self.dmarc_reject:
                if result.unsure or auth.arc_unsure:
                    return TempFail(
                        replies.AUTH_DNS_TEMPORARY.format(domain=result.from_domain),
                        reason=f"dmarc=fail p=reject for {result.from_domain} with a temperror")
                return Reject(
                    replies.DMARC_REJECTED.format(domain=result.from_domain, reason=result.reason),
                    reason=f"dmarc=fail p=reject for {result.from_domain} ({auth.summary()})")
            junk = True
        return FileInto(JUNK_FOLDER) if junk else ACCEPT


def auth_checks(config: Config) -> list[ICheck]:
    """The checks ``[checks]`` turns on, in their order: a refusal first (no field is added
    to a refused message), the field last."""
    checks = config.checks
    if not checks.enabled:
        return []
    found: list[ICheck] = []
    if checks.protect_local_domains:
        found.append(OwnDomains())
    if checks.dmarc:
        found.append(DmarcPolicy(checks.dmarc_reject))
    found.append(AuthenticationResults(config.hostname))
    return found
