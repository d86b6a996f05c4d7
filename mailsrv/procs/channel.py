"""
The link between the parent and one receiving process: one end of a ``SOCK_SEQPACKET`` Unix
socket pair, read by the reactor.

A seqpacket socket keeps each message whole (no framing to parse) and carries a file
descriptor with a message (SCM_RIGHTS): the parent hands an accepted connection over with the
message that says which listener it came from.  Messages are short ASCII words:

- parent to child: ``conn <listener> <client address>`` with the connection's descriptor;
- child to parent: ``closed <client address>`` (a connection from there ended: the parent
  counts connections per address, the limits' unit; ``-`` for none), ``queued <queue id>
  <envelope>`` (a message entered the queue: the relayer, in the parent, sends it at once;
  the envelope is ``mailsrv.storage.envelope.encode_line``'s, or ``-`` when it would not fit
  in a message), ``ready`` (it takes connections from now on), ``metrics <json>`` (its
  counters' events: mailsrv.procs.metricsrelay). The last field of ``queued`` and
  ``metrics`` may hold spaces.

``encode``/``decode`` are the pure part; ``Channel`` the I/O.
"""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Channel", "encode", "decode", "KINDS", "SEND_BYTES", "pair"]

log = Logger(namespace="mailsrv")

#: The messages' first words, and how many words follow each.
KINDS = {b"conn": 2, b"closed": 1, b"queued": 2, b"ready": 0, b"metrics": 1}
#: The kinds whose last field may hold spaces.
SPACED = frozenset((b"queued", b"metrics"))

#: The longest message read.
_MAX_MESSAGE = 1 << 17
#: The most bytes a sender puts in one message (a batch of counters' events, an envelope):
#: well under _MAX_MESSAGE and the socket's send buffer (about 208 KiB by default).
SEND_BYTES = 60000
#: Messages read in one turn of the reactor before the others get theirs.
_READS_PER_TURN = 64


def encode(kind: str, *fields: str | int) -> bytes:
    """One message; ValueError for an unknown kind, a wrong number of fields, an empty field
    or a space in a field (but the last of a SPACED kind)."""
    word = kind.encode("ascii")
    if KINDS.get(word) != len(fields):
        raise ValueError(f"bad channel message {kind} {fields!r}")
    parts = [word]
    for n, value in enumerate(fields, 1):
        text = str(value).encode("ascii")
        if not text or (b" " in text and (n < len(fields) or word not in SPACED)):
            raise ValueError(f"bad channel field {value!r}")
        parts.append(text)
    return b" ".join(parts)


def decode(data: bytes) -> tuple[str, list[str]]:
    """(kind, fields) of one message; ValueError when it is not one of KINDS."""
    kind = data.split(b" ", 1)[0]
    count = KINDS.get(kind)
    words = data.split(b" ", count if kind in SPACED else -1)
    if count is None or len(words) - 1 != count or not all(words[1:]):
        raise ValueError(f"bad channel message {data[:80]!r}")
    return words[0].decode("ascii"), [w.decode("ascii") for w in words[1:]]


def pair() -> tuple[socket.socket, socket.socket]:
    """(parent's end, child's end); only the child's end is inheritable."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child.set_inheritable(True)
    return parent, child


class Channel:
    """One end: ``on_message(kind, fields, fd)`` for each message read (``fd`` the descriptor
    that came with it, or None; the callee owns it), ``on_lost()`` once the other end is gone.
    ``send`` never blocks: what the socket cannot take now waits in order for the writer."""

    def __init__(
        self, sock: socket.socket, reactor: Any,
        on_message: Callable[[str, list[str], int | None], None],
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.reactor = reactor
        self.on_message = on_message
        self.on_lost = on_lost
        self._out: collections.deque[tuple[bytes, int | None]] = collections.deque()
        self._writing = False
        self.closed = False
        reactor.addReader(self)

    # IReadDescriptor / IWriteDescriptor
    def fileno(self) -> int:
        return -1 if self.closed else self.sock.fileno()

    def logPrefix(self) -> str:
        return "mailsrv-channel"

    def doRead(self) -> None:
        for _ in range(_READS_PER_TURN):
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, _MAX_MESSAGE, 1)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                self.close()
                return
            fd = fds[0] if fds else None
            try:
                kind, fields = decode(data)
            except ValueError:
                if fd is not None:
                    os.close(fd)
                log.failure("channel: message {data!r} not understood", Failure(),
                            data=data[:80])
                continue
            try:
                # The descriptor is on_message's from here, even when it raises (closing it
                # again here closed it twice, and EBADF ended the channel and the process).
                self.on_message(kind, fields, fd)
            except Exception:
                log.failure("channel: message {data!r} not handled", Failure(), data=data[:80])

    def send(self, data: bytes, fd: int | None = None) -> bool:
        """Send (or queue) one message; False when the channel is closed (``fd`` not sent)."""
        if self.closed:
            return False
        if self._out:
            self._out.append((data, None if fd is None else os.dup(fd)))
            return True
        try:
            self._send(data, fd)
        except BlockingIOError:
            self._out.append((data, None if fd is None else os.dup(fd)))
            self._start_writing()
        except OSError:
            self.close()
            return False
        return True

    def _send(self, data: bytes, fd: int | None) -> None:
        if fd is None:
            self.sock.send(data)
        else:
            socket.send_fds(self.sock, [data], [fd])

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self.reactor.addWriter(self)

    def doWrite(self) -> None:
        while self._out:
            data, fd = self._out[0]
            try:
                self._send(data, fd)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            self._out.popleft()
            if fd is not None:
                os.close(fd)
        self._writing = False
        self.reactor.removeWriter(self)

    def connectionLost(self, reason: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.reactor.removeReader(self)
        if self._writing:
            self.reactor.removeWriter(self)
            self._writing = False
        self.closed = True
        for _, fd in self._out:
            if fd is not None:
                os.close(fd)
        self._out.clear()
        self.sock.close()
        self.on_lost()
