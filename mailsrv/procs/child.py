"""
A receiving process: ``python -m mailsrv.procs.child <n> <parent pid> [straight]``, started by
the parent (mailsrv.procs.pool) with the configuration and the users and aliases on its
standard input (pickled: exactly the parent's, never a file edited or broken since) and its
channel on file descriptor 3.

It runs the SMTP sessions of the connections the parent hands over, delivers into the
Maildirs and writes queue files itself, and tells the parent of every message it queued.
Its log events go to standard output: the server's log itself when twistd logs to its own
standard output, a pipe to the parent otherwise (mailsrv.procs.childlog).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.logger import Logger, globalLogBeginner
from zope.interface import implementer

from mailsrv.interfaces import IRelayer
from mailsrv.procs.childlog import RelayedLines, StraightLines

__all__ = ["ParentRelayer", "main"]

log = Logger(namespace="mailsrv")

#: The channel's descriptor, as the parent's childFDs place it.
CHANNEL_FD = 3
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL when the parent dies (Linux prctl); exit now if it is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the channel's end stops this process instead
    if os.getppid() != parent:
        os._exit(1)


@implementer(IRelayer)
class ParentRelayer:
    """The relayer as a receiving process sees it: the parent's, told over the channel."""

    def __init__(self, send: Any) -> None:
        self.send = send

    def add(self, message: Any) -> None:
        """With its envelope, which spares the parent reading the file the moment it was
        written; one too long for a message (thousands of recipients) is read there."""
        from mailsrv.procs.channel import SEND_BYTES, encode
        from mailsrv.storage.envelope import encode_line

        line = encode_line(message)
        self.send(encode("queued", message.id, line if len(line) < SEND_BYTES else "-"))


class Receiver:
    """Starts the runtime and the listeners' factories, and takes the parent's connections."""

    def __init__(self, index: int, config: Any, directory: Any, reactor: Any) -> None:
        self.index = index
        self.config = config
        self.directory = directory
        self.reactor = reactor
        self.factories: list[Any] = []
        self.channel: Any = None

    def start(self) -> None:
        from mailsrv.procs.channel import Channel, encode
        from mailsrv.procs.dispatch import HandedConnections, owns_network
        from mailsrv.procs.metricsrelay import MetricsRelay
        from mailsrv.runtime import Runtime
        from mailsrv.service import Reloader, SpareFilesService, listener_factories
        from mailsrv.startup import load_dkim, load_tls

        config, reactor = self.config, self.reactor
        sock = socket.socket(fileno=CHANNEL_FD)
        self.channel = Channel(sock, reactor, self.message, self.lost)
        processes = config.server.process_count
        metrics = MetricsRelay(lambda payload: self.channel.send(encode("metrics", payload)),
                               reactor)
        runtime = Runtime.build(
            config, self.directory, reactor, tls=load_tls(config),
            relayer=lambda runtime: ParentRelayer(self.channel.send), dkim=load_dkim(config),
            spare=f"proc{self.index}", metrics=metrics,
            greylist_owns=lambda network: owns_network(network, self.index - 1, processes))
        counter = HandedConnections(self.channel.send)
        self.factories = [made[3] for made in listener_factories(runtime, counter)]
        top = service.MultiService()
        assert runtime.spool_files is not None
        SpareFilesService(runtime.spool_files).setServiceParent(top)
        reloader = Reloader(runtime)
        reloader.setServiceParent(top)
        top.startService()
        # The users and aliases came from the parent: read again in case the files changed
        # since (a broken file is refused, and the parent's kept).
        reloader.reload_directory("receiving process start")
        reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
        reactor.addSystemEventTrigger("before", "shutdown", metrics.stop)
        self.channel.send(encode("ready"))

    def message(self, kind: str, fields: list[str], fd: int | None) -> None:
        if kind != "conn" or fd is None:
            if fd is not None:
                os.close(fd)
            return
        from mailsrv.procs.channel import encode

        listener, ip = int(fields[0]), fields[1]
        try:
            family = socket.socket(fileno=os.dup(fd))
            try:
                kind_of = family.family
            finally:
                family.close()
            # The factory counts it (HandedConnections), and tells the parent when it ends.
            self.reactor.adoptStreamConnection(fd, kind_of, self.factories[listener])
        except OSError as e:
            # The client reset the connection after the parent accepted it (Twisted asks for
            # the peer's name first: ENOTCONN). No session: the parent stops counting it.
            log.info("connection gone before its session: {error}", error=e.strerror or e)
            self.channel.send(encode("closed", ip))
        finally:
            os.close(fd)

    def lost(self) -> None:
        """The parent is gone (or closed the channel): stop."""
        if self.reactor.running:
            self.reactor.stop()


def main(argv: list[str]) -> None:
    index, parent = int(argv[1]), int(argv[2])
    die_with_parent(parent)
    config, directory = pickle.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    straight = argv[3:4] == ["straight"]  # standard output is the server's log (childlog)
    observer = StraightLines(index, os.getpid()) if straight else RelayedLines()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    from twisted.internet import reactor

    receiver = Receiver(index, config, directory, reactor)

    def start() -> None:
        try:
            receiver.start()
        except Exception:
            log.failure("receiving process {n}: start failed", n=index)
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.run()
    # Stopped: what was answered 250 is on disk; threads still busy (a transaction that got
    # no 250) are not waited for.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
