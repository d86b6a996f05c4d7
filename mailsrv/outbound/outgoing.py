"""
What goes on the wire for one queued message (blocking I/O: run it in a worker thread).

The relay client asks, just before each ``MAIL FROM``, for the message as this server will
take it: its size on the wire (RFC 1870's ``SIZE=``: CRLF line ends, dot-stuffing not
counted), whether it has 8-bit octets (``BODY=8BITMIME``), and, for a server that does not
offer 8BITMIME, a 7-bit copy (:mod:`mailsrv.outbound.mime7bit`) written to ``incoming/``, which
start-up empties, so a crash leaves nothing behind.  The queued body is never changed: the
next host may take 8 bits.  Reading the message once more costs little next to sending it,
and knowing the size first lets a message too big for the server be refused here rather than
sent in full only to be refused after the data (as Postfix does).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from mailsrv import replies
from mailsrv.message import headsection
from mailsrv.outbound.mime7bit import ConversionError, to_7bit
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.outbound.utf8 import needs_smtputf8
from mailsrv.replies import Reply

__all__ = ["Outgoing", "measure", "prepare"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Outgoing:
    """The bytes to send for a transaction: ``prefix`` then the file at ``path``."""

    size: int  # octets on the wire, for SIZE=
    eight_bit: bool  # needs BODY=8BITMIME
    prefix: bytes
    path: Path
    temporary: bool = False  # ``path`` is a converted copy, ours to remove
    #: The header section (our trace fields included) has non-ASCII octets; only looked at
    #: for a message that needs SMTPUTF8 (mailsrv.outbound.utf8).
    head_utf8: bool = False

    def discard(self) -> None:
        """Remove the converted copy, if this is one (the queued body is never touched)."""
        if self.temporary:
            with suppress(FileNotFoundError):
                os.unlink(self.path)


def measure(prefix: bytes, path: Path) -> tuple[int, bool]:
    """(size on the wire, has 8-bit octets) of ``prefix`` followed by the file's content."""
    size = len(prefix) + prefix.count(b"\n")
    eight_bit = not prefix.isascii()
    with open(path, "rb") as body:
        while chunk := body.read(_CHUNK):
            size += len(chunk) + chunk.count(b"\n")
            eight_bit = eight_bit or not chunk.isascii()
    return size, eight_bit


def prepare(
    transaction: OutboundTransaction, eight_bit_ok: bool, workdir: Path
) -> Outgoing | Reply:
    """The message to send to a server (which offers 8BITMIME or not), or why it cannot be.

    A Reply is the verdict for all the transaction's recipients: ``554 5.6.3`` for an
    8-bit message that cannot be converted for a 7-bit server, ``451 4.3.0`` when the
    queued body cannot be read (the recipients wait).
    """
    try:
        size, eight_bit = measure(transaction.prefix, transaction.body_path)
        if not eight_bit or eight_bit_ok:
            return Outgoing(size, eight_bit, transaction.prefix, transaction.body_path,
                            head_utf8=eight_bit and _head_utf8(transaction))
        return _downgrade(transaction, Path(workdir))
    except ConversionError as e:
        return replies.CANNOT_CONVERT_8BIT.format(error=str(e))
    except OSError as e:
        return replies.CANNOT_READ_QUEUED.format(error=str(e))


def _head_utf8(transaction: OutboundTransaction) -> bool:
    """Whether the header section has non-ASCII octets, for a message that needs SMTPUTF8."""
    if not needs_smtputf8(transaction.smtputf8, transaction.sender, transaction.recipients):
        return False
    with open(transaction.body_path, "rb") as body:
        head = headsection.read_head(body)
    section = (transaction.prefix + head).split(b"\n\n", 1)[0]
    return not section.isascii()


def _downgrade(transaction: OutboundTransaction, workdir: Path) -> Outgoing:
    """The 7-bit copy of the message, in a new file under ``workdir``."""
    fd, name = tempfile.mkstemp(prefix=f"{transaction.queue_id}.7bit.", dir=workdir)
    path = Path(name)
    try:
        with open(fd, "wb") as out, open(transaction.body_path, "rb") as body:

            def lines() -> itertools.chain[bytes]:
                body.seek(0)
                return itertools.chain(transaction.prefix.splitlines(keepends=True), body)

            to_7bit(lines, out.write)
        size, _ = measure(b"", path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return Outgoing(size, False, b"", path, temporary=True)
