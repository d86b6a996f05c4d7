"""
Builds the running server from a ``Config``: listeners, the shared runtime, the services
(relayer, spare spool files, tmp/ cleaning), the queue lock and the reload on SIGHUP.

Everything that can be wrong with a configuration is found before anything listens
(mailsrv.startup.prepare), so the server never starts half-configured.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from twisted.application import internet, service
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsrv.checks.ratelimits import ConnectionRate
from mailsrv.config import (
    Config,
    ConfigError,
    endpoint_options,
    tcp_endpoint_for_ssl,
)
from mailsrv.inbound.listener import ConnectionCounter, SMTPServerFactory
from mailsrv.inbound.tls import TLSSetupError
from mailsrv.interfaces import ISpareSpoolFiles
from mailsrv.message.dkimkeys import SigningKeys, describe_keys
from mailsrv.outbound.relayer import Relayer
from mailsrv.routing.router import Directory
from mailsrv.runtime import Runtime
from mailsrv.startup import load_directory, load_dkim, load_tls, prepare
from mailsrv.storage import queue_control
from mailsrv.storage.tmpclean import TmpCleaner

log = Logger(namespace="mailsrv")


def clear_incoming(queue_path: Path) -> int:
    """
    Remove bodies left in incoming/ by a crash: none of them was ever answered with 250.
    """
    removed = 0
    for entry in os.scandir(queue_path / "incoming"):
        if entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed += 1
    return removed


class ListenError(Exception):
    """A listener cannot listen: ``key description: reason``, the one line an admin reads."""


def listen_backlog(max_connections: int) -> int:
    """The listen queue: room for every connection the limits admit and as many again, so
    that a burst is answered (220, or 421 past the limits) instead of left unanswered, as
    with Twisted's default of 50 (the kernel caps it at net.core.somaxconn)."""
    return max(50, 2 * max_connections)


def with_backlog(endpoint: str, backlog: int) -> str:
    """``endpoint`` with ``backlog=`` added, unless the administrator's string sets one."""
    _, options = endpoint_options(endpoint)
    return endpoint if "backlog" in options else f"{endpoint}:backlog={backlog}"


class ListenerService(service.Service):
    """One listening endpoint; binds in privilegedStartService so that port 25 works."""

    def __init__(
        self, description: str, factory: Any, reactor: Any, endpoint: str | None = None,
        kind: str = "smtp", index: int = 0,
    ) -> None:
        self.description = description  # as configured (logged)
        self.kind = kind  # "smtp" or "submission" (logged)
        self.key = f"{kind}.listen[{index}]"  # the configuration key, for errors
        self.endpoint = endpoint or description  # what Twisted listens on
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def listen(self) -> None:
        """Listen now (once); ListenError naming the key when the address cannot be had.

        The twistd plugin calls this before twistd daemonizes, so that a port in use is
        reported by the command the administrator ran, not by a daemon with no terminal.
        """
        if self.port is not None:
            return
        endpoint = serverFromString(self.reactor, self.endpoint)
        failures: list[Any] = []
        d = endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            error = failures[0].value
            if isinstance(error, CannotListenError):
                cause = error.socketError
                number = getattr(cause, "errno", None)
                reason = os.strerror(number).lower() if number else str(cause)
                raise ListenError(f"{self.key} {self.description}: {reason}") from None
            failures[0].raiseException()

    def privilegedStartService(self) -> None:
        self.listen()
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        service.Service.startService(self)

    def _listening(self, port: Any) -> None:
        self.port = port
        address = port.getHost()
        log.info(
            "listening on {endpoint} ({host} port {port}) for {kind}",
            endpoint=self.description, host=getattr(address, "host", address),
            port=getattr(address, "port", ""), kind=self.kind,
        )

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def listen_all(top: service.MultiService) -> None:
    """Make every listener of ``make_service``'s result listen now; ListenError on the first
    that cannot (those already listening are closed when the process exits)."""
    for child in top:
        if isinstance(child, ListenerService):
            child.listen()


def metrics_listener(runtime: Runtime, endpoint: str, reactor: Any) -> ListenerService:
    """``[metrics] listen``: the runtime's registry at ``/metrics``, in Prometheus' text
    format, by prometheus_client's Twisted resource (it renders in the reactor's thread
    pool). Scrapes are not logged: one every 15 seconds would bury the mail."""
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    root.putChild(b"metrics", MetricsResource(runtime.metrics.registry))
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    site.noisy = False
    listener = ListenerService(endpoint, site, reactor, kind="metrics")
    listener.key = "metrics.listen"
    return listener


