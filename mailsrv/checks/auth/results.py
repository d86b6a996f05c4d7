"""
What the authentication checks found for one message, and the ``Authentication-Results:``
field (RFC 8601) that records it, its syntax from the ``authres`` library.  Pure.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from authres import (
    AuthenticationResultsHeader,
    DKIMAuthenticationResult,
    SPFAuthenticationResult,
)
from authres.arc import ARCAuthenticationResult
from authres.dmarc import DMARCAuthenticationResult

from mailsrv.checks.auth.arccheck import ARCResult
from mailsrv.checks.auth.dkimcheck import DKIMResult
from mailsrv.checks.auth.dmarc import DMARCResult
from mailsrv.checks.auth.spfcheck import SPFResult

__all__ = [
    "FIELD_NAME", "RENAMED_FIELD_NAME", "AuthResults", "authserv_id", "header_field",
    "rename_fields",
]

FIELD_NAME = b"Authentication-Results"
#: What an incoming field claiming our authserv-id is renamed to: as long as the name it
#: replaces, so the spool file is changed in place (RFC 8601 §5: removed or renamed).
RENAMED_FIELD_NAME = b"Untrusted-Auth-Results"
assert len(FIELD_NAME) == len(RENAMED_FIELD_NAME)

_FOLD_AT = 76


@dataclass(frozen=True)
class AuthResults:
    """Every result for one message: SPF (None when not checked), each DKIM signature, and
    DMARC for each From: domain (empty when not checked or no From: domain)."""

    spf: SPFResult | None = None
    dkim: tuple[DKIMResult, ...] = ()
    dmarc: tuple[DMARCResult, ...] = ()
    #: The domains of the From: field's addresses, in order, each once.
    from_domains: tuple[str, ...] = ()
    dkim_checked: bool = False
    dmarc_checked: bool = False
    #: The ARC chain (None when not checked).
    arc: ARCResult | None = None
    #: The From: domains a trusted ARC sealer vouches for: their DMARC failure and the
    #: own-domain From: check are overridden (mailsrv.checks.auth.arccheck).
    arc_vouched: frozenset[str] = frozenset()
    #: A trusted sealer's chain failed on a DNS failure: what it could vouch for is open.
    arc_unsure: bool = False

    def summary(self) -> str:
        """For the log line: ``spf=pass dkim=pass,fail dmarc=pass``."""
        spf = self.spf.result if self.spf is not None else "skipped"
        if not self.dkim_checked:
            dkim = "skipped"
        else:
            dkim = ",".join(r.result for r in self.dkim) or "none"
        if not self.dmarc_checked:
            dmarc = "skipped"
        else:
            dmarc = ",".join(r.result for r in self.dmarc) or "none"
        arc = "" if self.arc is None else f" arc={self.arc.result}"
        if self.arc_vouched:
            arc += f" arc_override={','.join(sorted(self.arc_vouched))}"
        return f"spf={spf} dkim={dkim} dmarc={dmarc}{arc}"


def _clean(text: str) -> str:
    """A comment's text: printable ASCII without parentheses or backslashes."""
    return re.sub(r"[^ -~]|[()\\]", "", text)[:120]


_SAFE_VALUE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+\Z")


def _value(text: str) -> str | None:
    """A property value as RFC 8601 takes it unquoted; an address that is not (a quoted
    local part, odd characters) is given by its domain alone (§2.7.2 allows that)."""
    if _SAFE_VALUE.match(text):
        return text
    domain = text.rpartition("@")[2]
    return domain if _SAFE_VALUE.match(domain) else None


