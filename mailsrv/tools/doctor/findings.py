"""What ``mailsrv doctor`` found: one Finding per thing checked, its level and the fix, and the
two ways of showing them (text for a person or the journal, JSON for a program) (pure).

The exit status is what cron and the systemd timer act on: 1 when any finding is a problem
(mail is, or soon will be, lost, refused or undeliverable), 0 otherwise; warnings do not
change it, so a daily run does not mail the postmaster about what can wait.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["OK", "WARNING", "PROBLEM", "Finding", "exit_status", "to_json", "to_text"]

OK, WARNING, PROBLEM = "ok", "warning", "problem"
_ORDER = {PROBLEM: 0, WARNING: 1, OK: 2}


@dataclass(frozen=True)
class Finding:
    """One check's result: ``check`` is its area (config, listener, certificate, dns, dnsbl, dane,
    queue, disk, permissions), ``subject`` what was looked at, ``fix`` what to do (empty when
    ok)."""

    check: str
    subject: str
    level: str
    detail: str
    fix: str = ""


def exit_status(findings: Sequence[Finding]) -> int:
    """1 when any finding is a problem, else 0."""
    return 1 if any(f.level == PROBLEM for f in findings) else 0


def _counts(findings: Sequence[Finding]) -> dict[str, int]:
    return {level: sum(f.level == level for f in findings) for level in (PROBLEM, WARNING, OK)}


def to_text(findings: Sequence[Finding]) -> str:
    """One line per finding (level, area, subject: detail), its fix indented below, and a
    count; problems first, then warnings, each in the order they were checked."""
    lines = []
    for f in sorted(findings, key=lambda f: _ORDER[f.level]):
        lines.append(f"{f.level:8} {f.check:12} {f.subject}: {f.detail}")
        if f.fix:
            lines.append(" " * 22 + "fix: " + f.fix.replace("\n", "\n" + " " * 27))
    counts = _counts(findings)
    lines.append(f"{counts[PROBLEM]} problem(s), {counts[WARNING]} warning(s), {counts[OK]} ok")
    return "\n".join(lines) + "\n"


def to_json(findings: Sequence[Finding]) -> str:
    """``{"status": "ok"|"warning"|"problem", "counts": {...}, "findings": [...]}``, findings
    in the order they were checked."""
    counts = _counts(findings)
    status = PROBLEM if counts[PROBLEM] else WARNING if counts[WARNING] else OK
    return json.dumps({"status": status, "counts": counts,
                       "findings": [asdict(f) for f in findings]}, indent=1) + "\n"