class SpareFilesService(service.Service):
    """Removes the unused spare spool files when the server stops."""

    def __init__(self, spare: ISpareSpoolFiles) -> None:
        self.spare = spare

    def stopService(self) -> Any:
        service.Service.stopService(self)
        self.spare.stop()
        return None


def listener_factories(runtime: Runtime, counter: ConnectionCounter) -> list[tuple[Any, ...]]:
    """(description, kind, index, factory, endpoint) of every listener, in the configuration's
    order: the single process's and each receiving process's (mailsrv.procs), which get the
    parent's connections by this order's position."""
    config = runtime.config
    made: list[tuple[Any, ...]] = []
    for listen, submission in ((config.smtp.listen, False), (config.submission.listen, True)):
        for index, description in enumerate(listen):
            implicit_tls = description.startswith("ssl:")
            factory: Any = SMTPServerFactory(runtime, counter, submission, implicit_tls)
            endpoint = description
            if implicit_tls:
                factory = TLSMemoryBIOFactory(runtime.tls, False, factory)
                endpoint = tcp_endpoint_for_ssl(description)
            endpoint = with_backlog(endpoint, listen_backlog(config.smtp.max_connections))
            made.append((description, "submission" if submission else "smtp", index, factory,
                         endpoint))
    return made


def lock_queue(config: Config) -> Any:
    """Take the queue lock for this process's lifetime; ConfigError when a server holds it."""
    try:
        return queue_control.lock_queue(Path(config.queue.path))
    except queue_control.QueueLocked as e:
        raise ConfigError(
            config.source, "queue.path", f"a spool no other running mailsrv uses ({e})"
        ) from None
    except OSError as e:
        raise ConfigError(config.source, "queue.path", f"a directory mailsrv can write: {e}")


