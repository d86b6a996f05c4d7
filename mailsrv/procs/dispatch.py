"""
The parent's side of the connections: it accepts on every listening socket, applies the
connection limits (in total, per client address, connections a minute) exactly as one process
does, since it sees every connection, and hands each admitted connection to a receiving
process with its file descriptor (mailsrv.procs.channel).  A connection over a limit is
answered ``421`` by the parent itself.

Which process gets a connection (``choose``, pure):

- listeners that offer AUTH (submission, and port 25 with ``[smtp] auth``) all go to process
  1: the AUTH failure count and lockout (per client address) and the send limits (per
  authenticated user) are then kept by one process, exact, as in a single one;
- with greylisting on, a client it applies to (not in ``relay.trusted_networks``) goes to the
  process its network hashes to, so that a retry finds the triplet its first attempt left;
- every other connection goes to the process with the fewest open connections.

A process being restarted gets nothing; a connection whose process is not running is
answered ``421`` (try again later).
"""

from __future__ import annotations

import collections
import os
import socket
import sys
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger

from mailsrv import replies
from mailsrv.checks.greylist import client_network
from mailsrv.inbound.listener import ConnectionCounter, Refused, plain_ip
from mailsrv.procs.channel import Channel, encode

__all__ = ["Acceptor", "Dispatcher", "choose", "Route", "address_field", "field_address",
           "HandedConnections"]

log = Logger(namespace="mailsrv")

#: Connections accepted from one listening socket in one turn of the reactor.
_ACCEPTS_PER_TURN = 64


class Route:
    """How ``choose`` routes one listener's connections."""

    FEWEST = "fewest"  # the process with the fewest connections
    AUTH = "auth"  # all to process 1 (AUTH failures, send limits)

    def __init__(self, kind: str, greylist: bool, trusted: Callable[[str], bool]) -> None:
        self.kind = kind
        self.greylist = greylist
        self.trusted = trusted


def network_owner(ip: str, processes: int) -> int:
    """The process (index) that greylists ``ip``'s network: the same in the parent's routing
    and in each process's greylisting memory (mailsrv.storage.greylist ``owns``)."""
    return zlib.crc32(client_network(ip).encode()) % processes


def owns_network(network: str, index: int, processes: int) -> bool:
    """Whether process ``index`` greylists ``network`` (a client_network string)."""
    return zlib.crc32(network.encode()) % processes == index


def choose(route: Route, ip: str, open_counts: Sequence[int | None]) -> int | None:
    """The index of the process for a connection from ``ip``; ``open_counts`` has one entry
    per process, None for one not running.  None: no process can take it now."""
    if route.kind == Route.AUTH:
        index = 0
    elif route.greylist and not route.trusted(ip):
        try:
            index = network_owner(ip, len(open_counts))
        except ValueError:  # not an IP address: not greylisted either
            index = 0
    else:
        running = [(n, i) for i, n in enumerate(open_counts) if n is not None]
        return min(running)[1] if running else None
    return index if open_counts[index] is not None else None


def address_field(ip: str) -> str:
    """A client address as a channel field (a connection without one, a Unix socket's: ``-``)."""
    return ip or "-"


def field_address(field: str) -> str:
    return "" if field == "-" else field


class HandedConnections(ConnectionCounter):
    """The connections of a receiving process: the parent applied the limits before handing
    each over (this count is a part of its), and learns of each one's end from here, by its
    client address (``send`` the channel's): nothing is kept per connection for it."""

    def __init__(self, send: Callable[[bytes], Any]) -> None:
        super().__init__(sys.maxsize, sys.maxsize)  # no limit here: nothing is exempt either
        self.send = send

    def release(self, ip: str) -> None:
        super().release(ip)
        self.send(encode("closed", address_field(ip)))


