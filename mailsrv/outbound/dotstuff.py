"""
The message data as SMTP and LMTP send it: the spool's LF line ends as CRLF, and a line that
starts with a dot doubled (RFC 5321 §4.5.2), across the chunks a file is read in.  Pure.
"""

from __future__ import annotations

__all__ = ["DotStuffer"]


class DotStuffer:
    """LF to CRLF and dot-stuffing, correct across chunk boundaries and on the first line
    (the spool keeps LF line ends; SMTP and LMTP send CRLF); ``at_line_start`` tells how the
    data ended."""

    def __init__(self) -> None:
        self.at_line_start = True

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        if self.at_line_start and chunk[:1] == b".":
            chunk = b"." + chunk
        self.at_line_start = chunk[-1:] == b"\n"
        return chunk.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
