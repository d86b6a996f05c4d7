"""
SPF (RFC 7208) for one message: pyspf evaluates the record, our DNS answers its lookups.

pyspf asks DNS through its module function ``spf.DNSLookup(name, qtype, strict, timeout)``.
That is replaced once, at import, by :func:`_lookup`, which answers through the
:class:`~mailsrv.checks.auth.lookups.ThreadDNS` the calling thread has set for the check (a
thread-local, so concurrent deliveries each use theirs) and fails with ``temperror`` when none
is set: pyspf never reaches the system's resolver, even by mistake.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass
from typing import Any

import spf

from mailsrv.checks.auth.lookups import DNSTempError, ThreadDNS

__all__ = ["SPFResult", "check_spf"]

#: The time all of one check's lookups may take (RFC 7208 §4.6.4: at least 20 seconds).
SPF_TIME_LIMIT = 20.0

_current = threading.local()


def _lookup(name: str, qtype: str, strict: Any = True, timeout: float = 0) -> list:
    """pyspf's DNSLookup: ``[((name, type), value), ...]`` as its dnspython driver returns."""
    resolver: ThreadDNS | None = getattr(_current, "dns", None)
    if resolver is None:
        raise spf.TempError("DNS: no resolver for this thread")
    if qtype not in ("A", "AAAA", "MX", "TXT", "PTR"):
        return []  # type SPF (99) is only asked in pyspf's "harsh" mode, which is not used
    try:
        records = resolver.lookup(name, qtype)
    except DNSTempError as e:
        raise spf.TempError(f"DNS {e}") from None
    return [((r.name, r.type), r.value) for r in records]


spf.DNSLookup = _lookup


@dataclass(frozen=True)
class SPFResult:
    """The SPF result for the identity checked: ``result`` is one of RFC 7208's (``pass``,
    ``fail``, ``softfail``, ``neutral``, ``none``, ``temperror``, ``permerror``); ``scope`` is
    ``mailfrom`` or ``helo``; ``identity`` the address or name checked and ``domain`` its
    domain (what DMARC aligns); ``reason`` pyspf's explanation."""

    result: str
    scope: str
    identity: str
    domain: str
    reason: str = ""


def _helo_domain(helo: str | None) -> str | None:
    """The HELO name when it is a domain name (not an address literal or junk)."""
    if not helo or helo.startswith("[") or "." not in helo:
        return None
    try:
        ipaddress.ip_address(helo)
        return None
    except ValueError:
        return helo.rstrip(".").lower()


def check_spf(dns: ThreadDNS, ip: str, sender: str | None, helo: str | None) -> SPFResult:
    """SPF for the envelope sender, or for ``postmaster@HELO`` when the sender is ``<>``
    (RFC 7208 §2.4).  In a worker thread (the lookups wait for the reactor)."""
    helo_domain = _helo_domain(helo)
    if sender:
        scope, identity, domain = "mailfrom", sender, sender.rpartition("@")[2].lower()
    elif helo_domain is not None:
        scope, identity, domain = "helo", helo_domain, helo_domain
    else:
        return SPFResult("none", "helo", helo or "", "", "no domain to check")
    _current.dns = dns
    try:
        query = spf.query(
            i=ip, s=sender or "", h=helo_domain or (helo or ""), strict=True,
            querytime=SPF_TIME_LIMIT,
        )
        result, _code, explanation = query.check()
    except Exception as e:  # pyspf's own bugs must not lose the message
        result, explanation = "temperror", f"SPF evaluation failed: {e}"
    finally:
        _current.dns = None
    return SPFResult(result, scope, identity, domain, explanation)
