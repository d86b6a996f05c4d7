"""
Converting an 8-bit message to 7 bits for a server that does not offer 8BITMIME (pure).

RFC 6152 section 3 leaves a relay whose next hop lacks 8BITMIME two choices: convert the
message to 7 bits (RFC 1652 describes the MIME way) or return it.  This module converts what
can be converted without loss and refuses the rest (:class:`ConversionError`; the relayer
bounces with 5.6.3, "conversion required but not supported"):

- every leaf part whose content has 8-bit octets and whose transfer encoding is an identity
  one (none, ``7bit``, ``8bit``, ``binary``) is re-encoded as quoted-printable, line by line,
  so that decoding it gives back exactly the original octets;
- a multipart or ``message/rfc822`` container declared ``8bit`` or ``binary`` becomes
  ``7bit`` (its inside is 7-bit afterwards); an embedded message is converted like the
  outer one;
- a message without MIME (no ``Content-Type``) whose body is 8-bit gains ``MIME-Version``,
  ``Content-Type: text/plain`` with ``charset=utf-8`` when the body is valid UTF-8, else
  RFC 1428's ``unknown-8bit``, and the quoted-printable encoding;
- 8-bit octets in a preamble or epilogue (text no reader shows) become ``?``.

Refused: 8-bit octets in any header field (they would need RFC 2047 words, a guess at the
charset), in a part already encoded with base64 or quoted-printable (it is broken), or in a
part that must stay unencoded (a multipart without a boundary, ``message/partial``,
``message/external-body``).

Everything else is passed through byte for byte: header fields are never re-folded (only a
``Content-Transfer-Encoding`` field is replaced, or fields added at the end of the section),
and parts without 8-bit octets are untouched (a signed part stays signed).  The message is
streamed line by line twice (first to plan and to find what cannot be converted, before any
output; then to write), so memory stays small whatever the size.  Lines end with LF, as in
the spool file.  The standard library's ``email`` package reads each header section's
``Content-Type`` and ``Content-Transfer-Encoding`` (parameters, RFC 2231, defaults); the
structure is followed here, line by line, because the package holds whole messages in memory
and re-folds what it writes.
"""

from __future__ import annotations

import codecs
import email.parser
import email.policy
import re
from collections.abc import Callable, Iterable, Iterator

from mailsrv.message.headsection import is_field, recoded_section

__all__ = ["ConversionError", "quoted_printable_line", "to_7bit"]

#: RFC 2045 section 6.7 rule 5: encoded lines are at most 76 characters.
QP_LINE_MAX = 76
_IDENTITY = ("7bit", "8bit", "binary")
# Octets that quoted-printable writes as =XX: all but printable ASCII other than "=", and
# but space and tab (which are encoded at the end of a line only).
_QP_UNSAFE = re.compile(rb"[^\x21-\x3c\x3e-\x7e \t]")
_TOKEN_RE = re.compile(r"\s*([^\s;(]+)")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_TO_QUESTION_MARKS = bytes(range(128)) + b"?" * 128
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


class ConversionError(Exception):
    """The message needs 7 bits and cannot be converted safely (RFC 3463: 5.6.3)."""


def _hex(match: re.Match[bytes]) -> bytes:
    return b"=%02X" % match.group()[0]


def quoted_printable_line(content: bytes) -> bytes:
    """One line of content (without its LF) as quoted-printable lines joined by LF.

    Beyond RFC 2045's rules, a ``-`` that would start an encoded line is written ``=2D``, so
    that no line of the result can look like a MIME boundary delimiter ("--...").
    """
    encoded = _QP_UNSAFE.sub(_hex, content)
    if encoded[-1:] in (b" ", b"\t"):
        encoded = encoded[:-1] + b"=%02X" % encoded[-1]
    if encoded[:1] == b"-":
        encoded = b"=2D" + encoded[1:]
    lines = []
    while len(encoded) > QP_LINE_MAX:
        cut = QP_LINE_MAX - 1  # room for the soft line break "="
        token = encoded.rfind(b"=", cut - 2, cut)  # every "=" starts an "=XX": never split one
        if token >= 0:
            cut = token
        lines.append(encoded[:cut] + b"=")
        encoded = encoded[cut:]
        if encoded[:1] == b"-":
            encoded = b"=2D" + encoded[1:]
    lines.append(encoded)
    return b"\n".join(lines)


