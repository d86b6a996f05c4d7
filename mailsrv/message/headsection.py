"""Reading a message's header section the way mail readers do, and saying when that is not possible.

Why this module exists: the submission check of ``From:`` (and ``Sender:``, ``Resent-From:``,
``Resent-Sender:``) is only sound if every such field a mail reader shows is one we checked.
Readers part ways on malformed input: Python's ``email`` package ends the header section at
the first line that is not a field, Dovecot reads a line without a colon as a field and
carries on, both accept the obsolete ``From : x`` (RFC 5322 §4.5.3, ``obs-optional``), and a
reader is not bound to stop where our old 64 KiB read did.  So the section is read as a whole
(up to ``HEADER_SECTION_LIMIT``), with the obsolete syntax, and a section that readers could
read differently is reported as *ambiguous* instead of being read one way; the submission
path refuses it.

The grammar: the header section runs from the first line to the first empty line (or the
end).  Each line in it is a field (a name of printable ASCII except ``:``, optional SP/HTAB,
then ``:``) or a continuation (leading SP/HTAB) of the field before.  A message whose first
line is no field has no header section: the caller puts an empty line before it (see
``headers.needs_separator``), so every reader takes all of it as body and nothing in it is
ambiguous.  Any other line before the empty line is what readers disagree about.

Pure except ``read_head``, which reads the file it is given.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

__all__ = [
    "HEADER_SECTION_LIMIT",
    "HeaderFacts",
    "field_name",
    "inspect_head",
    "is_field",
    "read_head",
    "recoded_section",
]

#: Longest header section (octets, the empty line after it not counted) that is read.  A
#: submitted message with a longer one is refused; on port 25 the facts come from its
#: first HEADER_SECTION_LIMIT octets.  Exim's ``header_maxsize`` default; far above what
#: mail programs write (a long References: chain is a few tens of KiB).
HEADER_SECTION_LIMIT = 1 << 20

# How much read_head reads at a time: most header sections end in the first read.
_CHUNK = 65536

# A field: name of printable ASCII except ':' (RFC 5322 §2.2), optional WSP before the
# colon (obs-optional, §4.5.3; readers accept it, so we must too).  The one definition of a
# header field line in mailsrv: sendmail, dsn and mime7bit read fields through is_field and
# field_name.
_NAME = rb"([\x21-\x39\x3b-\x7e]+)"
_FIELD_RE = re.compile(_NAME + rb"[ \t]*:")
# The current syntax only: the colon right after the name.
_STRICT_FIELD_RE = re.compile(_NAME + rb":")

# The fields that name who wrote or sent the message, as readers show them.
_ORIGINATORS = {
    b"from": "From",
    b"sender": "Sender",
    b"resent-from": "Resent-From",
    b"resent-sender": "Resent-Sender",
}

# <...> in a field value: checked on top of what the address parser finds, so that an
# address a reader could take from a display name or comment is never left unchecked.
_ANGLE_RE = re.compile(r"<([^<>]*)>")


@dataclass(frozen=True)
class HeaderFacts:
    """What the server needs to know about a message's header section."""

    has_header_section: bool  # the message starts with a header field (not a bare body)
    has_message_id: bool  # a Message-ID: field is present in the header section
    received_count: int  # Received: fields in the header section (loop detection)
    has_date: bool = False  # a Date: field is present
    #: (field, address) for every address of every From:, Sender:, Resent-From: and
    #: Resent-Sender: field, in order; field as "From", address lower-cased.
    originators: tuple[tuple[str, str], ...] = ()
    #: Why readers could read the section differently (None: they cannot); for the reply.
    ambiguity: str | None = None
    #: The section does not end within HEADER_SECTION_LIMIT octets.
    too_long: bool = False
    #: (offset of the field's first octet in the message, its value unfolded) for every
    #: Authentication-Results: field, in order: who may claim which authserv-id is decided
    #: by mailsrv.checks.auth (RFC 8601 §5).
    auth_results: tuple[tuple[int, bytes], ...] = ()


def field_name(line: bytes, *, obsolete: bool = True) -> bytes | None:
    """The name of the header field *line* starts, as written; None when it starts none.

    With ``obsolete`` (the default) WSP between the name and the colon is accepted, as
    readers do (``From : x`` is a From: field); without it only the current syntax is.
    Continuation lines (leading SP/HTAB) start no field: the caller joins them.
    """
    match = (_FIELD_RE if obsolete else _STRICT_FIELD_RE).match(line)
    return match.group(1) if match else None


def is_field(line: bytes, *, obsolete: bool = True) -> bool:
    """Whether *line* starts a header field (see :func:`field_name`)."""
    return (_FIELD_RE if obsolete else _STRICT_FIELD_RE).match(line) is not None


def recoded_section(
    lines: list[bytes], blank: bool, cte: str | None, added: Sequence[bytes] = ()
) -> bytes:
    """A part's header section (LF-terminated ``lines``, then the empty line if ``blank``)
    with its Content-Transfer-Encoding replaced by ``cte`` when given and ``added`` fields at
    its end: what a converter of the body writes (mime7bit, binarymime). The other fields are
    kept byte for byte, never re-folded."""
    if cte is None and not added:
        return b"".join(lines) + (b"\n" if blank else b"")
    added = list(added)
    if cte is not None:
        lines = _without_field(lines, b"content-transfer-encoding")
        added.append(b"Content-Transfer-Encoding: " + cte.encode("ascii") + b"\n")
    if lines and not lines[-1].endswith(b"\n"):
        lines = [*lines[:-1], lines[-1] + b"\n"]
    return b"".join(lines + added) + b"\n"


