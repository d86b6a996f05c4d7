"""Configuration: one TOML file turned into frozen dataclasses.

Every problem is found at start-up, before a socket is opened, and is reported as a
:class:`ConfigError` naming the file, the dotted key (``smtp.listen[1]``) and what was
expected, so that an administrator can fix the file without reading the source.

Validation is table-driven: each table is a dataclass plus a mapping of its keys to a
:class:`_Key` (a description of what the key takes and a converter).  A key that is absent
from the file takes the dataclass default; a dataclass field without a default is a
required key.  Unknown keys are errors rather than being ignored, because a misspelt
``max_recipents`` silently keeping its default is the kind of mistake nobody notices until
it matters.

The only I/O here is reading the configuration file (:func:`load_config`) and creating and
probing the two data directories (:func:`prepare_directories`).
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import math
import os
import re
import secrets
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mailsrv.address import normalise_domain
from mailsrv.config.endpoints import check_endpoint, is_decimal, is_ip_address
from mailsrv.config.schema import (
    AuthConfig,
    Config,
    ConfigError,
    DomainsConfig,
    IPNetwork,
    MailboxesConfig,
    QueueConfig,
    RelayConfig,
    SmtpConfig,
    SubmissionConfig,
    TlsConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "demo_config",
    "load_config",
    "parse_config",
    "prepare_directories",
    "read_smarthost_password",
]

DEFAULT_CONFIG_PATH = Path("/etc/mailsrv/mailsrv.toml")


# --------------------------------------------------------------------------- validators


class _Invalid(Exception):
    """Raised by a converter; parse_config turns it into a ConfigError with file and key.

    ``where`` is appended to the key (``"[1]"`` for the second list element); ``why`` is an
    optional explanation added after the offending value.
    """

    def __init__(self, wanted: str, value: Any, where: str = "", why: str = "") -> None:
        expected = f"expected {wanted}, got {value!r}"
        if why:
            expected += f" ({why})"
        super().__init__(expected)
        self.expected = expected
        self.where = where


#: A converter takes the TOML value and the directory relative paths are resolved against,
#: and returns the Python value or raises _Invalid.
Converter = Callable[[Any, Path], Any]


@dataclass(frozen=True)
class _Key:
    wanted: str  # what the key takes, in words: used when it is missing
    convert: Converter


def _integer(minimum: int, maximum: int | None = None) -> _Key:
    if maximum is None:
        wanted = f"an integer >= {minimum}"
    else:
        wanted = f"an integer from {minimum} to {maximum}"

    def convert(value: Any, base: Path) -> int:
        # type() rather than isinstance(): TOML true is a bool, and bool is a subclass of int.
        if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
            raise _Invalid(wanted, value)
        return value

    return _Key(wanted, convert)


def _seconds() -> _Key:
    wanted = "a number of seconds > 0"

    def convert(value: Any, base: Path) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise _Invalid(wanted, value)
        return float(value)

    return _Key(wanted, convert)


def _seconds_or_zero() -> _Key:
    wanted = "a number of seconds >= 0 (0 turns it off)"

    def convert(value: Any, base: Path) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise _Invalid(wanted, value)
        return float(value)

    return _Key(wanted, convert)


def _seconds_list() -> _Key:
    wanted = "a non-empty list of numbers of seconds > 0"
    each = _seconds()

    def convert(value: Any, base: Path) -> tuple[float, ...]:
        if not isinstance(value, list) or not value:
            raise _Invalid(wanted, value)
        result = []
        for index, item in enumerate(value):
            try:
                result.append(each.convert(item, base))
            except _Invalid as exc:
                raise _Invalid(each.wanted, item, where=f"[{index}]") from exc
        return tuple(result)

    return _Key(wanted, convert)


def _choice(*choices: str) -> _Key:
    wanted = "one of " + ", ".join(f'"{c}"' for c in choices)

    def convert(value: Any, base: Path) -> str:
        if value not in choices:
            raise _Invalid(wanted, value)
        return value

    return _Key(wanted, convert)


def _text() -> _Key:
    wanted = "a non-empty string of printable characters"

    def convert(value: Any, base: Path) -> str:
        if not isinstance(value, str) or not value or not value.isprintable():
            raise _Invalid(wanted, value)
        return value

    return _Key(wanted, convert)


def _boolean() -> _Key:
    wanted = "true or false"

    def convert(value: Any, base: Path) -> bool:
        if type(value) is not bool:
            raise _Invalid(wanted, value)
        return value

    return _Key(wanted, convert)


def _path() -> _Key:
    wanted = "a path (a non-empty string)"

    def convert(value: Any, base: Path) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise _Invalid(wanted, value)
        # Relative paths are relative to the configuration file, not to wherever twistd
        # happened to be started; an absolute path makes ``base /`` a no-op.
        return base / value

    return _Key(wanted, convert)


def _delimiter() -> _Key:
    allowed = "+-_="
    wanted = f'"" or one of the characters {allowed}'

    def convert(value: Any, base: Path) -> str:
        # Substring test: "" (plus-addressing off) is in every string; len() stops "+-".
        if not isinstance(value, str) or len(value) > 1 or value not in allowed:
            raise _Invalid(wanted, value)
        return value

    return _Key(wanted, convert)


def _list_of(
    wanted: str, element_wanted: str, element: Callable[[str], Any], non_empty: bool
) -> _Key:
    """A list of strings, each converted by ``element`` (which raises ValueError with a reason)."""

    def convert(value: Any, base: Path) -> tuple[Any, ...]:
        if not isinstance(value, list) or (non_empty and not value):
            raise _Invalid(wanted, value)
        result = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise _Invalid(element_wanted, item, where=f"[{index}]")
            try:
                result.append(element(item))
            except ValueError as exc:
                raise _Invalid(element_wanted, item, where=f"[{index}]", why=str(exc)) from None
        return tuple(result)

    return _Key(wanted, convert)


# ----- domain names (normalised by address.normalise_domain, so that the domains here and
# the domains of RCPT TO compare with ==)


def _domain_list() -> _Key:
    inner = _list_of(
        "a non-empty list of domain names", "a domain name", normalise_domain, non_empty=True
    )

    def convert(value: Any, base: Path) -> tuple[str, ...]:
        return tuple(dict.fromkeys(inner.convert(value, base)))  # de-duplicate, keep order

    return _Key(inner.wanted, convert)


def _hostname() -> _Key:
    wanted = "a domain name"

    def convert(value: Any, base: Path) -> str:
        if not isinstance(value, str):
            raise _Invalid(wanted, value)
        try:
            return normalise_domain(value)
        except ValueError as exc:
            raise _Invalid(wanted, value, why=str(exc)) from None

    return _Key(wanted, convert)


def _listen(non_empty: bool = True) -> _Key:
    return _list_of(
        "a non-empty list of endpoint strings" if non_empty else "a list of endpoint strings",
        "an endpoint such as 'tcp:25', 'tcp:25:interface=192.0.2.1', 'ssl:465' "
        "(implicit TLS with the [tls] certificate) or 'unix:/run/mailsrv.sock'",
        check_endpoint,
        non_empty=non_empty,
    )


# ----- relay


def _network(text: str) -> IPNetwork:
    # strict=True: "10.0.0.1/8" is almost certainly a typo for a host or for "10.0.0.0/8",
    # and guessing which one would silently widen who may relay.
    return ipaddress.ip_network(text, strict=True)


def _dns_server(text: str) -> tuple[str, int]:
    """``"192.0.2.1"``, ``"192.0.2.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` -> (host, port)."""
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
        if not isinstance(_ip(host), ipaddress.IPv6Address):
            raise ValueError("only an IPv6 address goes in brackets")
    elif text.count(":") == 1:
        host, port = text.split(":")
        if not isinstance(_ip(host), ipaddress.IPv4Address):
            raise ValueError("write an IPv6 address with a port as [address]:port")
    else:
        host, port = text, None
    address = _ip(host)
    if port is None:
        return (str(address), 53)
    if not is_decimal(port, 1, 65535):
        raise ValueError("the port must be from 1 to 65535")
    return (str(address), int(port))


