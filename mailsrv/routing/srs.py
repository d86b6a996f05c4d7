"""
The Sender Rewriting Scheme: the envelope sender of mail we forward, rewritten under our
domain, and the bounces that come back to it reversed (pure; the clock is given).

A message an alias forwards off-site keeps its original envelope sender otherwise, and the
receiver's SPF check of that sender's domain fails (we are not its server).  SRS gives the
queued copy a sender in our domain that only we can reverse: an HMAC-SHA1 of the original
address and a day stamp, truncated, as Shevek's scheme and its implementations (libsrs2,
postsrsd, Debian's python3-srs) write it, so addresses are interchangeable with theirs::

    SRS0=HHHH=TT=example.com=alice@forwarder.example      (first hop)
    SRS1=HHHH=fwd1.example==HHHH=TT=example.com=alice@us  (an SRS0 address forwarded again)

The HMAC is the standard library's; this module is the address grammar only.  Why not the
library: python3-srs is Debian's, but the only release on PyPI (pysrs 1.0.3) fails on every
Python since 3.9 (``base64.encodestring``), so a pip installation could not use it;
tests/e2e/test_srs.py checks both directions against Debian's implementation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence

__all__ = ["SRS", "SRSError", "is_srs_local_part"]

#: Days a rewritten address stays valid (bounces come back within days; libsrs2's default).
DEFAULT_MAX_AGE = 21
_HASH_LENGTH = 4
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_DAY = 86400
_SLOTS = len(_BASE32) ** 2  # a two-character stamp: the day modulo 1024
_SRS0 = re.compile(r"^SRS0[-+=]", re.IGNORECASE)
_SRS1 = re.compile(r"^SRS1[-+=]", re.IGNORECASE)


class SRSError(ValueError):
    """An SRS address that we did not make, or made too long ago: the text says which."""


def is_srs_local_part(local: str) -> bool:
    """Whether a local part claims to be an SRS address (of any forwarder)."""
    return bool(_SRS0.match(local) or _SRS1.match(local))


class SRS:
    """Forward and reverse SRS addresses under ``domain`` with ``secrets``: the first signs,
    all verify (a secret is rotated by putting the new one first and keeping the old one
    until addresses made with it have expired)."""

    def __init__(
        self, secrets: Sequence[bytes], domain: str, max_age: int = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets or not all(secrets):
            raise ValueError("SRS needs at least one non-empty secret")
        self.secrets = tuple(secrets)
        self.domain = domain.lower()
        self.max_age = max_age
        self._clock = clock

    # -- forward ----------------------------------------------------------------------------

    def forward(self, sender: str) -> str:
        """The envelope sender for a copy of mail from ``sender`` that we forward."""
        local, _, host = sender.rpartition("@")
        if not local or not host or local.startswith('"'):
            raise SRSError(f"cannot rewrite {sender!r}: no plain local part and domain")
        if host.lower() == self.domain:
            return sender  # ours already: SPF passes as it is
        if _SRS1.match(local):
            # Forwarded by a forwarder that got it from another: keep the first hop's part.
            _, first_host, first_rest = local[5:].split("=", 2)
            tag = self._hash(first_host, first_rest)
            return f"SRS1={tag}={first_host}={first_rest}@{self.domain}"
        if _SRS0.match(local):
            rest = local[4:]  # "=HHHH=TT=domain=user": the hop before us made it
            return f"SRS1={self._hash(host, rest)}={host}={rest}@{self.domain}"
        stamp = self._stamp(self._clock())
        return f"SRS0={self._hash(stamp, host, local)}={stamp}={host}={local}@{self.domain}"

    # -- reverse ----------------------------------------------------------------------------

    def reverse(self, local: str) -> str:
        """The address an SRS local part of ours stands for; SRSError if it is not one we
        made (wrong hash), has expired, or is malformed."""
        if _SRS1.match(local):
            parts = local[5:].split("=", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise SRSError("malformed SRS1 address")
            tag, first_host, rest = parts
            self._verify(tag, first_host, rest)
            return f"SRS0{rest}@{first_host}"
        if _SRS0.match(local):
            parts = local[5:].split("=", 3)
            if len(parts) != 4 or not all(parts):
                raise SRSError("malformed SRS0 address")
            tag, stamp, host, user = parts
            self._verify(tag, stamp, host, user)
            if not self._stamp_valid(stamp):
                raise SRSError("expired SRS address")
            return f"{user}@{host}"
        raise SRSError("not an SRS address")

    # -- the parts ----------------------------------------------------------------------------

    def _hash(self, *data: str, secret: bytes | None = None) -> str:
        mac = hmac.new(secret or self.secrets[0], b"", hashlib.sha1)
        for piece in data:
            mac.update(piece.lower().encode("utf-8"))
        return base64.b64encode(mac.digest()).decode("ascii")[:_HASH_LENGTH]

    def _verify(self, tag: str, *data: str) -> None:
        # Compared without case too: some servers lower-case local parts (RFC 5321 says not to).
        if len(tag) >= _HASH_LENGTH and any(
            hmac.compare_digest(self._hash(*data, secret=s).lower(), tag.lower())
            for s in self.secrets
        ):
            return
        raise SRSError("invalid SRS hash")

    @staticmethod
    def _stamp(now: float) -> str:
        day = int(now // _DAY) % _SLOTS
        return _BASE32[day // 32] + _BASE32[day % 32]

    def _stamp_valid(self, stamp: str) -> bool:
        stamp = stamp.upper()
        if len(stamp) != 2 or any(c not in _BASE32 for c in stamp):
            return False
        made = _BASE32.index(stamp[0]) * 32 + _BASE32.index(stamp[1])
        today = int(self._clock() // _DAY) % _SLOTS
        return (today - made) % _SLOTS <= self.max_age
