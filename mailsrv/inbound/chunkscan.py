"""
The BDAT scanner (RFC 3030 CHUNKING): the octets of a message's chunks into the spool format.

BDAT carries the message as counted octets, so nothing in it ends the message or is taken as a
command, and there is no dot-stuffing. A text body (``BODY=7BIT`` or ``8BITMIME``, or none) is
held to the same rules as one sent with DATA (mailsrv.inbound.datascan): a bare CR or LF, a line
longer than 1000 octets with its CRLF, or a message over the size limit marks the message as
refused, and from then on its octets are only counted, never kept; accepted data goes to the
spool with LF line ends. The chunks are one stream: a CRLF split between two chunks is one
line end. A binary body (``BODY=BINARYMIME``) has no lines: only its size is held to the limit,
and its octets go to the spool as they came (mailsrv.message.binarymime makes it text at the
end). Pure, without I/O.
"""

from __future__ import annotations

from typing import Callable

from mailsrv.inbound.datascan import MAX_TEXT_LINE, DataError, line_error

__all__ = ["ChunkScanner", "parse_bdat"]

#: The longest chunk size argument taken (RFC 3030's chunk-size is 1*DIGIT; 20 digits hold any
#: 64-bit size, as MAIL's SIZE= allows).
MAX_SIZE_DIGITS = 20


def parse_bdat(rest: bytes) -> tuple[int, bool] | None:
    """BDAT's argument (``<chunk-size> [LAST]``): the size and whether it is the last chunk,
    or None for anything else (the caller answers 501 5.5.4)."""
    words = rest.split()
    if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > MAX_SIZE_DIGITS:
        return None
    if len(words) == 2 and words[1].upper() != b"LAST":
        return None
    return int(words[0]), len(words) == 2


class ChunkScanner:
    """The chunks of one message as one stream: ``feed`` each part of a chunk as it arrives,
    ``finish`` after the last chunk. ``error`` says why the message is refused, if it is."""

    def __init__(
        self, sink: Callable[[bytes], None], max_size: int, max_line: int = MAX_TEXT_LINE,
        binary: bool = False,
    ) -> None:
        self._sink = sink
        self._binary = binary
        self._max_size = max_size
        self._max_content = max_line - 2  # a line's octets without its CRLF
        self._pending = b""  # the start of a line not ended yet (< 1000 octets)
        #: Octets received in the chunks (what the size limit counts).
        self.size = 0
        #: The first reason to refuse the message, or None while it is acceptable.
        self.error: DataError | None = None

    def _fail(self, error: DataError) -> None:
        if self.error is None:
            self.error = error
        self._pending = b""

    def feed(self, data: bytes) -> None:
        """Octets of a chunk, in order."""
        self.size += len(data)
        if self.error is not None:
            return
        if self.size > self._max_size:
            return self._fail(DataError.TOO_BIG)
        if self._binary:
            return self._sink(data)
        buf = self._pending + data if self._pending else data
        last = buf.rfind(b"\r\n")
        if last >= 0:
            lines, rest = buf[: last + 2], buf[last + 2 :]
            error = line_error(lines, self._max_content)
            if error is not None:
                return self._fail(error)
            self._sink(lines.replace(b"\r\n", b"\n"))
        else:
            rest = buf
        # A trailing CR may be the first half of a CRLF that the next octets complete.
        content = rest[:-1] if rest.endswith(b"\r") else rest
        if b"\r" in content or b"\n" in content:
            return self._fail(DataError.BARE_LINE_END)
        if len(content) > self._max_content:
            return self._fail(DataError.LINE_TOO_LONG)
        self._pending = rest

    def finish(self) -> None:
        """The last chunk has ended: a last line without CRLF is kept as it is (BDAT needs no
        final line end); a CR at the very end is a bare CR."""
        if self.error is None and self._pending:
            if self._pending.endswith(b"\r"):
                return self._fail(DataError.BARE_LINE_END)
            self._sink(self._pending)
        self._pending = b""
