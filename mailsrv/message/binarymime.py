"""
A message sent with ``BODY=BINARYMIME`` (RFC 3030) made into a text message at receipt (pure).

A binary MIME message may hold parts whose octets are not lines at all (bare CR or LF, NUL,
lines of any length) under ``Content-Transfer-Encoding: binary``. Everything past the end of
BDAT — the checks, DKIM, the Maildirs, the queue, the relayer, DSNs with the original, LMTP —
works on the spool's text form (lines ending in LF), and most next hops do not offer
BINARYMIME. So the message is converted once, as RFC 3030 §4 lets a receiver that cannot pass
it on unchanged do, and as RFC 6376 §5.3 asks of a signer anyway:

- every leaf part whose content is not text is encoded with base64 (its exact octets, so that
  decoding gives them back) and its ``Content-Transfer-Encoding`` becomes ``base64``;
- a leaf part declared ``binary`` whose content is text after all keeps it, labelled ``8bit``
  or ``7bit`` as its octets are;
- a multipart or ``message/rfc822`` container declared ``binary`` becomes ``8bit`` (what its
  converted inside is at most), and is followed inside, an embedded message like the outer one;
- a preamble or epilogue that is not text is dropped (no reader shows it).

Refused (:class:`BinaryMimeError`, answered ``554 5.6.0`` at the last chunk): a header
section that is not CRLF lines of at most 998 octets, a part already encoded (base64,
quoted-printable) whose content is not text, binary content in a multipart without delimiters
or in a ``message/*`` part that cannot be encoded, and MIME nested deeper than ``MAX_DEPTH``.

Header fields are passed through byte for byte but for their line ends (only a
``Content-Transfer-Encoding`` field is replaced, or fields added at the end of the section).
The message is read from any buffer with ``find`` and slices (the spool file mapped into
memory: nothing is copied whole) and written in blocks, so memory stays small whatever its
size. The standard library's ``email`` package reads each header section's
``Content-Type``, ``Content-Transfer-Encoding`` and boundary; the structure between
delimiters is followed here, because the package holds whole messages in memory and re-folds
what it writes.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import re
from typing import Callable, Iterator, Protocol

from mailsrv.message.headsection import is_field, recoded_section

__all__ = ["BinaryMimeError", "MAX_DEPTH", "to_text"]

#: Containers nested deeper than this are refused (RFC 2046 sets no limit; readers do).
MAX_DEPTH = 50
#: The longest text line without its CRLF (RFC 5322 §2.1.1).
MAX_LINE = 998
_IDENTITY = ("7bit", "8bit", "binary")
_TOKEN_RE = re.compile(r"\s*([^\s;(]+)")
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)
#: Octets encoded per block: a whole number of 57-octet groups, each one 76-character line.
_BASE64_BLOCK = 57 * 16384
_COPY_BLOCK = 1 << 20


class Buffer(Protocol):
    """What is read: ``bytes`` or an ``mmap`` of the spool file."""

    def find(self, sub: bytes, start: int = ..., end: int = ...) -> int: ...

    def __getitem__(self, index: slice) -> bytes: ...


class BinaryMimeError(Exception):
    """The message cannot be made into text; the text says why (for the reply and the log)."""


def to_text(data: Buffer, size: int, write: Callable[[bytes], None]) -> None:
    """Write the text form (LF line ends) of the ``size`` octets of binary MIME in ``data``.

    Raises BinaryMimeError, possibly after some output was written (the caller discards it).
    """
    _Converter(data, write).entity(0, size, "text/plain", message=True, depth=0)


class _Converter:
    def __init__(self, data: Buffer, write: Callable[[bytes], None]) -> None:
        self.data = data
        self.write = write

    def entity(self, start: int, end: int, default_type: str, message: bool, depth: int) -> None:
        """A header section and its body in [start, end)."""
        if depth > MAX_DEPTH:
            raise BinaryMimeError(f"MIME structure nested deeper than {MAX_DEPTH}")
        header, body, blank = self._header_section(start, end)
        fields = _HEADER_PARSER.parsebytes(b"".join(header))
        fields.set_default_type(default_type)
        ctype = fields.get_content_type()
        token = _TOKEN_RE.match(str(fields.get("content-transfer-encoding", "")))
        cte = token.group(1).lower() if token else "7bit"
        identity = cte in _IDENTITY
        container_cte = "8bit" if cte == "binary" else None
        boundary = fields.get_boundary() if ctype.startswith("multipart/") else None

        if ctype.startswith("multipart/") and boundary and identity:
            self._header(header, blank, container_cte, [])
            default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            self._multipart(body, end, boundary.encode("ascii", "surrogateescape"), default, depth)
            return
        if ctype == "message/rfc822" and identity:
            self._header(header, blank, container_cte, [])
            self.entity(body, end, "text/plain", message=True, depth=depth + 1)
            return

        text = _text_kind(self.data, body, end)
        if text is not None:
            label = text if cte == "binary" else None  # "binary" that is text after all
            self._header(header, blank, label, [])
            self._copy_text(body, end)
            return
        if not identity:
            raise BinaryMimeError(f"binary octets in a part encoded as {cte!r}")
        if ctype.startswith(("multipart/", "message/")):
            raise BinaryMimeError(f"binary octets in a {ctype} part that cannot be encoded")
        added = [b"MIME-Version: 1.0\n"] if message and "mime-version" not in fields else []
        self._header(header, blank, "base64", added)
        self._encode(body, end)

    def _header_section(self, start: int, end: int) -> tuple[list[bytes], int, bool]:
        """The header lines (each ending CRLF, as received), where the body starts, and
        whether an empty line came before it (else the body starts at the first line that is
        not a field, or there is none)."""
        data, lines, pos = self.data, [], start
        while pos < end:
            eol = data.find(b"\r\n", pos, min(end, pos + MAX_LINE + 2))
            if eol == pos:
                return lines, pos + 2, True
            line = data[pos:eol + 2] if eol >= 0 else data[pos:min(end, pos + MAX_LINE + 2)]
            continuation = line[:1] in (b" ", b"\t") and bool(lines)
            if not continuation and not is_field(line):
                return lines, pos, False  # a body without the empty line before it
            if eol < 0:
                if end - pos > MAX_LINE:
                    raise BinaryMimeError("a header line longer than 998 octets")
                line = data[pos:end]  # a header section that ends the message
            content = line[:-2] if eol >= 0 else line
            if b"\r" in content or b"\n" in content:
                raise BinaryMimeError("a bare CR or LF in a header section")
            lines.append(line)
            pos += len(line)
        return lines, end, False

    def _header(self, header: list[bytes], blank: bool, cte: str | None, added: list[bytes]) -> None:
        """The header section with LF line ends, its transfer encoding replaced, ``added``
        fields at its end."""
        lines = [line.replace(b"\r\n", b"\n") for line in header]
        self.write(recoded_section(lines, blank, cte, added))

    def _multipart(self, start: int, end: int, boundary: bytes, default: str, depth: int) -> None:
        """The parts between the delimiters of ``boundary`` in [start, end) (RFC 2046 §5.1.1)."""
        delimiters = list(_delimiters(self.data, start, end, b"--" + boundary))
        if not delimiters:
            if _text_kind(self.data, start, end) is None:
                raise BinaryMimeError("binary octets in a multipart without its delimiters")
            self._copy_text(start, end)
            return
        first = delimiters[0][0]
        if first > start:  # the preamble, and the CRLF that belongs to the first delimiter
            if _text_kind(self.data, start, first - 2) is not None:
                self._copy_text(start, first - 2)
            self.write(b"\n")
        for index, (_start, after, closing, line_end) in enumerate(delimiters):
            self.write(b"--" + boundary + (b"--" if closing else b"") + (b"\n" if line_end else b""))
            if closing:
                if _text_kind(self.data, after, end) is not None:
                    self._copy_text(after, end)  # the epilogue
                return
            following = delimiters[index + 1][0] - 2 if index + 1 < len(delimiters) else end
            self.entity(after, max(after, following), default, message=False, depth=depth + 1)
            if index + 1 < len(delimiters):
                self.write(b"\n")

    def _copy_text(self, start: int, end: int) -> None:
        """Text octets with CRLF made LF, in blocks that never split a CRLF."""
        data, pos = self.data, start
        while pos < end:
            stop = min(end, pos + _COPY_BLOCK)
            if stop < end and data[stop - 1:stop] == b"\r":
                stop -= 1
            self.write(data[pos:stop].replace(b"\r\n", b"\n"))
            pos = stop

    def _encode(self, start: int, end: int) -> None:
        """Base64 of the octets in [start, end): 76-character lines, the last without its LF
        (the line end before a delimiter is the delimiter's)."""
        pos = start
        while pos < end:
            stop = min(end, pos + _BASE64_BLOCK)
            encoded = base64.encodebytes(self.data[pos:stop])
            self.write(encoded[:-1] if stop == end else encoded)
            pos = stop


def _delimiters(
    data: Buffer, start: int, end: int, delimiter: bytes
) -> Iterator[tuple[int, int, bool, bool]]:
    """(start, end of its line, closing, followed by CRLF) of each delimiter line in [start,
    end), up to the closing one: ``--boundary`` at the start or after a CRLF, then ``--`` for
    the closing one, transport padding, and CRLF (or the end of the range)."""
    pos = start
    while True:
        at = data.find(delimiter, pos, end)
        if at < 0:
            return
        pos = at + len(delimiter)
        if at != start and data[at - 2:at] != b"\r\n":
            continue
        closing = data[pos:pos + 2] == b"--"
        cursor = pos + 2 if closing else pos
        while cursor < end and data[cursor:cursor + 1] in (b" ", b"\t"):
            cursor += 1
        if cursor == end:
            yield at, end, closing, False
            return
        if data[cursor:cursor + 2] != b"\r\n":
            continue  # a line that only starts like a delimiter
        yield at, cursor + 2, closing, True
        if closing:
            return
        pos = cursor + 2


def _text_kind(data: Buffer, start: int, end: int) -> str | None:
    """"7bit" or "8bit" when [start, end) is text — CRLF lines of at most 998 octets, no NUL,
    no bare CR or LF (the last line may lack its CRLF) — else None."""
    eight_bit = False
    pos = start
    while pos < end:
        newline = data.find(b"\n", pos, min(end, pos + MAX_LINE + 2))
        if newline < 0:
            if end - pos > MAX_LINE + 1:
                return None
            line = data[pos:end]
            if line.endswith(b"\r"):
                return None
            pos = end
        else:
            if newline == pos or data[newline - 1:newline] != b"\r":
                return None
            line = data[pos:newline - 1]
            pos = newline + 1
        if b"\r" in line or b"\0" in line or len(line) > MAX_LINE:
            return None
        if not eight_bit and not line.isascii():
            eight_bit = True
    return "8bit" if eight_bit else "7bit"
