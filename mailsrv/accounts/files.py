"""
The users file and the aliases file, read and validated: who has a mailbox, a password, an alias.

The loaders feed :class:`~mailsrv.routing.router.Directory`, which answers where each recipient goes.
Every error is a ``ConfigError`` naming the file, the line, and what was expected, so an
administrator can fix the file without reading code.  (``mailsrv user`` edits the users file
through :mod:`mailsrv.accounts.userfile`.)

File formats
------------
users (Dovecot passwd-file layout, so one file can serve mailsrv and Dovecot)::

    # comment
    alice@example.org:{BLF-CRYPT}$2y$12$...:1000:1000::/home/alice
    bob@example.org       (receives mail, cannot log in)

aliases::

    # name: target, target   ('#' starts a comment only at the start of a line)
    sales@example.org: alice@example.org, bob@partner.example
    # a bare name stands for that name in every local domain
    postmaster: alice@example.org
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from mailsrv.accounts import userfile
from mailsrv.accounts.auth import PasswordError, check_password_field
from mailsrv.config import ConfigError
from mailsrv.routing.address import fold_local, is_dot_atom, is_safe_local_part, normalise_domain

__all__ = ["load_users", "read_users", "load_aliases"]


def _read_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, text) of the meaningful lines: no blanks, no '#' comment lines."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, "file", f"a readable file ({exc.strerror})") from None
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(path, f"line {number}", "UTF-8 text") from None
        if line and not line.startswith("#"):
            yield number, line


def load_users(path: Path) -> frozenset[str]:
    """The mailboxes of the users file (see :func:`read_users`)."""
    return frozenset(read_users(path))


def read_users(
    path: Path, passwords: bool = False, local_domains: Iterable[str] | None = None
) -> dict[str, str | None]:
    """Read the users file: one ``local@domain[:{BLF-CRYPT}hash[:...]]`` a line.

    Returns each lower-case address with, when ``passwords`` is true (AUTH is offered), its
    bcrypt hash (None: no password, so no login); otherwise every value is None and the
    password fields are Dovecot's business alone.  The fields after the password are always
    Dovecot's.  Addresses must be usable as ``<root>/<domain>/<user>`` and, given
    ``local_domains``, be in one of them (a user elsewhere could log in but never send);
    with ``passwords``, a password in a scheme mailsrv cannot verify is an error here, at
    start-up, not a puzzling login failure later.  A file with any password field (used by
    mailsrv or only by Dovecot) must not be open to others, as ssh refuses such keys.
    """
    users: dict[str, str | None] = {}
    lines: dict[str, int] = {}
    ours = None if local_domains is None else tuple(normalise_domain(d) for d in local_domains)
    secrets = False
    for number, line in _read_lines(path):
        key = f"line {number}"
        address, _, rest = line.partition(":")
        address = address.strip()
        local, at, domain = address.partition("@")
        if not at or "@" in domain:
            raise ConfigError(
                path, key, f"an address local@domain at the start of the line, got {address!r}"
            )
        if not is_dot_atom(local) or not is_safe_local_part(local):
            raise ConfigError(
                path,
                key,
                f"a local part of at most 64 octets of letters, digits and ._-+ usable as a "
                f"directory name (no '/', no leading dot, no '..'; UTF-8 in NFC, no invisible "
                f"or slash-like characters), got {local!r}",
            )
        try:
            domain = normalise_domain(domain)
        except ValueError as exc:
            raise ConfigError(path, key, f"a valid domain after '@' ({exc})") from None
        address = f"{fold_local(local)}@{domain}"
        if ours is not None and domain not in ours:
            raise ConfigError(
                path, f"{key} ({address})",
                f"expected an address in a local domain ({', '.join(ours)}); "
                f"{domain} is not in [domains] local",
            )
        if address in users:
            raise ConfigError(
                path,
                key,
                f"each mailbox listed once ({address} is already on line {lines[address]})",
            )
        users[address] = None
        field = rest.split(":", 1)[0].strip()
        secrets = secrets or field != ""
        if passwords:
            try:
                users[address] = check_password_field(field)
            except PasswordError as exc:
                raise ConfigError(path, f"{key} ({address})", f"expected {exc}") from None
        lines[address] = number
    if secrets:
        mode = os.stat(path).st_mode
        if not userfile.private_mode(mode):
            raise ConfigError(
                path, f"mode {stat.S_IMODE(mode):04o}",
                f"expected a file with password hashes that others cannot read: "
                f"chmod {userfile.FILE_MODE:04o} (readable by the server's group)",
            )
    return users


def load_aliases(path: Path) -> dict[str, tuple[str, ...]]:
    """Read the aliases file: ``name: target, target`` a line.

    ``name`` is ``local@domain`` or a bare local part (that name in every local domain);
    targets are full addresses.  Names are lower-cased; targets keep their local part as
    written (a remote server may care about its case) with the domain normalised.
    """
    aliases: dict[str, tuple[str, ...]] = {}
    lines: dict[str, int] = {}
    for number, line in _read_lines(path):
        key = f"line {number}"
        name, colon, rest = line.partition(":")
        name = fold_local(name.strip())  # (lower case, NFC: as recipients are compared)
        if not colon:
            raise ConfigError(path, key, "name: target, target")
        n_local, at, n_domain = name.partition("@")
        if not is_dot_atom(n_local) or (at and "@" in n_domain):
            raise ConfigError(
                path, key, f"an alias name local@domain or a bare local part, got {name!r}"
            )
        if at:
            try:
                name = f"{n_local}@{normalise_domain(n_domain)}"
            except ValueError as exc:
                raise ConfigError(path, key, f"a valid domain in the alias name ({exc})") from None
        if name in aliases:
            raise ConfigError(
                path, key, f"each alias defined once ({name} is already on line {lines[name]})"
            )
        targets: list[str] = []
        for item in rest.split(","):
            target = item.strip()
            t_local, t_at, t_domain = target.partition("@")
            if not t_at or not is_dot_atom(t_local) or "@" in t_domain:
                raise ConfigError(
                    path,
                    key,
                    f"targets as full addresses local@domain separated by commas, got {target!r}",
                )
            try:
                targets.append(f"{t_local}@{normalise_domain(t_domain)}")
            except ValueError as exc:
                raise ConfigError(
                    path, key, f"a valid domain in target {target!r} ({exc})"
                ) from None
        aliases[name] = tuple(targets)
        lines[name] = number
    return aliases


def read_srs_secrets(path: Path) -> list[bytes]:
    """Read the SRS secret file: one secret a line (blank lines and ``#`` comments skipped);
    the first signs, the others still verify (a rotation keeps the old one for max_age days).

    Anyone with the secret can make our server forward mail to any address (a bounce to a
    valid SRS address is relayed), so the file must not be open to others.
    """
    key = "srs.secret_file"
    try:
        mode = os.stat(path).st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, key, f"expected a readable file of secrets: {exc}") from None
    if not userfile.private_mode(mode):
        raise ConfigError(
            path, f"mode {stat.S_IMODE(mode):04o}",
            f"expected a secret file that others cannot read: chmod {userfile.FILE_MODE:04o}",
        )
    secrets = [line.strip() for line in text.splitlines()]
    secrets = [s.encode("utf-8") for s in secrets if s and not s.startswith("#")]
    if not secrets:
        raise ConfigError(path, key, "expected at least one secret (a line of random text)")
    short = [n for n, s in enumerate(secrets, 1) if len(s) < 16]
    if short:
        raise ConfigError(
            path, key, f"expected secrets of 16 characters or more (secret {short[0]} is shorter)"
        )
    return secrets
