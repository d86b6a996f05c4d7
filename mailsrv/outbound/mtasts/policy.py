"""
The MTA-STS TXT record and policy text (RFC 8461 §3.1, §3.2), and MX matching (§4.1): pure.

A policy that does not parse is no policy (the caller keeps a cached one, as §5 says); keys
we do not know are ignored, and of a key given twice (other than ``mx``) the first counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ENFORCE",
    "TESTING",
    "NONE",
    "MAX_MAX_AGE",
    "PolicyError",
    "Policy",
    "parse_txt",
    "pick_txt",
    "parse_policy",
    "mx_matches",
]

ENFORCE, TESTING, NONE = "enforce", "testing", "none"
#: The largest max_age the RFC allows (one year, §3.2).
MAX_MAX_AGE = 31557600

_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


class PolicyError(ValueError):
    """The TXT record or the policy is malformed (TLS-RPT's ``sts-policy-invalid``)."""


@dataclass(frozen=True)
class Policy:
    """One domain's policy as fetched, with what identifies and ages it."""

    mode: str  # enforce, testing or none
    mx: tuple[str, ...]  # the patterns, lower-case, without trailing dot
    max_age: int  # seconds
    text: str  # the policy as served, for TLS-RPT's policy-string
    id: str = ""  # the TXT record's id when it was fetched
    fetched: float = 0.0  # when (time.time())

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        """Whether an MX host name is one the policy allows."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    @property
    def lines(self) -> list[str]:
        """The policy's lines (TLS-RPT's ``policy-string``)."""
        return [line for line in self.text.replace("\r\n", "\n").split("\n") if line]


def parse_txt(strings: Sequence[bytes | str]) -> str:
    """The ``id`` of one ``_mta-sts`` TXT record given as its character-strings (joined, as
    §3.1 says).  Raises PolicyError when the record is not a valid STSv1 record."""
    text = "".join(s.decode("ascii", "replace") if isinstance(s, bytes) else s for s in strings)
    fields = [f.strip() for f in text.split(";")]
    if not fields or fields[0] != "v=STSv1":
        raise PolicyError("the record does not start with v=STSv1")
    found: str | None = None
    for field in fields[1:]:
        if not field:
            continue
        key, sep, value = field.partition("=")
        if not sep:
            raise PolicyError(f"malformed field {field!r}")
        if key.strip() == "id" and found is None:
            if not _ID.match(value.strip()):
                raise PolicyError(f"malformed id {value.strip()!r}")
            found = value.strip()
    if found is None:
        raise PolicyError("the record has no id")
    return found


def pick_txt(records: Sequence[Sequence[bytes | str]]) -> str | None:
    """The id of a domain's STSv1 record among all its TXT records: None when there is none;
    PolicyError when there are several or it is malformed (§3.1: then there is no policy)."""
    ours = [r for r in records if _joined(r).startswith("v=STSv1")]
    if not ours:
        return None
    if len(ours) > 1:
        raise PolicyError("more than one v=STSv1 record")
    return parse_txt(ours[0])


def _joined(strings: Sequence[bytes | str]) -> str:
    return "".join(s.decode("ascii", "replace") if isinstance(s, bytes) else s for s in strings)


def _valid_pattern(pattern: str) -> bool:
    labels = pattern.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    return len(labels) >= 1 and all(_LABEL.match(label) for label in labels)


def parse_policy(text: str, *, id: str = "", fetched: float = 0.0) -> Policy:
    """The policy in ``text`` (the body of ``/.well-known/mta-sts.txt``, §3.2)."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"malformed line {line!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _valid_pattern(pattern):
                raise PolicyError(f"malformed mx {value!r}")
            mx.append(pattern)
        else:
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = values.get("mode")
    if mode not in (ENFORCE, TESTING, NONE):
        raise PolicyError(f"unknown mode {mode!r}")
    max_age = values.get("max_age", "")
    if not (max_age.isdigit() and len(max_age) <= 10 and int(max_age) <= MAX_MAX_AGE):
        raise PolicyError(f"malformed max_age {max_age!r}")
    if mode != NONE and not mx:
        raise PolicyError(f"mode {mode} without an mx")
    return Policy(mode, tuple(mx), int(max_age), text, id, fetched)


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: a pattern names one host, or with ``*.`` any host exactly one label below."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and dot == "." and rest == pattern[2:]
    return host == pattern
