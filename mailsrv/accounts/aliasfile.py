"""Changes to the aliases file for ``mailsrv user add --postmaster``: one line appended.

As with the users file (mailsrv.accounts.userfile), the rest of the file stays as the
administrator wrote it, and the new file replaces the old one atomically.
"""

from __future__ import annotations

__all__ = ["AliasFileError", "add_alias"]


class AliasFileError(Exception):
    """The alias cannot be added (the name has one already); the message says why."""


def _name_of(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    return stripped.split(":", 1)[0].strip().lower()


def add_alias(text: str, name: str, target: str) -> str:
    """``text`` with ``name: target`` appended; ``name`` (a full address) must be new."""
    for number, line in enumerate(text.splitlines(), start=1):
        if _name_of(line) == name:
            raise AliasFileError(f"the aliases file names {name} already (line {number}: "
                                 f"{line.strip()!r}); change that line instead")
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{text}{name}: {target}\n"
