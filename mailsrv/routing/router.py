"""
Who receives mail here: local domains, mailboxes, aliases; and where each recipient goes.

The router turns one recipient :class:`~mailsrv.routing.address.Mailbox` into delivery targets: a
:class:`LocalTarget` (a Maildir under ``<root>/<domain>/<user>``, Dovecot's
``maildir:<root>/%d/%n``) or a :class:`RemoteTarget` (an address for the outbound queue).
Twisted's alias and domain helpers are case-sensitive and deliver duplicates, so this is
written from scratch.

Pure: the users and aliases files are read by :mod:`mailsrv.accounts.files`.  Every start-up error
is a ``ConfigError`` naming the file, the entry, and what was expected, so an administrator
can fix the file without reading code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mailsrv.config import ConfigError
from mailsrv.routing.address import Mailbox, fold_local, is_safe_local_part, normalise_domain
from mailsrv.routing.srs import SRS, is_srs_local_part

__all__ = [
    "LocalTarget",
    "RemoteTarget",
    "Target",
    "UnknownRecipient",
    "Directory",
    "MAX_ALIAS_DEPTH",
]

#: Longest alias chain followed (Postfix and sendmail use similar bounds).
MAX_ALIAS_DEPTH = 20


@dataclass(frozen=True)
class LocalTarget:
    """A mailbox on this server: ``user`` is lower case and safe as a directory name."""

    domain: str
    user: str

    @property
    def address(self) -> str:
        return f"{self.user}@{self.domain}"

    @property
    def maildir_name(self) -> str:
        """``domain/user``, the Maildir below the mail root: Dovecot's ``maildir:<root>/%d/%n``
        layout (a string: deliveries take it per message)."""
        return f"{self.domain}/{self.user}"

    def maildir(self, root: Path) -> Path:
        """The Maildir under *root* (``maildir_name``)."""
        return Path(root) / self.maildir_name


@dataclass(frozen=True)
class RemoteTarget:
    """A recipient on another server, as written (``str(Mailbox)``), for the outbound queue."""

    address: str


Target = LocalTarget | RemoteTarget


class UnknownRecipient(Exception):
    """No mailbox here answers to this address."""


class _Alias(NamedTuple):
    """The alias entry a lookup hit: the address it stands for, and its targets."""

    address: str  # "name@domain", the alias as instantiated in the looked-up domain
    targets: tuple[str, ...]


def _split_address(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain


class Directory:
    """Who receives mail here: local domains, mailboxes and aliases.

    ``users`` holds lower-case ``"user@domain"`` strings, or is None to make every safe local
    part of a local domain a mailbox (the demo's catch-all).  ``aliases`` maps lower-case
    ``"name@domain"`` or a bare ``"name"`` (that name in every local domain) to full target
    addresses; ``passwords`` the users' password hashes (see
    :func:`mailsrv.accounts.files.read_users`).  The first local domain is the one RFC 5321's bare
    ``<postmaster>`` belongs to.
    """

    def __init__(
        self,
        local_domains: Iterable[str],
        users: frozenset[str] | None,
        aliases: Mapping[str, tuple[str, ...]],
        recipient_delimiter: str = "+",
        passwords: Mapping[str, str | None] | None = None,
        srs: SRS | None = None,
    ) -> None:
        domains: list[str] = []
        for domain in local_domains:
            domain = normalise_domain(domain)
            if domain not in domains:
                domains.append(domain)
        self.local_domains: tuple[str, ...] = tuple(domains)
        self._domains = frozenset(domains)
        self.users = None if users is None else frozenset(u.lower() for u in users)
        self.aliases: dict[str, tuple[str, ...]] = {k.lower(): tuple(v) for k, v in aliases.items()}
        self.recipient_delimiter = recipient_delimiter
        #: Lower-case address -> bcrypt hash or None (no login), read with the users file
        #: when AUTH is offered, so that a reload swaps mailboxes and passwords together.
        self.passwords: Mapping[str, str | None] = dict(passwords or {})
        #: The sender rewriting of mail we forward, None without [srs] (read with the users
        #: file, so that a reload also rotates its secrets).
        self.srs = srs

    # -- lookups --------------------------------------------------------------------------

    def is_local_domain(self, domain: str) -> bool:
        """True when mail for ``domain`` (already normalised) is delivered here."""
        return domain.lower() in self._domains

    def _base(self, local: str) -> str | None:
        """The part before the first recipient delimiter (``alice+tag`` -> ``alice``), if any."""
        delimiter = self.recipient_delimiter
        if delimiter and delimiter in local:
            base = local.split(delimiter, 1)[0]
            if base:
                return base
        return None

    def _is_user(self, local: str, domain: str) -> bool:
        if self.users is None:
            # Catch-all: any safe name is a mailbox, but a name holding the delimiter is a
            # tagged address, so "alice+tag" falls back to alice's mailbox, as with a users file.
            delimiter = self.recipient_delimiter
            return is_safe_local_part(local) and not (delimiter and delimiter in local)
        return f"{local}@{domain}" in self.users

    def _alias_for(self, local: str, domain: str) -> _Alias | None:
        """The alias entry for exactly this name: full address first, then the bare name."""
        full = f"{local}@{domain}"
        if full in self.aliases:
            return _Alias(full, self.aliases[full])
        if local in self.aliases:
            return _Alias(full, self.aliases[local])
        return None

    def _lookup(self, local: str, domain: str) -> _Alias | LocalTarget | None:
        """What one lower-case local address means: an alias, a mailbox, or nothing.

        Order: full alias, bare alias, user; then the same for the part before the first
        delimiter.  An alias for ``alice+sales`` therefore wins over the mailbox ``alice``.
        """
        for name in (local, self._base(local)):
            if name is None:
                continue
            alias = self._alias_for(name, domain)
            if alias is not None:
                return alias
            if self._is_user(name, domain):
                return LocalTarget(domain, name)
        return None

    def has_postmaster(self, domain: str) -> bool:
        """Whether ``postmaster@domain`` reaches someone (a mailbox, or an alias)."""
        return self._lookup("postmaster", domain) is not None

    def _mailbox(self, local: str, domain: str) -> LocalTarget | None:
        """The real mailbox for an address, ignoring aliases (for an alias naming itself)."""
        for name in (local, self._base(local)):
            if name is not None and self._is_user(name, domain):
                return LocalTarget(domain, name)
        return None

    def srs_target(self, mailbox: Mailbox) -> RemoteTarget | None:
        """For a bounce to a sender address our SRS made: the original sender it goes back to.

        None for an address that does not claim to be one (not in the SRS domain, or no
        ``SRS0=``/``SRS1=`` local part); raises mailsrv.routing.srs.SRSError for one that
        claims to be but is not ours, has expired or is malformed.
        """
        srs = self.srs
        if srs is None or mailbox.domain.lower() != srs.domain:
            return None
        if not is_srs_local_part(mailbox.local):
            return None
        return RemoteTarget(srs.reverse(mailbox.local))

    def resolve(self, mailbox: Mailbox) -> tuple[Target, ...]:
        """The delivery targets of a recipient in a local domain (or ``""``: postmaster).

        Aliases expand recursively; an alias naming itself among its targets delivers to the
        real mailbox of that name (Postfix semantics).  Loops are refused by :meth:`check` at
        start-up; here an alias already being expanded is treated like one naming itself, so
        resolution always terminates.  The result is de-duplicated, first occurrence first.
        Raises :class:`UnknownRecipient` for an unknown or unsafe local part, or a domain that
        is not local.
        """
        domain = mailbox.domain
        if domain == "":
            if not self.local_domains:
                raise UnknownRecipient(str(mailbox))
            domain = self.local_domains[0]
        elif not self.is_local_domain(domain):
            raise UnknownRecipient(str(mailbox))
        else:
            domain = domain.lower()
        local = fold_local(mailbox.local)  # (lower case, NFC: as the users file's names)
        if not is_safe_local_part(local):
            raise UnknownRecipient(str(mailbox))
        found: list[Target] = []
        self._expand(local, domain, (), set(), found)
        if not found:
            raise UnknownRecipient(str(mailbox))
        return tuple(dict.fromkeys(found))

    def _expand(
        self,
        local: str,
        domain: str,
        path: tuple[str, ...],
        expanded: set[str],
        found: list[Target],
    ) -> None:
        """Append the targets of ``local@domain`` to ``found``.

        ``path`` holds the aliases being expanded (to spot an alias naming itself);
        ``expanded`` the aliases already expanded in this resolution, whose targets are in
        ``found`` already, so that lists shared by several lists are walked once.
        """
        hit = self._lookup(local, domain)
        if hit is None:
            return
        if isinstance(hit, LocalTarget):
            found.append(hit)
            return
        if hit.address in path:
            # The alias names itself (directly, or through a loop check() would have refused):
            # deliver to the real mailbox of that name, if there is one.
            real = self._mailbox(local, domain)
            if real is not None:
                found.append(real)
            return
        if hit.address in expanded:
            return
        if len(path) >= MAX_ALIAS_DEPTH:
            raise UnknownRecipient(f"alias chain deeper than {MAX_ALIAS_DEPTH} at {hit.address}")
        expanded.add(hit.address)
        path = path + (hit.address,)
        for target in hit.targets:
            t_local, t_domain = _split_address(target)
            t_domain = t_domain.lower()
            if self.is_local_domain(t_domain):
                t_local = fold_local(t_local)
                if is_safe_local_part(t_local):
                    self._expand(t_local, t_domain, path, expanded, found)
            else:
                found.append(RemoteTarget(target))

    # -- start-up validation --------------------------------------------------------------

    def check(self, source: str | os.PathLike[str] | None) -> None:
        """Validate the directory at start-up; raise ``ConfigError(source, key, expected)``.

        Refuses what would otherwise only show up as lost or bounced mail later: an alias
        target in a local domain that is no mailbox, an alias loop (named, e.g.
        ``a@x -> b@x -> a@x``), a chain deeper than :data:`MAX_ALIAS_DEPTH`, a local domain
        without a postmaster (RFC 5321 section 4.5.1; not checked in catch-all mode), and an
        alias named in a domain that is not local (it could never receive mail: a typo).
        """
        checked: dict[str, int] = {}
        for name in sorted(self.aliases):
            if "@" in name:
                _, domain = _split_address(name)
                if not self.is_local_domain(domain):
                    raise ConfigError(
                        source,
                        name,
                        f"an alias in a local domain ({self._domain_list()}), or a bare name",
                    )
                instances = [name]
            else:
                instances = [f"{name}@{d}" for d in self.local_domains]
            for address in instances:
                self._check_alias(source, name, address, (address,), checked)
        if self.users is not None:
            for domain in self.local_domains:
                if self._lookup("postmaster", domain) is None:
                    raise ConfigError(
                        source,
                        f"postmaster@{domain}",
                        "a mailbox or alias for the postmaster of every local domain "
                        "(RFC 5321 section 4.5.1)",
                    )

    def _domain_list(self) -> str:
        return ", ".join(self.local_domains) or "none configured"

    def _check_alias(
        self,
        source: str | os.PathLike[str] | None,
        key: str,
        address: str,
        path: tuple[str, ...],
        checked: dict[str, int],
    ) -> None:
        """Depth-first walk from the alias instance ``address``; ``path`` ends with it.

        ``checked`` maps aliases already found sound to the depth they were reached at: the
        same alias reached no deeper needs no second walk (it has no loop, and its chain fits),
        which keeps shared sub-lists from making the walk exponential.
        """
        if checked.get(address, 0) >= len(path):
            return
        local, domain = _split_address(address)
        hit = self._lookup(local, domain)
        assert isinstance(hit, _Alias)
        if len(path) > MAX_ALIAS_DEPTH:
            raise ConfigError(
                source, key, f"an alias chain of at most {MAX_ALIAS_DEPTH} steps: "
                + " -> ".join(path)
            )
        for target in hit.targets:
            t_local, t_domain = _split_address(target)
            t_domain = t_domain.lower()
            if not self.is_local_domain(t_domain):
                continue
            t_local = t_local.lower()
            if not is_safe_local_part(t_local):
                raise ConfigError(
                    source, key, f"targets usable as mailbox names ({target} is not)"
                )
            t_hit = self._lookup(t_local, t_domain)
            if isinstance(t_hit, _Alias) and t_hit.address != address:
                if t_hit.address in path:
                    loop = path[path.index(t_hit.address):] + (t_hit.address,)
                    raise ConfigError(source, key, "no alias loop: " + " -> ".join(loop))
                self._check_alias(
                    source, key, t_hit.address, path + (t_hit.address,), checked
                )
            elif t_hit is None or (
                isinstance(t_hit, _Alias) and self._mailbox(t_local, t_domain) is None
            ):
                # Unknown, or the alias names itself and there is no real mailbox behind it.
                raise ConfigError(
                    source,
                    key,
                    f"targets in local domains to be mailboxes or aliases "
                    f"({target} is neither)",
                )
        checked[address] = len(path)
