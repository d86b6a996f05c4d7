"""
The header fields rspamd asks to remove (``milter.remove_headers``), taken out of the spooled
message without copying it.

The spool file is stored as it is (sent with ``sendfile``, moved into the queue by
``rename``), so a field is not cut out: it is *renamed in place* to a name of the same
length that no reader acts on, as the forged ``Authentication-Results:`` of
mailsrv.checks.auth are (one ``pwrite`` per field).  ``X-Spam-Status: Yes`` becomes
``X-Removed-X-S: Yes``: a Sieve rule or a mail program that trusts ``X-Spam-Status`` no
longer sees the sender's own claim, and a reader of the source sees what happened.  Only
fields of the header section count; the fields rspamd asks to add go before it (AddHeaders),
so they are never renamed.

Pure, except :func:`rename_in_place`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mailsrv.message.headsection import field_name

__all__ = ["removals", "removed_name", "rename_in_place"]

_PREFIX = b"X-Removed-"


def removed_name(name: bytes) -> bytes:
    """The name ``name`` is renamed to: ``X-Removed-`` followed by the name, cut to the
    length of ``name`` (``X-Spam`` → ``X-Remo``); never the same name."""
    new = (_PREFIX + name)[: len(name)]
    if new.lower() == name.lower():  # "X", "X-", "X-R"...: something else of that length
        new = b"Z" * len(name) if name[:1] not in (b"Z", b"z") else b"Y" * len(name)
    return new


def _fields(head: bytes) -> list[tuple[int, bytes]]:
    """(offset, name) of each field of the header section at the start of ``head``."""
    found: list[tuple[int, bytes]] = []
    offset = 0
    for raw in head.split(b"\n"):
        start, offset = offset, offset + len(raw) + 1
        if offset > len(head):  # the last line, cut or not ended: not a whole field
            break
        if raw[:1] in (b" ", b"\t"):
            if not found:
                break
            continue
        name = field_name(raw)
        if name is None:
            break  # the empty line, or a line that is no field: the section ended
        found.append((start, name))
    return found


def removals(head: bytes, remove: tuple[tuple[str, int], ...]) -> list[tuple[int, bytes]]:
    """The (offset, name) of each field to rename: for each (lower-case name, instance),
    every instance (0), the n-th (n > 0) or the n-th from the end (n < 0), in file order."""
    fields = _fields(head)
    chosen: set[int] = set()
    for wanted, instance in remove:
        named = [(offset, name) for offset, name in fields
                 if name.lower() == wanted.encode("ascii", "replace")]
        if instance == 0:
            chosen.update(offset for offset, _ in named)
        elif 0 < instance <= len(named):
            chosen.add(named[instance - 1][0])
        elif -len(named) <= instance < 0:
            chosen.add(named[instance][0])
    return [(offset, name) for offset, name in fields if offset in chosen]


def rename_in_place(path: Path, fields: list[tuple[int, bytes]]) -> None:
    """Rename each field (offset, name) of the file at ``path`` to :func:`removed_name`,
    after checking the name is still there.  Blocking: in a delivery thread."""
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, name in fields:
            if os.pread(fd, len(name), offset) == name:
                os.pwrite(fd, removed_name(name), offset)
    finally:
        os.close(fd)