def make_service(
    config: Config,
    reactor: Any = None,
    directory: Directory | None = None,
    queue_lock: Any = None,
    straight_logs: bool = False,
) -> service.MultiService:
    """The whole server: the relayer and one listener per endpoint, sharing one runtime.

    ``queue_lock`` is the lock taken by the caller at start-up (taken here when None); it
    stays open as long as the service exists. ``straight_logs``: twistd logs to standard
    output, where receiving processes write their lines themselves (mailsrv.procs.childlog).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if directory is None:
        directory = prepare(config)
    if queue_lock is None:
        queue_lock = lock_queue(config)
    removed = clear_incoming(Path(config.queue.path))
    if removed:
        log.info("removed {n} unfinished incoming message(s) left by a crash", n=removed)
    dkim = load_dkim(config)
    runtime = Runtime.build(
        config, directory, reactor, tls=load_tls(config), relayer=Relayer, dkim=dkim)
    top = service.MultiService()
    assert runtime.spool_files is not None
    SpareFilesService(runtime.spool_files).setServiceParent(top)
    top.queue_lock = queue_lock  # held while the service lives
    service.IService(runtime.relayer).setServiceParent(top)
    TmpCleaner(config.mailboxes.root, reactor).setServiceParent(top)  # tmp/ files left by crashes
    counter = ConnectionCounter(
        config.smtp.max_connections, config.smtp.max_connections_per_ip, runtime.may_relay,
        ConnectionRate(config.limits.connections_per_minute, reactor.seconds),
    )
    processes = config.server.process_count
    listeners = []
    for description, kind, index, factory, endpoint in listener_factories(runtime, counter):
        listener = ListenerService(description, factory, reactor, endpoint, kind, index)
        listener.setServiceParent(top)
        listeners.append(listener)
    pool = None
    if processes > 1:
        from mailsrv.procs.pool import ReceiverPool

        pool = ReceiverPool(runtime, counter, listeners, processes, straight_logs)
        pool.setServiceParent(top)
    if config.metrics.listen is not None:
        metrics_listener(runtime, config.metrics.listen, reactor).setServiceParent(top)
    if config.report.daily:
        from mailsrv.outbound.daily import DailyReport

        DailyReport(runtime).setServiceParent(top)
    if runtime.tls_counts is not None:
        from mailsrv.outbound.tlsrpt.reporter import TLSReporter

        reporter = TLSReporter(runtime, runtime.tls_counts)
        reporter.setServiceParent(top)
        control = getattr(runtime.relayer, "control", None)
        if control is not None:  # mailsrv tls-report --send-now
            control.extra["tlsreport"] = reporter.send_now
        destinations = getattr(runtime.relayer, "destinations", None)
        if destinations is not None:  # DANE's, MTA-STS's (relay.tls's: in place)
            from mailsrv.outbound.tlsrpt.results import listen_to_attempts

            listen_to_attempts(destinations, runtime.tls_counts)
    reloader = Reloader(runtime)
    reloader.setServiceParent(top)
    if pool is not None:
        reloader.on_sighup.append(pool.sighup)
    log.info(
        "mailsrv starting hostname={hostname} domains={domains} config={source}",
        hostname=config.hostname, domains=",".join(config.domains.local),
        source=config.source or "built-in demo",
    )
    if dkim is not None:
        log.info("dkim: {summary}", summary=describe_keys(dkim))
    return top


class Reloader(internet.TimerService):
    """Picks up changed users and aliases files (a second after they change), and on SIGHUP
    re-reads them, the TLS certificate and the DKIM keys.

    ``mailsrv user`` replaces the users file atomically, so a new password works without a
    restart; a renewed certificate needs ``systemctl reload mailsrv`` (SIGHUP).  A file that
    no longer passes the start-up checks is refused with a log line and the server keeps
    running with what it had: a typo must not take mail delivery down.
    """

    INTERVAL = 1.0

    def __init__(self, runtime: Runtime) -> None:
        internet.TimerService.__init__(self, self.INTERVAL, self._check_files)
        self.runtime = runtime
        self.clock = runtime.reactor
        self._stamps = self._file_stamps()
        self._loading = False
        self._previous_handler: Any = None
        #: Called (in the reactor) on each SIGHUP too.
        self.on_sighup: list[Any] = []

    def startService(self) -> None:
        internet.TimerService.startService(self)
        self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)

    def stopService(self) -> Any:
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        return internet.TimerService.stopService(self)

    def _files(self) -> list[Path]:
        boxes = self.runtime.config.mailboxes
        return [Path(p) for p in (boxes.users, boxes.aliases) if p is not None]

    def _file_stamps(self) -> list[tuple[int, int, int, int] | None]:
        stamps: list[tuple[int, int, int, int] | None] = []
        for path in self._files():
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                # The mode too: a chmod that fixes a refused file takes effect.
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode))
        return stamps

    def _check_files(self) -> None:
        stamps = self._file_stamps()
        if stamps != self._stamps:
            self._stamps = stamps
            self.reload_directory("changed on disk")

    def _sighup(self, signum: int, frame: Any) -> None:
        # In the signal handler only schedule: the reactor runs the reload in its own turn.
        self.runtime.reactor.callFromThread(self.reload_all)
        for also in self.on_sighup:  # the receiving processes (mailsrv.procs) reload too
            self.runtime.reactor.callFromThread(also)

    def reload_all(self) -> None:
        log.info("SIGHUP: reloading users, aliases, the TLS certificate and the DKIM keys")
        self._stamps = self._file_stamps()
        tls = self.runtime.tls
        if tls is not None:
            try:
                tls.reload()
            except TLSSetupError as e:
                log.error(
                    "reload: TLS certificate not changed: {source}: {key}: {reason}",
                    source=self.runtime.config.source, key=e.key, reason=e.reason,
                )
                self.runtime.metrics.reload("tls", False)
            else:
                log.info("reload: TLS certificate loaded from {cert}", cert=tls.cert)
                self.runtime.metrics.reload("tls", True)
        self.reload_directory("SIGHUP")
        self.reload_dkim()

    def reload_dkim(self) -> None:
        """The DKIM keys read again in a thread; keys that fail the start-up checks are
        refused with a log line, and the previous keys go on signing."""
        d = self.runtime.in_thread(load_dkim, self.runtime.config)

        def loaded(keys: SigningKeys | None) -> None:
            self.runtime.dkim = keys
            self.runtime.metrics.reload("dkim", True)
            if keys is not None:
                log.info("reload (SIGHUP): dkim: {summary}", summary=describe_keys(keys))

        def refused(failure: Any) -> None:
            failure.trap(ConfigError)
            log.error("reload (SIGHUP) refused, keeping the previous DKIM keys: {error}",
                      error=str(failure.value))
            self.runtime.metrics.reload("dkim", False)

        d.addCallbacks(loaded, refused)

    def reload_directory(self, why: str) -> None:
        if self._loading:
            return
        self._loading = True
        d = self.runtime.in_thread(load_directory, self.runtime.config)

        def loaded(directory: Directory) -> None:
            self.runtime.directory = directory
            log.info(
                "reload ({why}): {users} mailboxes, {aliases} aliases",
                why=why, users=len(directory.users or ()), aliases=len(directory.aliases),
            )
            self.runtime.metrics.reload("users", True)

        def refused(failure: Any) -> None:
            failure.trap(ConfigError)
            log.error(
                "reload ({why}) refused, keeping the previous users and aliases: {error}",
                why=why, error=str(failure.value),
            )
            self.runtime.metrics.reload("users", False)

        def done(result: Any) -> Any:
            self._loading = False
            return result

        d.addCallbacks(loaded, refused).addBoth(done)