def _smarthost() -> _Key:
    wanted = 'a host with an optional port: "smtp.example.net", "smtp.example.net:587", "192.0.2.25:587" or "[2001:db8::25]:587"'

    def convert(value: Any, base: Path) -> tuple[str, int]:
        if not isinstance(value, str):
            raise _Invalid(wanted, value)
        bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", value)
        if bracketed:
            host, port = bracketed.group(1), bracketed.group(2)
        elif value.count(":") == 1:
            host, port = value.split(":")
        else:
            host, port = value, None
        try:
            host = str(ipaddress.ip_address(host)) if is_ip_address(host) else normalise_domain(host)
        except ValueError as exc:
            raise _Invalid(wanted, value, why=str(exc)) from None
        if port is None:
            return (host, 25)
        if not is_decimal(port, 1, 65535):
            raise _Invalid(wanted, value, why="the port must be from 1 to 65535")
        return (host, int(port))

    return _Key(wanted, convert)


_TLS_MODES = ("opportunistic", "verify", "none")


def _tls_policy() -> _Key:
    wanted = 'a table of domain = "opportunistic" | "verify" | "none"'

    def convert(value: Any, base: Path) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise _Invalid(wanted, value)
        result = []
        for domain, mode in value.items():
            try:
                name = normalise_domain(domain)
            except ValueError as exc:
                raise _Invalid("a domain name", domain, where=f".{domain}", why=str(exc)) from None
            if mode not in _TLS_MODES:
                raise _Invalid(_choice(*_TLS_MODES).wanted, mode, where=f".{domain}")
            result.append((name, mode))
        return tuple(result)

    return _Key(wanted, convert)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


