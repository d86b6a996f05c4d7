"""
Command-line framing for the SMTP server: bytes in, whole command lines out. No I/O.

Twisted's ``LineOnlyReceiver`` framing is unsafe for mail (see docs/design.md), so the session
frames its own input:

- a line ends only at CRLF; a bare CR or LF in a command is reported (the session closes with
  ``421``: a client that sends one is either broken or smuggling);
- a command line is at most 512 octets (RFC 5321 §4.5.3.1.4), an AUTH command or SASL response
  line 12288 (RFC 4954 §4); the rest of a longer line is discarded as it arrives, never
  executed, and never buffered whole.

The DATA phase is not framed here: the session hands everything held to ``spool.DataScanner``.
"""

from __future__ import annotations

import enum

from mailsrv.inbound import sasl

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including its CRLF.
MAX_COMMAND_LINE = 512


class Framing(enum.Enum):
    """What ``CommandFramer.next_line`` found, when it is not a command line."""

    #: No whole line held yet: wait for more bytes.
    NEED_MORE = "need more"
    #: The tail of an over-long line was discarded; carry on with what follows.
    SKIPPED = "skipped"
    #: A line over the limit (its start discarded; its tail, if still to come, will be too).
    TOO_LONG = "too long"
    #: A CR or LF that is not part of a CRLF.
    BARE_LINE_END = "bare line end"


def line_limit(line: bytes, in_exchange: bool) -> int:
    """512 octets for a command; RFC 4954's 12288 for AUTH and its response lines."""
    if in_exchange or line[:5].upper() == b"AUTH ":
        return sasl.MAX_RESPONSE_LINE
    return MAX_COMMAND_LINE


class CommandFramer:
    """The input held for one session, split into command lines one at a time."""

    __slots__ = ("buffer", "_skipping_line")

    def __init__(self) -> None:
        #: Received bytes not yet taken (pipelined commands, the start of a line, DATA).
        self.buffer = b""
        self._skipping_line = False

    def clear(self) -> None:
        """Forget everything held (STARTTLS: what was pipelined behind it is never run)."""
        self.buffer = b""
        self._skipping_line = False

    def next_line(self, in_exchange: bool) -> bytes | Framing:
        """The next command line without its CRLF, or what stands in the way of one.

        ``in_exchange``: an AUTH exchange waits for a response line (the longer limit).
        """
        buffer = self.buffer
        newline = buffer.find(b"\n")
        if self._skipping_line:
            # The tail of an over-long line: discarded up to and including its line end.
            if newline < 0:
                self.buffer = b""
                return Framing.NEED_MORE
            self.buffer = buffer[newline + 1 :]
            self._skipping_line = False
            return Framing.SKIPPED
        if newline < 0:
            if len(buffer) > line_limit(buffer, in_exchange):
                self.buffer = b""
                self._skipping_line = True
                return Framing.TOO_LONG
            if b"\r" in buffer[:-1]:
                return Framing.BARE_LINE_END
            return Framing.NEED_MORE
        line, self.buffer = buffer[:newline], buffer[newline + 1 :]
        if not line.endswith(b"\r") or b"\r" in line[:-1]:
            return Framing.BARE_LINE_END
        if len(line) + 1 > line_limit(line, in_exchange):
            return Framing.TOO_LONG
        return line[:-1]
