"""
ARC verification (RFC 8617) of a message's chain, with dkimpy, and what a trusted sealer's
results vouch for.

dkimpy's ``arc_verify`` gives the chain validation status (``cv``: pass, fail, none; None for
a chain a sealer already declared failed, which is a fail here) and, per ARC set, the sealer
(``d=`` of its ``ARC-Seal``) and its ``ARC-Authentication-Results`` value.  Its key lookups
go through our :class:`~mailsrv.checks.auth.lookups.ThreadDNS`, never its own resolver.
Malformed ARC fields are ``fail`` (a chain is present but unusable), never an exception.

What an intermediary vouches for (RFC 8617 §7.2, as OpenDMARC's and rspamd's "trusted ARC
sealers" do): when the chain validates and its most recent set (highest ``i=``) is sealed by
a domain in ``[checks] arc_trusted_sealers``, the results that sealer recorded when the
message reached it are taken as ours would have been: a From: domain is vouched for when that
``ARC-Authentication-Results`` says ``dmarc=pass`` for it, or ``dkim=pass`` or ``spf=pass``
with an identity aligned with it (relaxed).  Pure, apart from :func:`verify` (DNS through
the caller's ThreadDNS).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import authres
import dkim

from mailsrv.checks.auth.dmarc import aligned
from mailsrv.checks.auth.lookups import DNSTempError, ThreadDNS

__all__ = ["ARCResult", "has_arc", "hop_passes", "verify", "vouched_domains"]

_ARC_FIELD = re.compile(rb"arc-seal[ \t]*:", re.IGNORECASE | re.MULTILINE)
_ANY_ARC_FIELD = re.compile(
    rb"(arc-seal|arc-message-signature|arc-authentication-results)[ \t]*:(.*)", re.I | re.S)
_FIELD_INSTANCE = re.compile(rb"(?:\A|;)\s*i\s*=\s*(\d{1,2})\s*(?:;|\Z)", re.IGNORECASE)
_INSTANCE = re.compile(r"\A\s*i\s*=\s*(\d+)\s*;", re.IGNORECASE)
#: RFC 8617 §4.2.1: at most 50 ARC sets.
MAX_INSTANCE = 50
_quiet = logging.getLogger("mailsrv.arc")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class ARCResult:
    """The chain's result: ``pass``, ``fail`` or ``none`` (the ``cv=`` a seal of ours would
    carry), the most recent set's instance and sealer, and why it did not pass.

    ``passes`` holds what the most recent sealer's ARC-Authentication-Results recorded as
    passing, as ``(method, domain)``: ``("dmarc", from domain)``, ``("dkim", d=)``,
    ``("spf", envelope domain)``.  ``temporary``: a DNS failure made the chain fail."""

    result: str
    instance: int = 0
    sealer: str = ""
    selector: str = ""
    passes: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    temporary: bool = False


def has_arc(head: bytes) -> bool:
    """Whether a header section holds an ``ARC-Seal:`` (else there is nothing to verify)."""
    return any(_ARC_FIELD.match(line) for line in head.split(b"\n"))


def _misnumbered(message: bytes) -> str | None:
    """An ARC field without a usable ``i=`` (1 to 50), which dkimpy would skip over: RFC 8617
    §5.2 makes the chain fail.  What is wrong, or None."""
    end = message.find(b"\n\n")
    head = message if end < 0 else message[:end]
    for field in re.split(rb"\r?\n(?![ \t])", head):
        match = _ANY_ARC_FIELD.match(field)
        if match is None:
            continue
        number = _FIELD_INSTANCE.search(match.group(2))
        if number is None or not 1 <= int(number.group(1)) <= MAX_INSTANCE:
            return f"{match.group(1).decode('ascii')} without a valid i="
    return None


def _domain(text: str) -> str:
    """An identity's domain (an address's part after the last @), lower-case."""
    return text.rpartition("@")[2].strip().rstrip(".").lower()


def hop_passes(aar_value: bytes | str) -> tuple[tuple[str, str], ...]:
    """What an ``ARC-Authentication-Results`` value (``i=N; authserv-id; results``)
    records as passing: ``(method, domain)`` for dmarc (header.from), dkim (header.d, else
    header.i's domain) and spf (smtp.mailfrom's domain, else smtp.helo).  A value that does
    not parse records nothing."""
    text = aar_value.decode("utf-8", "replace") if isinstance(aar_value, bytes) else aar_value
    text = " ".join(text.split())
    match = _INSTANCE.match(text)
    if match is not None:
        text = text[match.end():]
    try:
        header = authres.AuthenticationResultsHeader.parse_value(text)
    except Exception:  # authres raises its own errors and, on odd input, others
        return ()
    found: list[tuple[str, str]] = []
    wanted = {"dmarc": ("header.from",), "dkim": ("header.d", "header.i"),
              "spf": ("smtp.mailfrom", "smtp.helo")}
    for result in header.results:
        method = str(getattr(result, "method", "")).lower()
        if method not in wanted or str(getattr(result, "result", "")).lower() != "pass":
            continue
        props = {f"{p.type}.{p.name}".lower(): str(p.value)
                 for p in getattr(result, "properties", [])}
        for name in wanted[method]:
            if props.get(name):
                found.append((method, _domain(props[name])))
                break
    return tuple(dict.fromkeys(d for d in found if d[1]))


def vouched_domains(
    arc: ARCResult | None, from_domains: tuple[str, ...], trusted: tuple[str, ...],
) -> frozenset[str]:
    """The From: domains a trusted sealer vouches for (see the module's docstring): none
    unless the chain passed and its most recent sealer is one of ``trusted``."""
    if arc is None or arc.result != "pass" or arc.sealer not in trusted:
        return frozenset()
    vouched = set()
    for domain in from_domains:
        for method, identity in arc.passes:
            if (method == "dmarc" and identity == domain) or (
                    method in ("dkim", "spf") and aligned(identity, domain, "r")):
                vouched.add(domain)
                break
    return frozenset(vouched)


def _text(value: object) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")


def verify(message: bytes, dns: ThreadDNS) -> ARCResult:
    """The ARC chain of ``message`` (LF or CRLF line ends).  Blocking (DNS waited for): in
    a delivery thread.  Never raises for what the message holds."""
    temperror: list[str] = []

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = dns.txt(text)
        except DNSTempError as e:
            temperror.append(str(e))
            return None
        keys = [r for r in records if b"p=" in r]
        return (keys or records or [None])[0]

    misnumbered = _misnumbered(message)
    if misnumbered is not None:
        return ARCResult("fail", reason=misnumbered)
    try:
        cv, sets, reason = dkim.arc_verify(message, logger=_quiet, dnsfunc=dnsfunc)
    except Exception as e:  # a dkimpy bug on odd input: a result, not a lost message
        return ARCResult("fail", reason=f"chain not verifiable: {type(e).__name__}")
    latest = sets[0] if sets else {}
    found = dict(
        instance=int(latest.get("instance", 0) or 0),
        sealer=_text(latest.get("as-domain")).lower().rstrip("."),
        selector=_text(latest.get("as-selector")),
    )
    if cv == dkim.CV_None:
        return ARCResult("none", reason=_text(reason))
    if cv == dkim.CV_Pass:
        return ARCResult("pass", passes=hop_passes(latest.get("aar-value", b"")), **found)
    why = f"{_text(reason)}; {temperror[0]}" if temperror else _text(reason)
    return ARCResult("fail", reason=why, temporary=bool(temperror), **found)
