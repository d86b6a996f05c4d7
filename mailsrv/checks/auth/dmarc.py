"""
DMARC (RFC 7489): the policy record, the organizational domain, identifier alignment and what
to do with a message that fails.  Pure: the one lookup is a function the caller gives.

The organizational domain comes from the Public Suffix List as Debian ships it (the package
``publicsuffix``, kept current by the distribution), read by ``publicsuffix2``; where that
file is missing (a pip install elsewhere) the list ``publicsuffix2`` bundles is used.  A name
under a suffix the list does not know falls under the list's default rule ``*`` (the PSL
algorithm: the suffix is the last label), which ``publicsuffix2`` leaves out.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from publicsuffix2 import PublicSuffixList

from mailsrv.checks.auth.dkimcheck import DKIMResult
from mailsrv.checks.auth.lookups import DNSTempError
from mailsrv.checks.auth.spfcheck import SPFResult

__all__ = [
    "DEBIAN_PSL", "DMARCRecord", "DMARCResult", "PolicyFound", "aligned", "evaluate",
    "find_policy", "org_domain", "parse_record",
]

DEBIAN_PSL = "/usr/share/publicsuffix/public_suffix_list.dat"

_POLICIES = ("none", "quarantine", "reject")
_DMARC1 = re.compile(r"v[ \t]*=[ \t]*DMARC1[ \t]*(;|\Z)")
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@functools.lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList(DEBIAN_PSL if os.path.exists(DEBIAN_PSL) else None)


@functools.lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """The organizational domain of ``domain`` (RFC 7489 §3.2): its registrable domain."""
    domain = domain.rstrip(".").lower()
    found = _psl().get_sld(domain, strict=True)
    if found:
        return found
    return ".".join(domain.split(".")[-2:])  # no rule matched: the default rule "*"


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Whether an authenticated domain aligns with the From: domain: the same name (strict,
    ``s``) or the same organizational domain (relaxed, ``r``)."""
    a, b = identifier.rstrip(".").lower(), from_domain.rstrip(".").lower()
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


@dataclass(frozen=True)
class DMARCRecord:
    """The tags of a policy record that decide a message's fate (reports are not sent)."""

    p: str
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


def is_dmarc(text: str) -> bool:
    """Whether a TXT string is a DMARC record: ``v=DMARC1`` first (RFC 7489 §6.6.3)."""
    return _DMARC1.match(text) is not None


def parse_record(text: str) -> DMARCRecord | None:
    """The record in a TXT string that starts with ``v=DMARC1``; None when it must be
    ignored (no valid ``p=`` and no ``rua=``, RFC 7489 §6.6.3 step 6).  Unknown tags are
    ignored; an invalid ``adkim``, ``aspf`` or ``pct`` keeps its default."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() or None
    if p not in _POLICIES or (sp is not None and sp not in _POLICIES):
        if "rua" not in tags:
            return None
        p, sp = "none", None
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    return DMARCRecord(
        p=p, sp=sp, adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r", pct=pct,
    )


@dataclass(frozen=True)
class PolicyFound:
    """The policy for ``from_domain``: ``record`` (None: none published, or ``error`` when
    DNS failed) found at ``policy_domain``, with the From: domain's ``org_domain``."""

    from_domain: str
    org_domain: str
    record: DMARCRecord | None = None
    policy_domain: str | None = None
    error: str | None = None

    @property
    def policy(self) -> str:
        """``p=`` for the domain that published it, ``sp=`` (else ``p=``) for a domain
        below the organizational domain whose record applies (RFC 7489 §6.3)."""
        assert self.record is not None
        if self.policy_domain == self.from_domain or self.record.sp is None:
            return self.record.p
        return self.record.sp


def _record_at(domain: str, txt: Callable[[str], list[bytes]]) -> DMARCRecord | None:
    texts = [t.decode("ascii", "replace") for t in txt(f"_dmarc.{domain}")]
    found = [t for t in texts if is_dmarc(t)]
    if len(found) != 1:
        return None  # none, or more than one: no policy (§6.6.3 step 5)
    return parse_record(found[0])


def find_policy(from_domain: str, txt: Callable[[str], list[bytes]]) -> PolicyFound:
    """The DMARC record for ``from_domain``: its own, else its organizational domain's
    (RFC 7489 §6.6.3).  ``txt`` is a TXT lookup raising DNSTempError."""
    from_domain = from_domain.rstrip(".").lower()
    org = org_domain(from_domain)
    try:
        for domain in dict.fromkeys((from_domain, org)):
            record = _record_at(domain, txt)
            if record is not None:
                return PolicyFound(from_domain, org, record, domain)
    except DNSTempError as e:
        return PolicyFound(from_domain, org, error=str(e))
    return PolicyFound(from_domain, org)


@dataclass(frozen=True)
class DMARCResult:
    """DMARC's result for one From: domain: ``result`` (``pass``, ``fail``, ``none``,
    ``temperror``), the ``policy`` published for it and the ``disposition`` to apply after
    ``pct=`` (``none``, ``quarantine``, ``reject``); ``unsure`` when it failed while an
    aligned SPF or DKIM check had a temporary DNS error (it might have passed)."""

    result: str
    from_domain: str
    policy: str = "none"
    disposition: str = "none"
    policy_domain: str | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False
    unsure: bool = False
    reason: str = ""


def spf_aligned(spf: SPFResult | None, from_domain: str, mode: str) -> bool:
    return spf is not None and spf.result == "pass" and aligned(spf.domain, from_domain, mode)


def dkim_aligned(dkim: Iterable[DKIMResult], from_domain: str, mode: str) -> bool:
    return any(r.result == "pass" and aligned(r.domain, from_domain, mode) for r in dkim)


def evaluate(
    from_domain: str, found: PolicyFound, spf: SPFResult | None, dkim: tuple[DKIMResult, ...],
    sample: float,
) -> DMARCResult:
    """The result for ``from_domain`` given its policy and the SPF and DKIM results.
    ``sample`` is a number in [0, 100): the message is subject to the policy when it is below
    ``pct=`` (RFC 7489 §6.6.4), else to the next weaker one."""
    if found.error is not None:
        return DMARCResult("temperror", from_domain, reason=found.error)
    if found.record is None:
        return DMARCResult("none", from_domain, reason="no DMARC record")
    record = found.record
    by_spf = spf_aligned(spf, from_domain, record.aspf)
    by_dkim = dkim_aligned(dkim, from_domain, record.adkim)
    policy = found.policy
    if by_spf or by_dkim:
        return DMARCResult("pass", from_domain, policy, "none", found.policy_domain,
                           by_spf, by_dkim)
    unsure = (spf is not None and spf.result == "temperror"
              and aligned(spf.domain, from_domain, record.aspf)) or any(
        r.result == "temperror" and aligned(r.domain, from_domain, record.adkim) for r in dkim)
    disposition = policy if sample < record.pct else _WEAKER[policy]
    return DMARCResult(
        "fail", from_domain, policy, disposition, found.policy_domain, unsure=unsure,
        reason="neither SPF nor DKIM aligned with the From: domain",
    )
