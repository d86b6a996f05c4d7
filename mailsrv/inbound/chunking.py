"""
BDAT (RFC 3030 CHUNKING) in the session core: the message as counted chunks.

A part of ``session.SMTPSession`` kept in a module of its own, without I/O like the rest of it.
``BDAT <n> [LAST]`` is followed by exactly n octets of message, never read as lines: the
session reads them in mode ``CHUNK`` (``feed_chunk``) and answers once the n-th has come, so
that the session stays in step with the client whatever the reply. Every chunk with a valid
size is read whole, also one that is refused (no MAIL, no RCPT, an earlier chunk failed):
RFC 3030 §2 has a pipelining client send its chunks without waiting, and their octets must
never be taken as commands.

The chunks go to the same spool file as DATA, through ``chunkscan.ChunkScanner`` (the same
size limit and bare CR/LF and line length rules as DATA, without dot-stuffing), and the last
one ends the message the way the final dot does (``SMTPSession.end_message``: the checks, the
store, ``250`` only once it is durable).

A failed chunk (too big, a bare line end, a bad size argument in a transaction under way) ends
the transaction: its spool file is removed, and every further BDAT is read and answered
``503 5.5.1`` until RSET, MAIL (which starts a new transaction) or EHLO; so is DATA after BDAT
in one transaction, which RFC 3030 forbids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Union

from twisted.internet import defer
from twisted.logger import Logger

from mailsrv import replies
from mailsrv.inbound.chunkscan import ChunkScanner, parse_bdat
from mailsrv.inbound.dataphase import COMMAND
from mailsrv.inbound.datascan import DataError
from mailsrv.inbound.framing import CommandFramer
from mailsrv.replies import Refusal, Reply

if TYPE_CHECKING:
    from mailsrv.inbound.message_intake import Transaction
    from mailsrv.runtime import Runtime

ChunkResult = Union[Reply, "defer.Deferred[Reply]", None]

#: The session's mode while it reads a chunk's octets.
CHUNK = "CHUNK"

log = Logger(namespace="mailsrv.smtp.MailsrvESMTP")


class ChunkState:
    """The BDAT side of one transaction: its scanner and the chunk being read."""

    __slots__ = ("scanner", "remaining", "last", "refusal")

    def __init__(self, scanner: ChunkScanner | None) -> None:
        #: None while a refused chunk is read only to be discarded.
        self.scanner = scanner
        self.remaining = 0  # octets of the current chunk still to read
        self.last = False  # the current chunk is the last one
        self.refusal: Reply | None = None  # the reply a discarded chunk gets


class Chunking:
    """BDAT for ``SMTPSession``: the attributes below are the session's."""

    __slots__ = ()

    runtime: "Runtime"
    mode: str
    _framer: CommandFramer
    _transaction: "Transaction | None"
    _chunks: ChunkState | None
    _bdat_failed: bool
    _on_activity: Callable[[], None]
    _error: Callable[[Reply], Reply]
    _abort_transaction: Callable[[], None]
    end_message: Callable[["Transaction", DataError | None, int], ChunkResult]

    def do_BDAT(self, rest: bytes) -> ChunkResult:
        parsed = parse_bdat(rest)
        if parsed is None:
            # The client's octets follow, but how many is unknown: they will be read as
            # commands (and mostly refused); a transaction under way cannot go on.
            if self._chunks is not None and self._chunks.scanner is not None:
                self._fail_chunks()
            return self._error(replies.BDAT_SYNTAX)
        size, last = parsed
        chunks = self._chunks
        if chunks is None or chunks.scanner is None:
            refusal = self._chunk_refusal()
            if refusal is None:
                assert self._transaction is not None
                try:
                    self._transaction.open_spool()
                except Refusal as e:
                    self._abort_transaction()
                    self._bdat_failed = True
                    refusal = e.reply
                else:
                    chunks = ChunkState(ChunkScanner(
                        self._transaction.write, self.runtime.config.smtp.max_message_size,
                        binary=self._transaction.binary))
            if refusal is not None:
                chunks = ChunkState(None)
                chunks.refusal = refusal
            self._chunks = chunks
        assert chunks is not None
        chunks.remaining, chunks.last = size, last
        if size == 0:
            return self._chunk_done()
        self.mode = CHUNK
        return None

    def _chunk_refusal(self) -> Reply | None:
        """Why a BDAT that starts a transaction's chunks is refused, or None."""
        if self._bdat_failed:
            return replies.BDAT_AFTER_FAILURE
        if self._transaction is None:
            return replies.NEED_MAIL
        if not self._transaction.recipients:
            return replies.NEED_RCPT
        return None

    def feed_chunk(self) -> ChunkResult:
        """Octets held, to the current chunk: None while it goes on, its reply at its end."""
        chunks = self._chunks
        assert chunks is not None
        self._on_activity()
        framer = self._framer
        held = framer.buffer
        if len(held) <= chunks.remaining:
            data, framer.buffer = held, b""
        else:
            data, framer.buffer = held[: chunks.remaining], held[chunks.remaining :]
        chunks.remaining -= len(data)
        if chunks.scanner is not None:
            chunks.scanner.feed(data)
        if chunks.remaining:
            return None
        self.mode = COMMAND
        return self._chunk_done()

    def _chunk_done(self) -> ChunkResult:
        """A whole chunk was read: its reply."""
        chunks = self._chunks
        assert chunks is not None
        scanner = chunks.scanner
        if scanner is None:  # read only to be discarded
            self._chunks = None
            assert chunks.refusal is not None
            if chunks.refusal is replies.BDAT_AFTER_FAILURE:
                # No client error: RFC 3030 §2 has the server take the chunks a pipelining
                # client sent before it saw the failure (the failure itself was counted).
                return chunks.refusal
            return self._error(chunks.refusal)
        if chunks.last:
            scanner.finish()
        if scanner.error is None and not chunks.last:
            return replies.CHUNK_RECEIVED.format(size=str(scanner.size))
        transaction = self._transaction
        assert transaction is not None
        self._chunks = self._transaction = None
        if scanner.error is not None:
            self._bdat_failed = True
        return self.end_message(transaction, scanner.error, scanner.size)

    def _fail_chunks(self) -> None:
        """The transaction's chunks cannot go on: nothing of it is kept."""
        self._abort_transaction()
        self._chunks = None
        self._bdat_failed = True

    def data_refusal(self) -> Reply | None:
        """DATA's reply when the transaction's chunks (RFC 3030 §2) or its BODY=BINARYMIME
        (§3: BDAT only; the transaction's state is then undefined, so it ends) rule it out,
        else None."""
        if self._chunks is not None:
            self._fail_chunks()
            return replies.DATA_AFTER_BDAT
        if self._transaction is not None and self._transaction.binary:
            self._abort_transaction()
            return replies.DATA_AFTER_BINARYMIME
        return None

    def reset_chunks(self) -> None:
        """RSET, MAIL, EHLO: a new transaction may use BDAT again."""
        self._chunks = None
        self._bdat_failed = False
