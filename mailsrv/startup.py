"""
What the server reads and checks before it starts, and again on a reload: the data
directories, the queue's directory, the TLS certificate, the DKIM keys, the users and aliases
files (with the SRS secrets).  Each loader raises ConfigError naming the file, the key and
the expectation, so that ``twistd mailsrv`` and ``mailsrv check-config`` stop on the same
errors and the server never starts half-configured.
"""

from __future__ import annotations

from pathlib import Path

from mailsrv.accounts.files import load_aliases, read_srs_secrets, read_users
from mailsrv.config import Config, ConfigError, prepare_directories
from mailsrv.inbound.tls import ServerTLS, TLSSetupError
from mailsrv.message.dkimkeys import SigningKeys, load_keys
from mailsrv.routing.address import host_domains
from mailsrv.routing.router import Directory
from mailsrv.routing.srs import SRS
from mailsrv.storage import queue

__all__ = ["build_directory", "load_directory", "load_dkim", "load_tls", "prepare", "srs_domain"]


def load_directory(config: Config) -> Directory:
    """The users and aliases, checked: every alias resolves, every domain has a postmaster."""
    directory = build_directory(config)
    boxes = config.mailboxes
    directory.check(boxes.aliases or boxes.users or config.source)
    return directory


def build_directory(config: Config) -> Directory:
    """The users and aliases as the files say, each file checked on its own but not the
    whole (``mailsrv user`` asks it what a change leaves missing, such as a postmaster)."""
    boxes = config.mailboxes
    passwords = None
    if boxes.users is not None:
        passwords = read_users(
            Path(boxes.users), passwords=config.auth_enabled, local_domains=config.domains.local
        )
    aliases = load_aliases(Path(boxes.aliases)) if boxes.aliases is not None else {}
    srs = None
    if config.srs.secret_file is not None:
        srs = SRS(read_srs_secrets(Path(config.srs.secret_file)), srs_domain(config),
                  max_age=config.srs.max_age)
    return Directory(
        config.domains.local,
        None if passwords is None else frozenset(passwords),
        aliases,
        boxes.recipient_delimiter,
        passwords if config.auth_enabled else None,
        srs=srs,
    )


def srs_domain(config: Config) -> str:
    """The domain SRS addresses are made in: srs.domain, else the host name's domain (or
    the host name) when local, else the first local domain (bounces must come back here)."""
    if config.srs.domain is not None:
        return config.srs.domain
    for domain in host_domains(config.hostname):
        if domain in config.domains.local:
            return domain
    return config.domains.local[0]


def load_tls(config: Config) -> ServerTLS | None:
    """The server's TLS context factory, or None without [tls]; ConfigError when unusable."""
    tls = config.tls
    if tls.cert is None or tls.key is None:
        return None
    try:
        return ServerTLS(tls.cert, tls.key)
    except TLSSetupError as e:
        raise ConfigError(config.source, e.key, f"expected {e.reason}") from None


def load_dkim(config: Config) -> SigningKeys | None:
    """The DKIM signing keys, checked (ConfigError naming the file that is wrong); None for
    a configuration that signs nothing (the demo)."""
    if not config.dkim.enabled:
        return None
    return load_keys(config.dkim.directory, config.source, required=config.dkim.keys is not None)


def prepare(config: Config) -> Directory:
    """All start-up checks; raises ConfigError naming the file, the key and the expectation."""
    prepare_directories(config)
    try:
        queue.queue_dirs(Path(config.queue.path))
    except OSError as e:
        raise ConfigError(config.source, "queue.path", f"a directory mailsrv can write: {e}")
    load_tls(config)
    load_dkim(config)
    if config.server.process_count > 1:
        from mailsrv.procs.pool import check_interpreter

        check_interpreter(config)
    return load_directory(config)
