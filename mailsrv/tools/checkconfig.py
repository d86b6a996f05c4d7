"""
``mailsrv check-config``: every start-up check of the server, without disturbing a running one.

The server's own start-up (``startup.prepare`` followed by ``service.lock_queue``) creates the
mailbox root and the queue directories and takes the queue lock.  An administrator checks an
edited file *while the server runs*, usually as root, so this module does neither: a directory
created here would belong to root (and the server, running as ``mailsrv``, could not write it),
and holding the queue lock even for a moment could make a server starting meanwhile refuse to
start.  Everything else is the server's code itself: ``load_config`` for the file,
``startup.load_tls`` for the certificate and key, ``startup.load_dkim`` for the DKIM signing
keys, and ``startup.load_directory`` for the users
and aliases (every alias resolves, every local domain has a postmaster, and with AUTH on,
every password is a hash mailsrv can verify).  It also warns of what is valid but probably
not meant: a postmaster whose mail would be relayed off the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mailsrv.config import Config, ConfigError, load_config, read_smarthost_password
from mailsrv.message.dkimkeys import SigningKeys, describe_keys
from mailsrv.routing.address import Mailbox
from mailsrv.routing.router import Directory, RemoteTarget

__all__ = ["CheckResult", "check_config", "check_directory", "postmaster_warnings"]

@dataclass(frozen=True)
class CheckResult:
    """A configuration that passed every check, with what it was found to contain."""

    config: Config
    directory: Directory
    notes: tuple[str, ...]  # things that are valid but worth telling (a directory still missing)
    warnings: tuple[str, ...] = ()  # valid, but probably not what was meant
    dkim: SigningKeys | None = None  # the signing keys, checked

    def summary(self) -> str:
        """A few lines an administrator can compare with what they meant to configure."""
        c, d = self.config, self.directory
        users = "any safe local part (no users file)" if d.users is None else f"{len(d.users)}"
        relay = (f"smarthost {c.relay.smarthost[0]}:{c.relay.smarthost[1]}"
                 if c.relay.smarthost else "MX delivery")
        lines = [
            f"{c.source}: ok",
            f"  hostname: {c.hostname}",
            f"  local domains: {', '.join(c.domains.local)}",
            f"  listen: {', '.join(c.smtp.listen)}"
            + (f"; submission: {', '.join(c.submission.listen)}" if c.submission.listen else "")
            + (f"; metrics: {c.metrics.listen}" if c.metrics.listen else ""),
            f"  tls: {c.tls.cert if c.tls.enabled else 'none (no STARTTLS)'}"
            + ("; AUTH on port 25" if c.smtp.auth else ""),
            f"  mailboxes: {users} under {c.mailboxes.root}; aliases: {len(d.aliases)}",
            f"  queue: {c.queue.path}",
            f"  relay: {relay}; trusted networks: "
            + (", ".join(str(n) for n in c.relay.trusted_networks) or "none"),
        ]
        if self.dkim is not None:
            lines.append(f"  dkim: {describe_keys(self.dkim)}")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def check_directory(source: Path | None, key: str, path: Path) -> str | None:
    """Check that the server can use (or create) the directory ``path`` without touching it.

    Returns None when it exists and is writable, a note when it is missing but its nearest
    existing parent is writable (the server creates it at start-up), and raises ConfigError
    otherwise.  Writability is ``os.access`` for the user running the check: run it as the
    server's user (``runuser -u mailsrv -- mailsrv check-config``) for the exact answer.
    """
    expected = "a directory mailsrv can write"
    if path.exists():
        if not path.is_dir():
            raise ConfigError(source, key, f"{expected}: {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(source, key, f"{expected}: {path} is not writable by uid {os.getuid()}")
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            source, key, f"{expected}: {path} does not exist and {parent} is not a writable directory"
        )
    return f"{key}: {path} does not exist yet; the server creates it at start-up"


def postmaster_warnings(directory: Directory, aliases: Path | None) -> list[str]:
    """A warning for each local domain whose postmaster's mail would leave this machine.

    The Debian package aliases ``postmaster`` to root at the domain it was installed for; an
    administrator who then changes ``[domains] local`` and not the aliases file has every
    postmaster's mail (bounces, abuse reports) relayed to that old name.  Forwarding the
    postmaster elsewhere can be meant, so it is a warning, not an error.
    """
    where = f"the aliases file {aliases}" if aliases is not None else "an aliases file"
    warnings = []
    for domain in directory.local_domains:
        remote = [t.address for t in directory.resolve(Mailbox("postmaster", domain))
                  if isinstance(t, RemoteTarget)]
        if remote:
            warnings.append(
                f"postmaster@{domain} goes to {', '.join(remote)}, not to a mailbox here: "
                f"mail for the postmaster leaves this machine (name a local mailbox in {where})"
            )
    return warnings


def check_config(path: str | os.PathLike[str]) -> CheckResult:
    """Run every check the server runs at start-up on the file at ``path``; ConfigError if any fails.

    Creates nothing, locks nothing and writes nothing, so it is safe next to a running server.
    """
    from mailsrv.startup import load_directory, load_dkim, load_tls

    config = load_config(path)
    notes = [
        note
        for key, directory in (("mailboxes.root", config.mailboxes.root),
                               ("queue.path", config.queue.path))
        if (note := check_directory(config.source, key, Path(directory))) is not None
    ]
    load_tls(config)
    read_smarthost_password(config)
    dkim = load_dkim(config)
    directory = load_directory(config)
    aliases = Path(config.mailboxes.aliases) if config.mailboxes.aliases is not None else None
    return CheckResult(config=config, directory=directory, notes=tuple(notes),
                       warnings=tuple(postmaster_warnings(directory, aliases)), dkim=dkim)
