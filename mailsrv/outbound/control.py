"""
The running server's side of ``mailsrv queue flush|delete|bounce``: ``<queue>/control/``.

Only the server may change a queue it is delivering (it holds the messages in memory and
writes their state), so the command leaves a request file (mailsrv.storage.queue_control.control_request) and
waits for the answer.  This channel looks into ``control/`` every :data:`CONTROL_POLL` seconds,
asks the relayer to act, and writes the answer (``ok: ...`` or ``error: ...``) where the
command reads it.  One bad request is answered with its error and never stops the polling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger

from mailsrv.storage import queue_control
from mailsrv.storage.envelope import QueuedMessage
from mailsrv.storage.queue_control import EXTRA_ACTIONS

__all__ = ["CONTROL_POLL", "QueueActions", "ControlChannel"]

log = Logger(namespace="mailsrv")

#: Seconds between looks into queue/control/ for requests of ``mailsrv queue``.
CONTROL_POLL = 1.0


class QueueActions(Protocol):
    """What the channel asks of the relayer (mailsrv.outbound.relayer.Relayer provides it)."""

    messages: Mapping[str, QueuedMessage]

    def flush(self, queue_ids: list[str]) -> None:
        """Make every recipient still queued of these messages due now."""

    def delete(self, queue_id: str) -> defer.Deferred:
        """Drop the message from the queue, without a word to anybody; fires when gone."""

    def bounce(self, queue_id: str) -> defer.Deferred:
        """Return the message to its sender; fires once the DSN and the state are stored."""


class ControlChannel:
    """Polls ``<qdir>/control/`` on ``reactor`` while ``ready()``; answers in ``in_thread``."""

    def __init__(
        self,
        qdir: Path,
        reactor: Any,
        actions: QueueActions,
        *,
        in_thread: Callable[..., defer.Deferred],
        ready: Callable[[], bool],
        interval: float = CONTROL_POLL,
    ) -> None:
        self.qdir = Path(qdir)
        self.reactor = reactor
        self.actions = actions
        self.in_thread = in_thread
        self.ready = ready
        self.interval = interval
        self._loop: task.LoopingCall | None = None
        #: Requests beyond the queue's: action -> what answers it (``tlsreport``: the
        #: TLS-RPT reporter's send_now, mailsrv.outbound.tlsrpt.reporter).
        self.extra: dict[str, Callable[[], str | defer.Deferred]] = {}

    def start(self) -> None:
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("queue control polling stopped", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def poll(self) -> None:
        """Answer every request waiting in ``control/`` (none before the queue is loaded)."""
        if not self.ready():
            return
        for request in queue_control.control_requests(self.qdir):
            try:
                text = self.handle(request)
            except Exception as e:  # never let one bad request stop the polling
                text = f"error: {e}"
            if isinstance(text, defer.Deferred):
                text.addCallback(lambda t, r=request: self._answer(r, t))
            else:
                self._answer(request, text)

    def handle(self, request: queue_control.ControlRequest) -> str | defer.Deferred:
        """The answer to one request, or a Deferred of it (once the change is on disk)."""
        if request.action in self.extra:
            return self.extra[request.action]()
        if request.action in EXTRA_ACTIONS:
            return f"error: the server does not do {request.action} (see its configuration)"
        messages = self.actions.messages
        if request.action == "flush":
            ids = [request.queue_id] if request.queue_id else list(messages)
            if request.queue_id and request.queue_id not in messages:
                return f"error: no message {request.queue_id} in the queue"
            self.actions.flush(ids)
            return f"ok: {len(ids)} message(s) scheduled for delivery now"
        message = messages.get(request.queue_id or "")
        if message is None:
            return f"error: no message {request.queue_id} in the queue"
        if request.action == "delete":
            return self.actions.delete(message.id).addCallback(
                lambda _: f"ok: deleted {message.id}")
        return self.actions.bounce(message.id).addCallback(
            lambda _: f"ok: bounced {message.id}"
            + ("" if message.sender else " (from <>: no DSN sent)"))

    def _answer(self, request: queue_control.ControlRequest, text: str) -> None:
        log.info("queue {action} {target}: {answer}", action=request.action,
                 target=request.queue_id or "all", answer=text)
        self.in_thread(queue_control.control_answer, self.qdir, request, text + "\n")
