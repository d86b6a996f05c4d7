"""
DATA (RFC 5321 §4.1.1.4) in the session core, and the end of a message however it came.

A part of ``session.SMTPSession`` kept in a module of its own, without I/O like the rest of it.
After ``354`` the session hands everything held to ``datascan.DataScanner`` (mode ``DATA``)
until the final dot; ``end_message`` ends a message for DATA and for the last BDAT chunk
(mailsrv.inbound.chunking) alike: refused for what was wrong with its data, else checked and
stored by the transaction, ``250`` only once every copy is durable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Union

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv import replies
from mailsrv.inbound.datascan import DataError, DataScanner
from mailsrv.inbound.framing import CommandFramer
from mailsrv.replies import Refusal, Reply

if TYPE_CHECKING:
    from mailsrv.inbound.message_intake import Transaction
    from mailsrv.runtime import Runtime

Result = Union[Reply, "defer.Deferred[Reply]", None]

#: The session's modes: reading commands; from ``354`` to the final dot (a BDAT chunk's is
#: chunking.CHUNK, the end of the session session.CLOSING).
COMMAND, DATA = "COMMAND", "DATA"

_DATA_REPLIES = {
    DataError.BARE_LINE_END: replies.BARE_LINE_END,
    DataError.LINE_TOO_LONG: replies.DATA_LINE_TOO_LONG,
    DataError.TOO_BIG: replies.SIZE_EXCEEDS_LIMIT,
}

log = Logger(namespace="mailsrv.smtp.MailsrvESMTP")


class MessageData:
    """DATA and the end of a message for ``SMTPSession``: the attributes below are the
    session's."""

    __slots__ = ()

    runtime: "Runtime"
    mode: str
    junk_commands: int
    _framer: CommandFramer
    _transaction: "Transaction | None"
    _scanner: DataScanner | None
    _on_activity: Callable[[], None]
    _error: Callable[[Reply], Reply]
    _abort_transaction: Callable[[], None]
    data_refusal: Callable[[], Reply | None]

    def do_DATA(self, rest: bytes) -> Reply:
        if rest:
            return self._error(replies.NO_ARGUMENTS_ALLOWED.format(verb="DATA"))
        transaction = self._transaction
        if transaction is None:
            return self._error(replies.NEED_MAIL)
        if not transaction.recipients:
            return self._error(replies.NEED_RCPT)
        refused = self.data_refusal()
        if refused is not None:
            return self._error(refused)
        try:
            transaction.open_spool()
        except Refusal as e:
            self._abort_transaction()
            return e.reply
        self._scanner = DataScanner(transaction.write, self.runtime.config.smtp.max_message_size)
        self.mode = DATA
        return replies.START_DATA

    def _feed_data(self) -> Result:
        """All DATA held, to the scanner: None while the message goes on."""
        assert self._scanner is not None
        self._on_activity()
        framer = self._framer
        data, framer.buffer = framer.buffer, b""  # (no copy: the chunk itself, usually)
        after = self._scanner.feed(data)
        if after is None:
            return None
        framer.buffer = after
        self.mode = COMMAND
        return self._end_of_data()

    def _end_of_data(self) -> Result:
        assert self._scanner is not None and self._transaction is not None
        scanner, transaction = self._scanner, self._transaction
        self._scanner = self._transaction = None
        return self.end_message(transaction, scanner.error, scanner.size)

    def end_message(self, transaction: "Transaction", error: DataError | None, size: int) -> Result:
        """The end of a message (the final dot, the last BDAT chunk): refused for what was
        wrong with its data, else checked and stored, ``250`` once it is durable."""
        if error is not None:
            transaction.refuse(error.value, size)
            return self._error(_DATA_REPLIES[error])

        def accepted(queue_id: str) -> Reply:
            self.junk_commands = 0  # as Postfix: mail delivered, the client is no junk talker
            return replies.QUEUED.format(queue_id=queue_id)

        def failed(failure: Failure) -> Reply:
            if failure.check(Refusal):
                return failure.value.reply
            log.failure("delivery failed", failure)
            return replies.LOCAL_ERROR

        return transaction.eomReceived().addCallbacks(accepted, failed)