class Child:
    """The parent's view of one receiving process: its channel and its open connections,
    counted per client address (the process says ``closed <address>``: it keeps nothing per
    connection for the parent, as a wrapper per connection cost it some 650 bytes)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.channel: Channel | None = None
        self.ready = False  # it said so: connections go to it
        self.open: collections.Counter[str] = collections.Counter()  # address -> connections
        self.connections = 0
        #: Its connections the parent's connections_open gauge counts (mailsrv.procs.pool).
        self.gauge = 0

    @property
    def taking(self) -> bool:
        return self.channel is not None and self.ready


class Dispatcher:
    """Admits (ConnectionCounter) and hands out connections; releases them when a process
    says they closed, or all of a process's at once when it dies."""

    def __init__(
        self, counter: ConnectionCounter, children: Sequence[Child], reactor: Any,
        metrics: Any, refused_factories: Sequence[Any], routes: Sequence[Route],
    ) -> None:
        self.counter = counter
        self.children = children
        self.reactor = reactor
        self.metrics = metrics
        # per listener: (RefusedFactory, the factory to adopt with: itself, or TLS around it)
        self.refused_factories = refused_factories
        self.routes = routes

    def accepted(self, listener: int, sock: socket.socket, address: Any) -> None:
        """A connection just accepted on listener ``listener``: hand it over, or refuse it."""
        ip = plain_ip(address[0] if isinstance(address, tuple) else "")
        refusal = self.counter.admit(ip)
        if refusal is not None:
            reply = refusal[0]
            self.metrics.connection_refused(
                "max_connections" if reply is replies.TOO_MANY_CONNECTIONS
                else "max_connections_per_ip" if reply is replies.TOO_MANY_CONNECTIONS_FROM_IP
                else "connections_per_minute")
            self._refuse(listener, sock, refusal)
            return
        counts = [c.connections if c.taking else None for c in self.children]
        index = choose(self.routes[listener], ip, counts)
        child = None if index is None else self.children[index]
        if child is None or child.channel is None or not child.channel.send(
                encode("conn", listener, address_field(ip)), sock.fileno()):
            self.counter.release(ip)
            self._refuse(listener, sock, (replies.PROCESS_UNAVAILABLE, "process",
                                          "receiving process not running"))
            return
        child.open[ip] += 1
        child.connections += 1
        sock.close()  # the child has its own copy of the descriptor

    def _refuse(self, listener: int, sock: socket.socket, refusal: tuple) -> None:
        inner, outer = self.refused_factories[listener]
        inner.refusal = refusal
        try:
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, outer)
        except OSError as e:
            # Reset by the client since the accept (no peer name: ENOTCONN): nobody to tell.
            log.info("refused connection gone before its reply: {error}",
                     error=e.strerror or e)
        finally:
            sock.close()

    def closed(self, child: Child, ip: str) -> None:
        """One of ``child``'s connections from ``ip`` ended (one it was not given: ignored)."""
        if not child.open[ip]:  # (reading a Counter adds nothing)
            log.warn("receiving process proc={proc} closed a connection from {ip} it was not "
                     "given", proc=child.index + 1, ip=ip)
            return
        child.open[ip] -= 1
        if not child.open[ip]:
            del child.open[ip]
        child.connections -= 1
        self.counter.release(ip)

    def lost(self, child: Child) -> None:
        """The process is gone: its connections went with it."""
        for ip, count in child.open.items():
            for _ in range(count):
                self.counter.release(ip)
        child.open.clear()
        child.connections = 0
        child.channel = None
        child.ready = False


class RefusedFactory(protocol.Factory):
    """Makes the parent's ``421`` for one connection (``refusal`` set just before)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.refusal: tuple = ()

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        p = Refused(self.reactor, plain_ip(getattr(addr, "host", "")), *self.refusal)
        p.factory = self
        return p


class Acceptor:
    """Reads a listening socket that Twisted opened (its Port no longer reads it): accepts,
    and gives each connection to ``accepted(listener, sock, address)``."""

    def __init__(self, sock: socket.socket, listener: int, dispatcher: Dispatcher) -> None:
        self.sock = sock
        self.listener = listener
        self.dispatcher = dispatcher

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "mailsrv-acceptor"

    def doRead(self) -> None:
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and the like: logged; the reactor calls again while one waits.
                log.error("accept failed: {error}", error=os.strerror(e.errno or 0))
                return
            conn.setblocking(False)
            try:
                self.dispatcher.accepted(self.listener, conn, address)
            except Exception:
                conn.close()
                log.failure("connection not handed over")

    def connectionLost(self, reason: Any) -> None:
        pass
