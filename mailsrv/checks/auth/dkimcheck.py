"""
DKIM verification (RFC 6376) of every signature of a message, with dkimpy.

dkimpy verifies one signature per call (``DKIM(message).verify(idx=i, dnsfunc=...)``) and
says only True or False; the reason is read from what our ``dnsfunc`` saw (a DNS failure is
``temperror``, a missing key ``permerror``) and from the exceptions it raises (a signature
that does not parse is ``neutral``, RFC 8601 §2.7.1).  Its lookups go through our
:class:`~mailsrv.checks.auth.lookups.ThreadDNS`, never its own resolver.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import dkim

from mailsrv.checks.auth.lookups import DNSTempError, ThreadDNS

__all__ = ["DKIMResult", "MAX_SIGNATURES", "signature_count", "verify_all"]

#: Signatures verified per message; later ones are reported as ``policy`` (not checked).
MAX_SIGNATURES = 8

_SIGNATURE = re.compile(rb"dkim-signature[ \t]*:", re.IGNORECASE)
_quiet = logging.getLogger("mailsrv.dkim")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class DKIMResult:
    """One signature's result (``pass``, ``fail``, ``neutral``, ``temperror``,
    ``permerror``, ``policy``) with its ``d=``, ``s=``, ``i=``, the first 8 characters of its
    ``b=`` (RFC 6008, to tell signatures apart) and why it did not pass."""

    result: str
    domain: str = ""
    selector: str = ""
    identity: str = ""
    b: str = ""
    reason: str = ""


def _tag(fields: dict, name: bytes) -> str:
    value = fields.get(name, b"")
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _fields(verifier: dkim.DKIM | None) -> dict[str, str]:
    """The signature's d=, s=, i= and b= (what dkimpy read of it; empty when nothing)."""
    fields = getattr(verifier, "signature_fields", None) or {}
    return dict(
        domain=_tag(fields, b"d").lower(), selector=_tag(fields, b"s"),
        identity=_tag(fields, b"i"), b=re.sub(r"\s", "", _tag(fields, b"b"))[:8],
    )


def signature_count(head: bytes) -> int:
    """The DKIM-Signature: fields in a header section."""
    return sum(1 for line in head.split(b"\n") if _SIGNATURE.match(line))


def _verify_one(message: bytes, index: int, dns: ThreadDNS) -> DKIMResult:
    seen: dict[str, str] = {}

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = dns.txt(text)
        except DNSTempError as e:
            seen["temperror"] = str(e)
            return None
        if not records:
            seen["nokey"] = f"no key record at {text.rstrip('.')}"
            return None
        seen["key"] = text
        keys = [r for r in records if b"p=" in r]
        return (keys or records)[0]

    verifier = None
    try:
        verifier = dkim.DKIM(message, logger=_quiet)
        passed = verifier.verify(idx=index, dnsfunc=dnsfunc)
        failure = None
    except dkim.ValidationError as e:
        passed, failure = False, "body hash mismatch"
        if not str(e).startswith(failure):
            return DKIMResult("neutral", reason=f"signature not usable: {e}",
                              **_fields(verifier))
    except (dkim.MessageFormatError, dkim.ParameterError) as e:
        return DKIMResult("neutral", reason=f"signature not usable: {e}", **_fields(verifier))
    except dkim.DKIMException as e:  # the key record (too small, unknown type, ...)
        return DKIMResult("permerror", reason=str(e), **_fields(verifier))
    except Exception as e:  # a dkimpy bug on odd input: a result, not a lost message
        return DKIMResult("neutral", reason=f"signature not verifiable: {type(e).__name__}")
    found = _fields(verifier)
    if passed:
        return DKIMResult("pass", **found)
    if "temperror" in seen:
        return DKIMResult("temperror", reason=seen["temperror"], **found)
    if "nokey" in seen:
        return DKIMResult("permerror", reason=seen["nokey"], **found)
    if "key" in seen and getattr(verifier, "pk", None) is None:
        return DKIMResult("permerror", reason="key record not usable", **found)
    return DKIMResult("fail", reason=failure or "signature did not verify", **found)


def verify_all(message: bytes, head: bytes, dns: ThreadDNS) -> tuple[DKIMResult, ...]:
    """Every DKIM-Signature of ``message`` (its header section is ``head``), in order.
    In a worker thread."""
    count = signature_count(head)
    results = [_verify_one(message, i, dns) for i in range(min(count, MAX_SIGNATURES))]
    results += [DKIMResult("policy", reason="too many signatures")] * max(0, count - MAX_SIGNATURES)
    return tuple(results)
