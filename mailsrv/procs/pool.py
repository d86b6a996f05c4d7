"""
``[server] processes`` > 1: the parent (the ``twistd`` process systemd supervises) keeps the
listening sockets it opened before dropping privileges, the relayer, the queue, the control
channel of ``mailsrv queue``, the daily report and ``/metrics``; N receiving processes
(mailsrv.procs.child) run the SMTP sessions, deliver into the Maildirs and write queue files
themselves.

- Connections: the parent accepts and hands each over (mailsrv.procs.dispatch), so the
  connection limits stay exact.
- New queue entries: a receiving process says ``queued <id> <envelope>`` on its channel the
  moment the message is durable, and the relayer sends it at once (the parent reads the
  envelope's file only when it was too long to come along).
- Lifetimes: a receiving process dies with the parent (PR_SET_PDEATHSIG, and the channel's
  end); one that dies is logged and started again, after 0.5 s doubling to 30 s while it
  keeps dying young.  What it had answered ``250`` was on disk before the ``250``.
- SIGHUP to the parent reloads the parent and is passed on to every receiving process.
- Logs: every line of a receiving process is in the server's log prefixed
  ``proc=<n> pid=<pid>``, written by the process itself when the log is twistd's standard
  output, relayed by the parent otherwise (mailsrv.procs.childlog).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsrv.inbound.listener import ConnectionCounter
from mailsrv.procs.channel import Channel, pair
from mailsrv.procs.dispatch import (
    Acceptor,
    Child,
    Dispatcher,
    RefusedFactory,
    Route,
    field_address,
)
from mailsrv.procs.metricsrelay import replay
from mailsrv.storage import envelope, queue

__all__ = ["ReceiverPool", "restart_delay"]

log = Logger(namespace="mailsrv")

#: A process that ran this long before dying is restarted after the first delay again.
HEALTHY_AFTER = 30.0
FIRST_DELAY, MAX_DELAY = 0.5, 30.0
#: Seconds the parent waits at start-up for every receiving process to be ready before it
#: accepts connections anyway (the ones ready take them).
START_WAIT = 15.0
#: Seconds the receiving processes get to finish at shutdown before SIGKILL.
STOP_GRACE = 10.0


def restart_delay(previous: float | None, lived: float) -> float:
    """The wait before restarting a process that lived ``lived`` seconds (``previous``: the
    wait before its last start, None for the first)."""
    if previous is None or lived >= HEALTHY_AFTER:
        return FIRST_DELAY
    return min(MAX_DELAY, previous * 2)


def check_interpreter(config: Any, executable: str = sys.executable) -> None:
    """ConfigError (``server.processes``) when the user the server runs as (the effective
    one: called under mailsrv.privileges.effective_user) cannot run ``executable``, which
    every receiving process is: found at start-up, not as a parent that listens and then
    dies spawning them."""
    from mailsrv.config import ConfigError

    if config.server.process_count <= 1:
        return
    if not os.access(executable, os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise ConfigError(
            config.source, "server.processes",
            f"{config.server.process_count} receiving processes, each run as "
            f"{executable}, which the server's user (uid {os.geteuid()}) cannot execute "
            "(a directory on its path not searchable?): make it runnable, or set processes = 1")


def routes_for(config: Any, listeners: list[Any], trusted: Any) -> list[Route]:
    """One Route per listener (see mailsrv.procs.dispatch)."""
    routes = []
    for listener in listeners:
        auth = listener.kind == "submission" or config.smtp.auth
        routes.append(Route(Route.AUTH if auth else Route.FEWEST, config.greylist.enabled,
                            trusted))
    return routes


class _ChildProtocol(protocol.ProcessProtocol):
    """One receiving process: its log lines relayed with ``proc=<n> pid=<pid>``."""

    def __init__(self, pool: "ReceiverPool", child: Child) -> None:
        self.pool = pool
        self.child = child
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self._relay(fd, line.decode("utf-8", "replace"))

    def _relay(self, fd: int, line: str) -> None:
        level = LogLevel.error
        if fd == 1:
            name, _, line = line.partition("\t")
            try:
                level = LogLevel.levelWithName(name)
            except Exception:
                level = LogLevel.info
        log.emit(level, "proc={proc} pid={pid} {line}", proc=self.child.index + 1,
                 pid=self.pool._pids.get(self.child.index, "-"), line=line)

    def processEnded(self, reason: Any) -> None:
        self.pool.ended(self.child, reason)


class ReceiverPool(service.Service):
    """Starts, watches and restarts the receiving processes; reads their channels."""

    def __init__(
        self, runtime: Any, counter: ConnectionCounter, listeners: list[Any], processes: int,
        straight_logs: bool = False,
    ) -> None:
        self.runtime = runtime
        self.straight_logs = straight_logs  # the children inherit the log (childlog)
        self.reactor = runtime.reactor
        self.listeners = listeners
        self.children = [Child(i) for i in range(processes)]
        refused = []
        for listener in listeners:
            inner = RefusedFactory(self.reactor)
            outer = (TLSMemoryBIOFactory(runtime.tls, False, inner)
                     if listener.description.startswith("ssl:") else inner)
            refused.append((inner, outer))
        self.dispatcher = Dispatcher(
            counter, self.children, self.reactor, runtime.metrics, refused,
            routes_for(runtime.config, listeners, runtime.may_relay))
        self._acceptors: list[Acceptor] = []
        self._processes: dict[int, Any] = {}  # index -> IProcessTransport
        self._started: dict[int, float] = {}
        self._pids: dict[int, int] = {}
        self._delays: dict[int, float] = {}
        self._stopped: dict[int, defer.Deferred] = {}
        self._stopping = False
        self._accepting = False
        self._accept_later: Any = None

    def startService(self) -> None:
        service.Service.startService(self)
        for index, listener in enumerate(self.listeners):
            port = listener.port
            port.stopReading()  # the parent's Acceptor reads it instead
            self._acceptors.append(Acceptor(port.socket, index, self.dispatcher))
        log.info("{n} receiving processes", n=len(self.children))
        for child in self.children:
            self._spawn(child)
        # Connections wait in the listen queue until every process is ready (or this long).
        self._accept_later = self.reactor.callLater(START_WAIT, self._accept)

    def _accept(self) -> None:
        """Start accepting (once)."""
        if self._accepting or self._stopping:
            return
        self._accepting = True
        if self._accept_later is not None and self._accept_later.active():
            self._accept_later.cancel()
        # "listening on" came before the processes started: this line says connections are
        # answered from now on (and by how many of them, when some were too slow).
        log.info("accepting connections: {ready} of {n} receiving processes ready",
                 ready=sum(c.ready for c in self.children), n=len(self.children))
        for acceptor in self._acceptors:
            self.reactor.addReader(acceptor)

    def _spawn(self, child: Child) -> None:
        if self._stopping:
            return
        mine, theirs = pair()
        args = [sys.executable, "-m", "mailsrv.procs.child", str(child.index + 1),
                str(os.getpid()), *(["straight"] if self.straight_logs else [])]
        proto = _ChildProtocol(self, child)
        try:
            process = self.reactor.spawnProcess(
                proto, sys.executable, args, env=dict(os.environ), path=os.getcwd(),
                childFDs={0: "w", 1: 1 if self.straight_logs else "r", 2: "r",
                          3: theirs.fileno()})
        except OSError as e:
            # Twisted's posix_spawn fails here, in the parent (its fork fails in the child):
            # the same backoff as a process that died at once, never the parent's end.
            mine.close()
            delay = restart_delay(self._delays.get(child.index), 0.0)
            self._delays[child.index] = delay
            log.error("receiving process proc={proc} not started: {executable}: {error}; "
                      "trying again in {delay:g}s", proc=child.index + 1,
                      executable=sys.executable, error=e.strerror or e, delay=delay)
            self.reactor.callLater(delay, self._spawn, child)
            return
        finally:
            theirs.close()
        # The configuration the parent runs with, and the users and aliases it has now: a
        # file broken since is not what a restarted process starts with.
        process.write(pickle.dumps((self.runtime.config, self.runtime.directory)))
        process.closeStdin()
        self._processes[child.index] = process
        self._pids[child.index] = process.pid
        self._started[child.index] = self.reactor.seconds()
        child.channel = Channel(
            mine, self.reactor,
            lambda kind, fields, fd, child=child: self._message(child, kind, fields, fd),
            lambda child=child: self.dispatcher.lost(child))
        log.info("receiving process proc={proc} pid={pid} started", proc=child.index + 1,
                 pid=process.pid)

    def _message(self, child: Child, kind: str, fields: list[str], fd: int | None) -> None:
        if fd is not None:
            os.close(fd)  # a receiving process never sends one
        if kind == "closed":
            self.dispatcher.closed(child, field_address(fields[0]))
        elif kind == "queued":
            self.queued(fields[0], fields[1])
        elif kind == "metrics":
            counts = replay(self.runtime.metrics, fields[0])
            child.gauge += counts["connection_opened"] - counts["connection_closed"]
        elif kind == "ready":
            child.ready = True
            log.info("receiving process proc={proc} ready", proc=child.index + 1)
            if all(c.ready for c in self.children):
                self._accept()

    def queued(self, queue_id: str, line: str) -> None:
        """A receiving process queued a message: the relayer takes it now (unless its
        start-up scan of the queue found it already), with the envelope *line* that came
        along (``encode_line``'s), or read from the file when that is ``-``."""
        relayer = self.runtime.relayer  # its add() ignores a message it has or finished
        queue.check_queue_id(queue_id)
        if line != "-":
            try:
                message = envelope.decode(line)
                if message.id != queue_id:
                    raise ValueError(f"it holds id {message.id!r}")
            except ValueError as e:
                log.error("queue id={id}: the envelope sent with the notice does not decode "
                          "({error}); reading its file", id=queue_id, error=e)
            else:
                relayer.add(message)
                return
        path = Path(self.runtime.config.queue.path) / "messages" / f"{queue_id}.json"
        d = self.runtime.in_thread(queue.read_message, path)

        def failed(failure: Any) -> None:
            if failure.check(FileNotFoundError):
                return  # sent and removed by the relayer since (its scan found it)
            log.failure("queue id={id}: not handed to the relayer", failure, id=queue_id)

        d.addCallbacks(relayer.add, failed)

    def ended(self, child: Child, reason: Any) -> None:
        self._processes.pop(child.index, None)
        pid = self._pids.pop(child.index, "-")
        if child.channel is not None:
            child.channel.close()
        self.dispatcher.lost(child)
        # Its connections went with it: the parent's gauge of open ones forgets them.
        self.runtime.metrics.connections_open.dec(child.gauge)
        child.gauge = 0
        waiting = self._stopped.pop(child.index, None)
        if waiting is not None:
            waiting.callback(None)
        if self._stopping:
            log.info("receiving process proc={proc} stopped", proc=child.index + 1)
            return
        lived = self.reactor.seconds() - self._started.get(child.index, 0.0)
        delay = restart_delay(self._delays.get(child.index), lived)
        self._delays[child.index] = delay
        log.error("receiving process proc={proc} pid={pid} ended after {lived:.1f}s "
                  "({why}); starting it again in {delay:g}s", proc=child.index + 1, pid=pid,
                  lived=lived, why=reason.getErrorMessage(), delay=delay)
        self.reactor.callLater(delay, self._spawn, child)

    def sighup(self) -> None:
        """Pass SIGHUP on: every receiving process reloads as the parent does."""
        for process in list(self._processes.values()):
            try:
                process.signalProcess(signal.SIGHUP)
            except Exception:
                pass  # it is ending; its successor reads the files anew

    def stopService(self) -> Any:
        service.Service.stopService(self)
        self._stopping = True
        if self._accept_later is not None and self._accept_later.active():
            self._accept_later.cancel()
        for acceptor in self._acceptors:
            self.reactor.removeReader(acceptor)
        self._acceptors = []
        waits = []
        for index, process in list(self._processes.items()):
            d = self._stopped[index] = defer.Deferred()
            waits.append(d)
            try:
                process.signalProcess("TERM")
            except Exception:
                continue
            self.reactor.callLater(STOP_GRACE, self._kill, index)
        return defer.DeferredList(waits) if waits else None

    def _kill(self, index: int) -> None:
        process = self._processes.get(index)
        if process is not None:
            try:
                process.signalProcess("KILL")
            except Exception:
                pass