def header_field(hostname: str, results: AuthResults) -> bytes:
    """The ``Authentication-Results:`` field for ``results``, folded, LF-terminated."""
    found: list = []
    spf = results.spf
    if spf is not None:
        if spf.scope == "mailfrom":
            found.append(SPFAuthenticationResult(
                result=spf.result, result_comment=_clean(spf.reason) or None,
                smtp_mailfrom=_value(spf.identity)))
        else:
            found.append(SPFAuthenticationResult(
                result=spf.result, result_comment=_clean(spf.reason) or None,
                smtp_helo=_value(spf.identity)))
    if results.dkim_checked:
        if not results.dkim:
            found.append(DKIMAuthenticationResult(result="none"))
        for sig in results.dkim:
            found.append(DKIMAuthenticationResult(
                result=sig.result, result_comment=_clean(sig.reason) or None,
                header_d=_value(sig.domain), header_i=_value(sig.identity),
                header_s=_value(sig.selector)))
            if _value(sig.b):
                found[-1].properties.append(_property("header", "b", sig.b))
    for dmarc in results.dmarc:
        comment = (f"p={dmarc.policy} dis={dmarc.disposition}"
                   if dmarc.result in ("pass", "fail") else _clean(dmarc.reason))
        if dmarc.result == "fail" and dmarc.from_domain in results.arc_vouched:
            # RFC 8617 §7.2.1, RFC 7489's PolicyOverrideType: the policy was not applied
            comment = f"p={dmarc.policy} dis=none arc=pass override=local_policy"
        found.append(DMARCAuthenticationResult(
            result=dmarc.result, result_comment=comment or None,
            header_from=_value(dmarc.from_domain)))
    arc = results.arc
    if arc is not None:
        found.append(ARCAuthenticationResult(
            result=arc.result, result_comment=_arc_comment(arc) or None,
            header_as_d=_value(arc.sealer) if arc.instance else None,
            header_as_s=_value(arc.selector) if arc.instance else None))
    field = str(AuthenticationResultsHeader(authserv_id=hostname, results=found))
    return _fold(field).encode("ascii", "replace") + b"\n"


def _arc_comment(arc: ARCResult) -> str:
    """The most recent set's instance, and why a chain failed."""
    text = f"i={arc.instance}" if arc.instance else ""
    if arc.result == "fail" and arc.reason:
        text = f"{text} {arc.reason}".strip()
    return _clean(text)


def _property(ptype: str, name: str, value: str):  # noqa: ANN202 - authres has no types
    from authres.core import AuthenticationResultProperty

    return AuthenticationResultProperty(ptype, name, value)


def _fold(field: str) -> str:
    """The one-line field folded before each result (``; ``) and, within a long result,
    before each property, so that lines stay short (RFC 5322 §2.2.3)."""
    lines: list[str] = []
    parts = field.split("; ")
    line = parts[0]
    for part in parts[1:]:
        lines.append(line + ";")
        line = "\t" + part
        if len(line) > _FOLD_AT:
            words, line = line.split(" "), ""
            for word in words:
                if line and len(line) + 1 + len(word) > _FOLD_AT:
                    lines.append(line)
                    line = "\t" + word
                else:
                    line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)


_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def authserv_id(value: bytes) -> str | None:
    """The authserv-id an ``Authentication-Results:`` field value starts with (comments and
    white space skipped, a quoted string unquoted), lower-cased; None when there is none."""
    text = value.decode("utf-8", "replace")
    previous = None
    while previous != text:  # nested comments: strip from the inside out
        previous, text = text, _COMMENT.sub(" ", text)
    text = text.strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1:end].strip().lower() if end > 0 else None
    match = re.match(r"[^\s;]+", text)
    return match.group(0).lower() if match else None


def rename_fields(path: Path, offsets: list[int], old: bytes, new: bytes) -> None:
    """Rename the header fields starting at ``offsets`` of the spool file at ``path`` from
    ``old`` to ``new`` (as long), in place: the spool file is neither copied nor rewritten,
    so this costs one small write per field.  A field whose name is not ``old`` (any case)
    is left alone.  Blocking: in a delivery thread."""
    assert len(old) == len(new)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset in offsets:
            if os.pread(fd, len(old), offset).lower() == old.lower():
                os.pwrite(fd, new, offset)
    finally:
        os.close(fd)
