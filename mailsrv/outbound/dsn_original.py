"""The original message's header section, as a DSN returns it (``text/rfc822-headers``).

Pure: no I/O, standard library and ``mailsrv.message.headsection`` only.  ``original_headers`` reads
the section from the first bytes of the spooled original (``mailsrv.outbound.bounce`` calls it);
``headers_part`` makes it fit for the part of the report (``mailsrv.outbound.dsn``).  Never the
body: it may be large, and returning it copies possibly private text into yet another
mailbox.
"""

from __future__ import annotations

from mailsrv.message.headsection import is_field

__all__ = ["headers_part", "original_headers", "whole_part"]

#: Longest line we write (RFC 5322 section 2.1.1 hard limit, without CRLF).
_LINE_MAX = 998


def original_headers(head: bytes, limit: int = 65536) -> bytes:
    """The header section at the start of *head*, cut at a line boundary to ≤ *limit* octets.

    *head* is the first bytes of the spooled original (LF line ends) and may stop mid-line;
    a line without its LF is dropped, since it may be cut anywhere.  The section ends at
    the first empty line, or at the first line that is neither a header field in the current
    syntax (``headsection.is_field(line, obsolete=False)``: a name with WSP before its colon
    ends it, unlike in ``headsection.inspect_head``) nor the continuation (leading SP/HTAB)
    of one: a message without a header section gives ``b""``.  Lines are returned unchanged,
    8-bit octets included, each with its LF.
    """
    out: list[bytes] = []
    size = 0
    complete = head.split(b"\n")[:-1]  # the last piece has no LF: partial or empty
    for line in complete:
        if line in (b"", b"\r"):
            break
        if line[:1] in (b" ", b"\t"):
            if not out:
                break  # a continuation with no field before it
        elif not is_field(line, obsolete=False):  # "Name :" ends it, as it always has
            break
        if size + len(line) + 1 > limit:
            break
        out.append(line + b"\n")
        size += len(line) + 1
    return b"".join(out)


def headers_part(raw: bytes) -> bytes:
    """The original header section as the content of the ``text/rfc822-headers`` part.

    Cut at the first empty line even if the caller passed more (the body never goes back);
    CRLF becomes LF, a stray CR or NUL becomes ``?`` (neither is allowed in 8bit content);
    a line over the limit is split into continuation lines rather than truncated, and the
    result ends with a newline.  8-bit octets are kept: the part is then sent as 8bit.
    """
    text = raw.replace(b"\r\n", b"\n")
    if text.startswith(b"\n"):
        return b""
    end = text.find(b"\n\n")
    if end >= 0:
        text = text[: end + 1]
    text = text.replace(b"\r", b"?").replace(b"\x00", b"?")
    if not text:
        return b""
    if not text.endswith(b"\n"):
        text += b"\n"
    out = []
    for line in text[:-1].split(b"\n"):
        while len(line) > _LINE_MAX:
            out.append(line[:_LINE_MAX])
            line = b" " + line[_LINE_MAX:]
        out.append(line)
    return b"\n".join(out) + b"\n"


def whole_part(raw: bytes) -> bytes:
    """The whole original as the content of a ``message/rfc822`` part (``RET=FULL``): as
    :func:`headers_part` makes its lines safe (LF ends, no stray CR or NUL, no line over the
    limit), and ending with a newline."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"?").replace(b"\x00", b"?")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    out = []
    for line in text[:-1].split(b"\n") if text else []:
        while len(line) > _LINE_MAX:
            out.append(line[:_LINE_MAX])
            line = line[_LINE_MAX:]
        out.append(line)
    return b"\n".join(out) + b"\n" if out else b""
