"""
The spool file of a ``BODY=BINARYMIME`` message made text in place (blocking I/O: a delivery
thread, before the checks).

The chunks were spooled as they came (mailsrv.inbound.chunkscan); mailsrv.message.binarymime
writes their text form to a file beside the spool file, which then takes the spool file's
name, so that everything after — the checks, DKIM, the store, the relayer — reads a text
message as it does for DATA. The binary original is mapped into memory, never read whole.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from mailsrv import replies
from mailsrv.message.binarymime import BinaryMimeError, to_text
from mailsrv.replies import Refusal

__all__ = ["make_text"]


def make_text(path: Path) -> int:
    """Replace the binary message at ``path`` by its text form; return the new size.

    Raises Refusal (``554 5.6.0``, its reason for the log line) when it cannot be made text,
    OSError when the disk fails; the spool file is then left as it was."""
    converted = path.with_name(path.name + ".text")
    fd = os.open(converted, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=256 * 1024) as out, open(path, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            if size:
                with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    to_text(data, size, out.write)
            text_size = out.tell()
        os.replace(converted, path)
    except BinaryMimeError as e:
        _remove(converted)
        reason = str(e).encode("ascii", "backslashreplace").decode("ascii")
        raise Refusal(replies.BINARYMIME_NOT_CONVERTED.format(reason=reason),
                      reason=f"binary MIME not converted: {reason}") from None
    except BaseException:
        _remove(converted)
        raise
    return text_size


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