# --------------------------------------------------------------------------- schema

# table name -> (dataclass, its keys).  Required keys are the dataclass fields without a
# default; a table holding a required key is itself required.
_TABLES: dict[str, tuple[type, dict[str, _Key]]] = {
    "smtp": (
        SmtpConfig,
        {
            "listen": _listen(),
            "max_message_size": _integer(1024),
            "max_recipients": _integer(1),
            "idle_timeout": _seconds(),
            "data_timeout": _seconds(),
            "max_connections": _integer(1),
            "max_connections_per_ip": _integer(1),
            "junk_command_limit": _integer(1),
            "max_received_headers": _integer(1),
            "reverse_dns": _boolean(),
            "auth": _boolean(),
        },
    ),
    "tls": (TlsConfig, {"cert": _path(), "key": _path()}),
    "submission": (
        SubmissionConfig,
        {"listen": _listen(non_empty=False), "check_from_header": _boolean()},
    ),
    "auth": (
        AuthConfig,
        {
            "max_failures": _integer(1),
            "window": _seconds(),
            "lockout": _seconds(),
            "failure_delay": _seconds_or_zero(),
        },
    ),
    "domains": (DomainsConfig, {"local": _domain_list()}),
    "mailboxes": (
        MailboxesConfig,
        {
            "root": _path(),
            "users": _path(),
            "aliases": _path(),
            "recipient_delimiter": _delimiter(),
        },
    ),
    "queue": (
        QueueConfig,
        {
            "path": _path(),
            "retry_schedule": _seconds_list(),
            "max_age": _seconds(),
            "delay_warning": _seconds_or_zero(),
        },
    ),
    "relay": (
        RelayConfig,
        {
            "trusted_networks": _list_of(
                "a list of networks",
                "a network such as '192.0.2.0/24' or '2001:db8::/32' with no host bits set",
                _network,
                non_empty=False,
            ),
            "dns_servers": _list_of(
                "a list of DNS server addresses",
                "an IP address with an optional port: '192.0.2.53', '192.0.2.53:5353', "
                "'2001:db8::53' or '[2001:db8::53]:5353'",
                _dns_server,
                non_empty=False,
            ),
            "port": _integer(1, 65535),
            "smarthost": _smarthost(),
            "smarthost_user": _text(),
            "smarthost_password_file": _path(),
            "tls": _choice(*_TLS_MODES),
            "tls_policy": _tls_policy(),
            "tls_ca_file": _path(),
            "max_connections": _integer(1),
            "max_connections_per_domain": _integer(1),
            "connect_timeout": _seconds(),
            "timeout": _seconds(),
        },
    ),
}
_TOP_LEVEL_KEYS = ("hostname", *_TABLES)
_HOSTNAME = _hostname()


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
    cls, keys = _TABLES[name]
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
    _reject_unknown(raw, tuple(keys), f"{name}.", source)
    values: dict[str, Any] = {}
    for key, spec in keys.items():
        if key in raw:
            try:
                values[key] = spec.convert(raw[key], base)
            except _Invalid as exc:
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
        except _Invalid as exc:
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

    tables = {name: _build_table(name, data.get(name), base, source) for name in _TABLES}
    _check_smarthost(tables["relay"], source)
    config = Config(hostname=hostname, source=source, **tables)
    _check_tls(config)
    return config


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
        source=None,
    )


def prepare_directories(config: Config) -> None:
    """Create the mailbox root and the queue directory, and prove both can be written.

    Finding out at start-up is the point: otherwise the first message would be accepted
    up to DATA and then fail with 451.  Permission bits are not inspected (root ignores
    them); a probe file is created and removed instead.
    """
    directories = (("mailboxes.root", config.mailboxes.root), ("queue.path", config.queue.path))
    for key, path in directories:
        try:
            _make_directory(path)
            probe = path / f".mailsrv-probe-{os.getpid()}-{secrets.token_hex(4)}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                config.source, key, f"a directory mailsrv can write: {exc}"
            ) from None


def _make_directory(path: Path) -> None:
    """``mkdir -p`` where every directory created gets mode 0700 (parents included)."""
    try:
        path.mkdir(mode=0o700)
    except FileNotFoundError:
        if path.parent == path:
            raise
        _make_directory(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, "exists and is not a directory", str(path)
            ) from None
