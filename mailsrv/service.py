"""
Builds the running server from a ``Config``: start-up checks, listeners, shared runtime.

Everything that can be wrong with a configuration is found by ``prepare`` before anything
listens, so the server never starts half-configured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from mailsrv import queue
from mailsrv.config import Config, ConfigError, prepare_directories
from mailsrv.delivery import Runtime
from mailsrv.dnsutil import make_resolver
from mailsrv.relayer import Relayer
from mailsrv.router import Directory, load_aliases, load_users
from mailsrv.smtp import SMTPServerFactory
from mailsrv.spoolfiles import SpareSpoolFiles
from mailsrv.workers import Workers

log = Logger(namespace="mailsrv")


def load_directory(config: Config) -> Directory:
    """The users and aliases, checked: every alias resolves, every domain has a postmaster."""
    boxes = config.mailboxes
    users = load_users(Path(boxes.users)) if boxes.users is not None else None
    aliases = load_aliases(Path(boxes.aliases)) if boxes.aliases is not None else {}
    directory = Directory(config.domains.local, users, aliases, boxes.recipient_delimiter)
    directory.check(boxes.aliases or boxes.users or config.source)
    return directory


def prepare(config: Config) -> Directory:
    """All start-up checks; raises ConfigError naming the file, the key and the expectation."""
    prepare_directories(config)
    try:
        queue.queue_dirs(Path(config.queue.path))
    except OSError as e:
        raise ConfigError(config.source, "queue.path", f"a directory mailsrv can write: {e}")
    return load_directory(config)


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


class ListenerService(service.Service):
    """One listening endpoint; binds in privilegedStartService so that port 25 works."""

    def __init__(self, description: str, factory: Any, reactor: Any) -> None:
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        endpoint = serverFromString(self.reactor, self.description)
        failures: list[Any] = []
        d = endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        service.Service.startService(self)

    def _listening(self, port: Any) -> None:
        self.port = port
        address = port.getHost()
        log.info(
            "listening on {endpoint} ({host} port {port})",
            endpoint=self.description, host=getattr(address, "host", address),
            port=getattr(address, "port", ""),
        )

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class _SpareFilesService(service.Service):
    """Removes the unused spare spool files when the server stops."""

    def __init__(self, spare: SpareSpoolFiles) -> None:
        self.spare = spare

    def stopService(self) -> Any:
        service.Service.stopService(self)
        self.spare.stop()
        return None


def lock_spool(config: Config) -> Any:
    """Take the spool lock for this process's lifetime; ConfigError when a server holds it."""
    try:
        return queue.lock_spool(Path(config.queue.path))
    except queue.SpoolLocked as e:
        raise ConfigError(
            config.source, "queue.path", f"a spool no other running mailsrv uses ({e})"
        ) from None
    except OSError as e:
        raise ConfigError(config.source, "queue.path", f"a directory mailsrv can write: {e}")


def make_service(
    config: Config,
    reactor: Any = None,
    directory: Directory | None = None,
    spool_lock: Any = None,
) -> service.MultiService:
    """The whole server: the relayer and one listener per endpoint, sharing one runtime.

    ``spool_lock`` is the lock taken by the caller at start-up (taken here when None); it
    stays open as long as the service exists.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if directory is None:
        directory = prepare(config)
    if spool_lock is None:
        spool_lock = lock_spool(config)
    removed = clear_incoming(Path(config.queue.path))
    if removed:
        log.info("removed {n} unfinished incoming message(s) left by a crash", n=removed)
    resolver = make_resolver(config.relay.dns_servers, reactor)
    runtime = Runtime(config=config, directory=directory, reactor=reactor, resolver=resolver)
    runtime.spool_files = SpareSpoolFiles(Path(config.queue.path), reactor)
    runtime.workers = Workers(reactor)
    top = service.MultiService()
    _SpareFilesService(runtime.spool_files).setServiceParent(top)
    top.spool_lock = spool_lock  # held while the service lives
    runtime.relayer = Relayer(runtime)
    runtime.relayer.setServiceParent(top)
    factory = SMTPServerFactory(runtime)
    for description in config.smtp.listen:
        ListenerService(description, factory, reactor).setServiceParent(top)
    log.info(
        "mailsrv starting hostname={hostname} domains={domains} config={source}",
        hostname=config.hostname, domains=",".join(config.domains.local),
        source=config.source or "built-in demo",
    )
    return top
