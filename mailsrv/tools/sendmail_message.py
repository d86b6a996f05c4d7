"""The message ``sendmail`` reads on standard input, made ready to submit.

Pure except for ``read_message`` (which reads the stream it is given): line ends made CRLF,
the header section split off, the recipients ``-t`` means read from it, ``Bcc:`` removed, and
the ``From:`` and ``Date:`` fields a local program left out added.
"""

from __future__ import annotations

import email.utils
import re
from typing import BinaryIO

from mailsrv.message.headsection import field_name, is_field
from mailsrv.tools.sendmail_args import parse_recipients

__all__ = [
    "add_missing_headers",
    "header_recipients",
    "normalise_line_ends",
    "read_message",
    "remove_bcc",
    "split_header",
]


def read_message(stream: BinaryIO, ignore_dots: bool) -> bytes:
    """Standard input up to end of file or, unless ``ignore_dots``, a line holding only "."."""
    if ignore_dots:
        return stream.read()
    lines = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def normalise_line_ends(data: bytes) -> bytes:
    """Every line end (LF, CRLF or a lone CR) as CRLF, and a final one.

    Local programs write LF; the server refuses bare LF and bare CR (the SMTP smuggling
    defence), and smtplib passes bytes through unchanged, so this is done here.  A lone CR
    (a progress bar in cron output) becomes a line break rather than a refused message.
    """
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def split_header(data: bytes) -> tuple[list[bytes], bytes]:
    """A CRLF message as (header fields, body).

    Each field keeps its continuation lines and line ends.  The header section ends at the
    blank line (which belongs to neither part) or at the first line that is not a field,
    which then starts the body: ``echo hi | sendmail bob`` is a body without header.
    """
    fields: list[bytes] = []
    position = 0
    while position < len(data):
        end = data.find(b"\r\n", position)
        end = len(data) if end < 0 else end + 2
        line = data[position:end]
        if line == b"\r\n":
            return fields, data[end:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif is_field(line):
            fields.append(line)
        else:
            break
        position = end
    return fields, data[position:]


def _name(field_bytes: bytes) -> str:
    """The lower-case name of a field from ``split_header``."""
    name = field_name(field_bytes)
    return name.decode("ascii").lower() if name is not None else ""


def _value(field_bytes: bytes) -> str:
    raw = field_bytes.split(b":", 1)[1]
    return re.sub(r"\r\n(?=[ \t])", "", raw.decode("utf-8", "replace")).strip()


def header_recipients(fields: list[bytes], domain: str) -> list[str]:
    """The recipients ``-t`` means: To:, Cc: and Bcc:, or the Resent- ones when present.

    A resent message (RFC 5322 section 3.6.6) goes to its Resent- recipients, not again to
    the original ones, as sendmail and Postfix do.
    """
    names = {_name(f) for f in fields}
    wanted = ("resent-to", "resent-cc", "resent-bcc")
    if not names.intersection(wanted):
        wanted = ("to", "cc", "bcc")
    return parse_recipients([_value(f) for f in fields if _name(f) in wanted], domain)


def remove_bcc(fields: list[bytes]) -> list[bytes]:
    """The fields without Bcc: and Resent-Bcc:, which must not reach any recipient."""
    return [f for f in fields if _name(f) not in ("bcc", "resent-bcc")]


def add_missing_headers(
    fields: list[bytes], sender: str, full_name: str | None, now: float | None = None
) -> list[bytes]:
    """Add the From: and Date: fields RFC 5322 requires when the program left them out.

    (The server adds Message-ID: itself.)  A non-ASCII full name is RFC 2047-encoded.
    """
    names = {_name(f) for f in fields}
    added = []
    if "from" not in names:
        added.append(f"From: {email.utils.formataddr((full_name or '', sender), 'utf-8')}\r\n")
    if "date" not in names:
        added.append(f"Date: {email.utils.formatdate(now, localtime=True)}\r\n")
    return fields + [line.encode("ascii") for line in added]
