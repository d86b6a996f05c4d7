"""Reading and validating the configuration file: TOML in, a frozen Config out.

Every problem is found at start-up, before a socket is opened, and is reported as a
:class:`ConfigError` naming the file, the dotted key (``smtp.listen[1]``) and what was
expected, so that an administrator can fix the file without reading the source.

Validation is table-driven: each table is a dataclass of :mod:`mailsrv.config.schema` plus a
mapping of its keys to a :class:`mailsrv.config.keys.Key` (a description of what the key
takes and a converter).  A key that is absent from the file takes the dataclass default; a
dataclass field without a default is a required key.  Unknown keys are errors rather than
being ignored, because a misspelt ``max_recipents`` silently keeping its default is the kind
of mistake nobody notices until it matters.  Keys that only make sense together (``tls.cert``
and ``tls.key``, AUTH and a users file, the smarthost's user and password file) are checked
once every table is built.

The only I/O here is reading the configuration file (:func:`load_config`) and the smarthost
password file (:func:`read_smarthost_password`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from mailsrv.config import keys
from mailsrv.config.schema import (
    ChecksConfig,
    Config,
    ConfigError,
    DkimConfig,
    DomainsConfig,
    MailboxesConfig,
    QueueConfig,
    RelayConfig,
    SmtpConfig,
)
from mailsrv.config.tables import TABLES
from mailsrv.routing.address import normalise_domain

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "demo_config",
    "load_config",
    "parse_config",
    "read_smarthost_password",
]

DEFAULT_CONFIG_PATH = Path("/etc/mailsrv/mailsrv.toml")


_TOP_LEVEL_KEYS = ("hostname", *TABLES)
_HOSTNAME = keys.hostname()


def _required_fields(cls: type) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def _reject_unknown(
    table: dict[str, Any], allowed: tuple[str, ...], prefix: str, source: Path | None
) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                source, f"{prefix}{key}", f"unknown key; allowed keys: {', '.join(allowed)}"
            )


def _build_table(name: str, raw: Any, base: Path, source: Path | None) -> Any:
    cls, table_keys = TABLES[name]
    required = _required_fields(cls)
    if raw is None:
        if required:
            raise ConfigError(
                source,
                name,
                f"missing required table; expected a [{name}] table with {', '.join(required)}",
            )
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, name, f"expected a table, got {raw!r}")
    _reject_unknown(raw, tuple(table_keys), f"{name}.", source)
    values: dict[str, Any] = {}
    for key, spec in table_keys.items():
        if key in raw:
            try:
                values[key] = spec.convert(raw[key], base)
            except keys.Invalid as exc:
                raise ConfigError(source, f"{name}.{key}{exc.where}", exc.expected) from None
        elif key in required:
            raise ConfigError(
                source, f"{name}.{key}", f"missing required key; expected {spec.wanted}"
            )
    return cls(**values)


# --------------------------------------------------------------------------- public API


def parse_config(data: dict[str, Any], source: Path | None) -> Config:
    """Validate the parsed TOML ``data`` and build a :class:`Config`.

    ``source`` is the file the data came from: it is named in errors and relative paths
    are resolved against its directory (against the current directory when None).
    Raises :class:`ConfigError` for the first problem found.
    """
    source = None if source is None else Path(source)
    base = Path.cwd() if source is None else source.absolute().parent
    if not isinstance(data, dict):
        raise ConfigError(source, "(top level)", f"expected a table, got {data!r}")
    _reject_unknown(data, _TOP_LEVEL_KEYS, "", source)

    if "hostname" in data:
        try:
            hostname = _HOSTNAME.convert(data["hostname"], base)
        except keys.Invalid as exc:
            raise ConfigError(source, "hostname", exc.expected) from None
    else:
        fqdn = socket.getfqdn()
        try:
            hostname = normalise_domain(fqdn)
        except ValueError as exc:
            raise ConfigError(
                source,
                "hostname",
                f"expected a domain name, got {fqdn!r} from socket.getfqdn() ({exc}); "
                "set hostname in the file",
            ) from None

    tables = {name: _build_table(name, data.get(name), base, source) for name in TABLES}
    _check_smarthost(tables["relay"], source)
    _check_dane(tables["relay"], source)
    config = Config(hostname=hostname, source=source, **tables)
    _check_tls(config)
    _check_srs(config)
    if config.rspamd.password is not None and config.rspamd.url is None:
        raise ConfigError(source, "rspamd.url", "expected a url when rspamd.password is set")
    return config


def _check_srs(config: Config) -> None:
    """The SRS domain must be ours: bounces to it have to come back here to be reversed."""
    domain = config.srs.domain
    if domain is not None and domain not in config.domains.local:
        raise ConfigError(
            config.source, "srs.domain",
            f"expected one of the local domains ({', '.join(config.domains.local)}), "
            f"got {domain!r}",
        )


def _check_tls(config: Config) -> None:
    """TLS and AUTH keys that only make sense together."""
    tls, source = config.tls, config.source
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError(
            source, "tls.key" if tls.cert else "tls.cert", "expected tls.cert and tls.key together"
        )
    if not tls.enabled:
        for table, listen in (
            ("smtp", config.smtp.listen), ("submission", config.submission.listen)
        ):
            for index, endpoint in enumerate(listen):
                if endpoint.startswith("ssl:"):
                    raise ConfigError(
                        source, f"{table}.listen[{index}]",
                        "expected [tls] cert and key for an implicit-TLS (ssl:) listener",
                    )
        if config.submission.listen:
            raise ConfigError(
                source, "submission.listen",
                "expected [tls] cert and key: AUTH is only offered over TLS",
            )
        if config.smtp.auth:
            raise ConfigError(
                source, "smtp.auth", "expected [tls] cert and key: AUTH is only offered over TLS"
            )
    if config.auth_enabled and config.mailboxes.users is None:
        raise ConfigError(
            source, "mailboxes.users",
            "expected a users file with password hashes when AUTH is offered "
            "(submission.listen or smtp.auth)",
        )


def _check_smarthost(relay: RelayConfig, source: Path | None) -> None:
    """The smarthost keys that only make sense together."""
    if (relay.smarthost_user is None) != (relay.smarthost_password_file is None):
        raise ConfigError(
            source,
            "relay.smarthost_password_file" if relay.smarthost_user else "relay.smarthost_user",
            "expected relay.smarthost_user and relay.smarthost_password_file together",
        )
    if relay.smarthost_user is not None and relay.smarthost is None:
        raise ConfigError(
            source, "relay.smarthost", "expected a smarthost when relay.smarthost_user is set"
        )


def _check_dane(relay: RelayConfig, source: Path | None) -> None:
    """DANE trusts the AD bit of the resolvers it asks: they must be named, not guessed."""
    if relay.dane and not relay.dns_servers:
        raise ConfigError(
            source, "relay.dns_servers",
            "expected the DNSSEC-validating resolvers whose AD bit relay.dane trusts "
            "(e.g. [\"127.0.0.1\"] for a local unbound)",
        )


def read_smarthost_password(config: Config) -> str | None:
    """The smarthost password (first line of its file), or None; ConfigError when unreadable.

    Kept out of the TOML file so that the configuration can stay world-readable while the
    password file is 0600.
    """
    path = config.relay.smarthost_password_file
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            config.source, "relay.smarthost_password_file", f"a readable password file: {exc}"
        ) from None
    if not password:
        raise ConfigError(
            config.source, "relay.smarthost_password_file",
            f"a file whose first line is the password; {path} has an empty first line",
        )
    return password


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``."""
    try:
        with open(path, "rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(path, "(file)", f"a readable TOML file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", str(exc)) from None
    except UnicodeDecodeError as exc:  # TOML must be UTF-8; tomllib lets this through
        raise ConfigError(path, "(syntax)", f"not valid UTF-8: {exc}") from None
    return parse_config(data, Path(path))


def demo_config(base: Path) -> Config:
    """The safe demo used when there is no configuration file at all.

    Loopback only, an unprivileged port, the local domain ``localhost`` with a catch-all
    mailbox per local part, and every file under ``base/demo-mail``. Clients can only be
    local, so no reverse DNS lookup is made (it would tell nothing and ask the system resolver),
    and no one may relay: a demo must not send mail to the Internet.
    """
    demo = Path(base).absolute() / "demo-mail"
    return Config(
        hostname="localhost",
        smtp=SmtpConfig(listen=("tcp:2525:interface=127.0.0.1",), reverse_dns=False),
        domains=DomainsConfig(local=("localhost",)),
        mailboxes=MailboxesConfig(root=demo / "mailboxes"),
        queue=QueueConfig(path=demo / "queue"),
        # The demo never sends mail out: nobody may relay through it.
        relay=RelayConfig(trusted_networks=()),
        # ... and asks no DNS: its clients are this host, whose mail needs no SPF or DKIM.
        checks=ChecksConfig(
            spf=False, dkim_verify=False, dmarc=False, protect_local_domains=False, arc=False
        ),
        # Nor does it sign with whatever keys an installed server keeps.
        dkim=DkimConfig(enabled=False),
        source=None,
    )