class _Lines:
    """The message's lines with one line of push-back (the delimiter that ended a part)."""

    def __init__(self, lines: Iterable[bytes]) -> None:
        self._lines: Iterator[bytes] = iter(lines)
        self._back: bytes | None = None

    def next(self) -> bytes | None:
        if self._back is not None:
            line, self._back = self._back, None
            return line
        return next(self._lines, None)

    def push(self, line: bytes) -> None:
        self._back = line


def _delimiter(line: bytes, boundaries: list[bytes]) -> tuple[int, bool] | None:
    """(depth, closing) when ``line`` is a delimiter of one of ``boundaries`` (RFC 2046)."""
    if not line.startswith(b"--") or not boundaries:
        return None
    text = line.rstrip(b"\r\n").rstrip(b" \t")  # transport padding is allowed after it
    for depth in range(len(boundaries) - 1, -1, -1):
        delimiter = b"--" + boundaries[depth]
        if text == delimiter:
            return depth, False
        if text == delimiter + b"--":
            return depth, True
    return None



class _Converter:
    """One pass over the message; the first (``plan`` None) writes nothing and makes the plan."""

    def __init__(self, write: Callable[[bytes], None], plan: list[tuple[bool, bool]] | None) -> None:
        self._write = write
        self._planning = plan is None
        #: Per leaf part, in order: (has 8-bit octets, is valid UTF-8).
        self.plan: list[tuple[bool, bool]] = [] if plan is None else plan
        self._leaf = 0

    def write(self, data: bytes) -> None:
        if not self._planning:
            self._write(data)

    def entity(self, lines: _Lines, boundaries: list[bytes], default_type: str, message: bool) -> None:
        """A header section and its body; returns at an enclosing delimiter (pushed back) or EOF.

        ``message`` is true for a message's own header section (the top, or inside a
        ``message/rfc822`` part): only there do MIME-Version and a Content-Type get added.
        """
        header: list[bytes] = []
        blank = False
        while True:
            line = lines.next()
            if line is None:
                break
            if line in (b"\n", b"\r\n"):
                blank = True
                break
            if _delimiter(line, boundaries) is not None:
                lines.push(line)
                break
            if (line[:1] in (b" ", b"\t") and header) or is_field(line):
                header.append(line)
                continue
            lines.push(line)  # a body without the empty line before it
            break
        for line in header:
            if _EIGHT_BIT.search(line):
                raise ConversionError(
                    "8-bit octets in the header field "
                    + repr(line.split(b":", 1)[0][:40].decode("ascii", "replace"))
                )
        fields = _HEADER_PARSER.parsebytes(b"".join(header))
        fields.set_default_type(default_type)
        ctype = fields.get_content_type()
        token = _TOKEN_RE.match(str(fields.get("content-transfer-encoding", "")))
        cte = token.group(1).lower() if token else "7bit"
        boundary = fields.get_boundary() if ctype.startswith("multipart/") else None
        identity = cte in _IDENTITY

        if ctype.startswith("multipart/") and boundary and identity:
            self._header(header, blank, "7bit" if cte != "7bit" else None, [])
            inner = boundary.encode("ascii", "surrogateescape")
            self._multipart(lines, boundaries, inner, "message/rfc822"
                            if ctype == "multipart/digest" else "text/plain")
            return
        if ctype == "message/rfc822" and identity:
            self._header(header, blank, "7bit" if cte != "7bit" else None, [])
            self.entity(lines, boundaries, "text/plain", message=True)
            return

        index = self._leaf
        self._leaf += 1
        if self._planning:
            self.plan.append(self._scan_leaf(lines, boundaries))
            eight_bit, _ = self.plan[index]
            if eight_bit and not identity:
                raise ConversionError(f"8-bit octets in a part encoded as {cte!r}")
            if eight_bit and (ctype.startswith("multipart/") or ctype in (
                    "message/rfc822", "message/partial", "message/external-body")):
                raise ConversionError(f"8-bit octets in a {ctype} part that cannot be encoded")
            return
        eight_bit, utf8 = self.plan[index]
        if not eight_bit:
            self._header(header, blank, None, [])
            self._copy(lines, boundaries)
            return
        added = []
        if message and "content-type" not in fields:
            added = [b"MIME-Version: 1.0\n"] if "mime-version" not in fields else []
            charset = b"utf-8" if utf8 else b"unknown-8bit"
            added.append(b"Content-Type: text/plain; charset=" + charset + b"\n")
        elif message and "mime-version" not in fields:
            added = [b"MIME-Version: 1.0\n"]
        self._header(header, blank, "quoted-printable", added)
        self._encode(lines, boundaries)

    def _header(self, header: list[bytes], blank: bool, cte: str | None, added: list[bytes]) -> None:
        """The header section, with its transfer encoding replaced and ``added`` fields."""
        self.write(recoded_section(header, blank, cte, added))

    def _multipart(self, lines: _Lines, boundaries: list[bytes], boundary: bytes, default: str) -> None:
        inner = boundaries + [boundary]
        depth = len(boundaries)
        in_parts = False
        while True:  # the preamble, then one part after each delimiter
            if in_parts:
                self.entity(lines, inner, default, message=False)
            line = lines.next()
            if line is None:
                return
            found = _delimiter(line, inner)
            if found is None:  # preamble text (a part always ends at a delimiter or EOF)
                self.write(line.translate(_TO_QUESTION_MARKS))
                continue
            if found[0] < depth:
                lines.push(line)  # an enclosing multipart's delimiter: this one is unclosed
                return
            self.write(line)
            if found[1]:
                break
            in_parts = True
        for line in self._body(lines, boundaries):  # the epilogue
            self.write(line.translate(_TO_QUESTION_MARKS))

    def _body(self, lines: _Lines, boundaries: list[bytes]) -> Iterator[bytes]:
        while True:
            line = lines.next()
            if line is None:
                return
            if _delimiter(line, boundaries) is not None:
                lines.push(line)
                return
            yield line

    def _scan_leaf(self, lines: _Lines, boundaries: list[bytes]) -> tuple[bool, bool]:
        decoder = codecs.getincrementaldecoder("utf-8")()
        eight_bit, utf8 = False, True
        for line in self._body(lines, boundaries):
            if not line.isascii():
                eight_bit = True
                if utf8:
                    try:
                        decoder.decode(line)
                    except UnicodeDecodeError:
                        utf8 = False
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            utf8 = False
        return eight_bit, utf8

    def _copy(self, lines: _Lines, boundaries: list[bytes]) -> None:
        for line in self._body(lines, boundaries):
            self.write(line)

    def _encode(self, lines: _Lines, boundaries: list[bytes]) -> None:
        for line in self._body(lines, boundaries):
            if line.endswith(b"\n"):
                self.write(quoted_printable_line(line[:-1]) + b"\n")
            else:  # the last line of a message without a final line end
                self.write(quoted_printable_line(line))


def to_7bit(read_lines: Callable[[], Iterable[bytes]], write: Callable[[bytes], None]) -> None:
    """Write the 7-bit form of the message whose lines (LF-terminated) ``read_lines()`` gives.

    ``read_lines`` is called twice, each time for the whole message from its start.  Raises
    ConversionError, before anything is written, when the message cannot be converted.
    """
    planner = _Converter(write, None)
    planner.entity(_Lines(read_lines()), [], "text/plain", message=True)
    _Converter(write, planner.plan).entity(_Lines(read_lines()), [], "text/plain", message=True)