def _without_field(lines: list[bytes], name: bytes) -> list[bytes]:
    """The header lines without every field named ``name`` (lower case) and its
    continuation lines."""
    out, skipping = [], False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == name
        if not skipping:
            out.append(line)
    return out


def _section_ended(head: bytes) -> bool:
    """Whether *head* holds the whole header section (or shows there is none)."""
    if head[:1] in (b"\n", b"\r") or b"\n\n" in head or b"\n\r\n" in head:
        return True
    first, newline, _ = head.partition(b"\n")
    return bool(newline) and not is_field(first)  # a bare body: nothing more to read


def read_head(file: BinaryIO, limit: int = HEADER_SECTION_LIMIT) -> bytes:
    """The start of the spooled message *file*: all of its header section, if it has one.

    Reads until the section has ended (an empty line), the file has ended, or ``limit + 1``
    octets are in hand (the one past the limit is how ``inspect_head`` tells a section of
    exactly *limit* octets from a longer one).  Usually that is one read.
    """
    head = file.read(min(_CHUNK, limit + 1))
    while len(head) <= limit and not _section_ended(head):
        more = file.read(min(_CHUNK, limit + 1 - len(head)))
        if not more:
            break
        head += more
    return head


def _section_end(head: bytes) -> int:
    """Offset of the empty line that ends the header section, or ``len(head)``."""
    if head[:1] == b"\n" or head[:2] == b"\r\n":
        return 0
    ends = [i + 1 for i in (head.find(b"\n\n"), head.find(b"\n\r\n")) if i >= 0]
    return min(ends, default=len(head))


def inspect_head(head: bytes, limit: int = HEADER_SECTION_LIMIT) -> HeaderFacts:
    """Facts about the header section at the start of *head* (as read by ``read_head``).

    *head* holds the whole message, or at least its whole header section, or more than
    *limit* octets of it (then the section is ``too_long`` and the facts come from its first
    *limit* octets, the last line perhaps cut).  Only fields in the section count, so a
    ``Received:`` line quoted in the body does not trigger loop detection; a line that is
    neither field nor continuation ends the section for counting (as Python's parser does)
    and makes it ``ambiguous``.
    """
    end = _section_end(head)
    too_long = end > limit
    section = head[: min(end, limit)]
    lines = section.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    has_section = has_msgid = has_date = False
    received = 0
    ambiguity: str | None = None
    values: list[tuple[str, bytes]] = []
    current: str | None = None  # the originator field being read, if any
    auth_results: list[tuple[int, bytes]] = []
    in_auth_results = False
    offset = 0
    for number, raw in enumerate(lines, 1):
        start, offset = offset, offset + len(raw) + 1
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            if not has_section:
                break  # a continuation with no field before it: no header section
            if current is not None:
                values[-1] = (current, values[-1][1] + line)
            elif in_auth_results:
                auth_results[-1] = (auth_results[-1][0], auth_results[-1][1] + line)
            continue
        match = _FIELD_RE.match(line)
        if match is None:
            if has_section and not (too_long and number == len(lines)):
                ambiguity = f"line {number} is neither a header field nor a continuation"
            break
        has_section = True
        name = match.group(1).lower()
        current = _ORIGINATORS.get(name)
        in_auth_results = name == b"authentication-results"
        if in_auth_results:
            auth_results.append((start, line[match.end():]))
        if current is not None:
            values.append((current, line[match.end():]))
        elif name == b"received":
            received += 1
        elif name == b"message-id":
            has_msgid = True
        elif name == b"date":
            has_date = True
    if has_section and ambiguity is None and b"\x00" in section:
        ambiguity = "NUL octet in the header section"
    originators: list[tuple[str, str]] = []
    for field, value in values:
        addresses = _addresses(value)
        if addresses is None and ambiguity is None:
            ambiguity = f"{field}: field without a readable address list"
        originators += [(field, address) for address in addresses or ()]
    return HeaderFacts(
        has_header_section=has_section,
        has_message_id=has_msgid,
        received_count=received,
        has_date=has_date,
        originators=tuple(dict.fromkeys(originators)),
        ambiguity=ambiguity,
        too_long=too_long and has_section,
        auth_results=tuple(auth_results),
    )


def _addresses(value: bytes) -> tuple[str, ...] | None:
    """The addr-specs of an address-list field value, lower-cased; None if it does not parse.

    An empty value has none.  A value that gives an empty element (a parser that lost its
    way, ``a@b)<c@d>``) is unreadable: what a reader makes of it is anyone's guess.  Every
    ``<...>`` in the value is added, so that an address hidden from this parser in a display
    name or comment is still checked.
    """
    text = value.decode("utf-8", "replace").replace("\r", "")
    if not text.strip():
        return ()
    found: list[str] = []
    for _, address in email.utils.getaddresses([text]):
        if not address.strip():
            return None
        found.append(address.strip().lower())
    for inner in _ANGLE_RE.findall(text):
        if inner.strip():
            found.append(inner.strip().lower())
    return tuple(dict.fromkeys(found))
