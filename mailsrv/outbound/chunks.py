"""
The message data as the relay client reads it, and as BDAT chunks (RFC 3030 CHUNKING). Pure.

The spool keeps LF line ends and no CR (the intake refuses a bare CR or LF in a text body and
turns each CRLF into LF), so the wire form is the data with each LF as CRLF, exactly; with BDAT
there is no dot-stuffing and nothing in the data can end the message early. ``bdat_chunks``
reads the data ahead by one chunk so that the last one carries ``LAST`` (an empty message is
``BDAT 0 LAST``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

__all__ = ["CHUNK_SIZE", "MessageData", "bdat_chunks"]

#: Octets of the spool read for one BDAT chunk (at most twice as many on the wire). The client
#: waits for each chunk's 250 before it sends the next: at most one chunk is in the air.
CHUNK_SIZE = 1024 * 1024


class MessageData:
    """The message as sent: the trace headers, then the body file, read in chunks."""

    def __init__(self, prefix: bytes, body: IO[bytes]) -> None:
        self._prefix = prefix
        self._body = body

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            chunk, self._prefix = self._prefix[:size], self._prefix[size:]
            if size < 0:
                chunk, self._prefix = chunk + self._body.read(), b""
            return chunk
        return self._body.read(size)

    def close(self) -> None:
        self._body.close()


def _read(data: MessageData, size: int) -> bytes:
    """``size`` octets, fewer only at the end (the trace fields and the body in one chunk)."""
    parts, left = [], size
    while left > 0:
        part = data.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts).replace(b"\n", b"\r\n")


def bdat_chunks(data: MessageData, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Each chunk as written: ``BDAT <n>[ LAST]`` CRLF and its n octets (LF as CRLF)."""
    current = _read(data, size)
    while True:
        following = _read(data, size) if current else b""
        last = b" LAST" if not following else b""
        yield b"BDAT %d%s\r\n" % (len(current), last) + current
        if last:
            return
        current = following
