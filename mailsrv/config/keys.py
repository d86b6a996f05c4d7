"""What each configuration key takes: a converter per kind of value, and its words.

A :class:`Key` pairs what a key takes, in words for the error message ("an integer >= 1"),
with a converter from the TOML value to the Python one.  A converter raises :class:`Invalid`
with the offending value; :mod:`mailsrv.config.load` adds the file and the dotted key and
raises :class:`~mailsrv.config.schema.ConfigError`.  Kept apart from the tables that use them
so that each rule (what a port, a smarthost or a network may be) is written once and tested
on its own.  Pure: the only thing a converter looks at is its value (paths are joined to the
configuration file's directory, never opened).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mailsrv.config.endpoints import check_endpoint
from mailsrv.routing.address import normalise_domain

__all__ = [
    "Converter",
    "Invalid",
    "Key",
    "boolean",
    "choice",
    "delimiter",
    "domain_list",
    "hostname",
    "integer",
    "list_of",
    "listen",
    "metrics_endpoint",
    "path",
    "seconds",
    "seconds_list",
    "seconds_or_zero",
    "text",
]


class Invalid(Exception):
    """Raised by a converter; mailsrv.config.load turns it into a ConfigError with file and key.

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
#: and returns the Python value or raises Invalid.
Converter = Callable[[Any, Path], Any]


@dataclass(frozen=True)
class Key:
    """One kind of key: ``wanted`` says what it takes when it is missing or wrong."""

    wanted: str  # what the key takes, in words: used when it is missing
    convert: Converter


def integer(minimum: int, maximum: int | None = None) -> Key:
    if maximum is None:
        wanted = f"an integer >= {minimum}"
    else:
        wanted = f"an integer from {minimum} to {maximum}"

    def convert(value: Any, base: Path) -> int:
        # type() rather than isinstance(): TOML true is a bool, and bool is a subclass of int.
        if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
            raise Invalid(wanted, value)
        return value

    return Key(wanted, convert)


def seconds() -> Key:
    wanted = "a number of seconds > 0"

    def convert(value: Any, base: Path) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise Invalid(wanted, value)
        return float(value)

    return Key(wanted, convert)


def seconds_or_zero() -> Key:
    wanted = "a number of seconds >= 0 (0 turns it off)"

    def convert(value: Any, base: Path) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise Invalid(wanted, value)
        return float(value)

    return Key(wanted, convert)


def seconds_list() -> Key:
    wanted = "a non-empty list of numbers of seconds > 0"
    each = seconds()

    def convert(value: Any, base: Path) -> tuple[float, ...]:
        if not isinstance(value, list) or not value:
            raise Invalid(wanted, value)
        result = []
        for index, item in enumerate(value):
            try:
                result.append(each.convert(item, base))
            except Invalid as exc:
                raise Invalid(each.wanted, item, where=f"[{index}]") from exc
        return tuple(result)

    return Key(wanted, convert)


def choice(*choices: str) -> Key:
    wanted = "one of " + ", ".join(f'"{c}"' for c in choices)

    def convert(value: Any, base: Path) -> str:
        if value not in choices:
            raise Invalid(wanted, value)
        return value

    return Key(wanted, convert)


def text() -> Key:
    wanted = "a non-empty string of printable characters"

    def convert(value: Any, base: Path) -> str:
        if not isinstance(value, str) or not value or not value.isprintable():
            raise Invalid(wanted, value)
        return value

    return Key(wanted, convert)


def boolean() -> Key:
    wanted = "true or false"

    def convert(value: Any, base: Path) -> bool:
        if type(value) is not bool:
            raise Invalid(wanted, value)
        return value

    return Key(wanted, convert)


def path() -> Key:
    wanted = "a path (a non-empty string)"

    def convert(value: Any, base: Path) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise Invalid(wanted, value)
        # Relative paths are relative to the configuration file, not to wherever twistd
        # happened to be started; an absolute path makes ``base /`` a no-op.
        return base / value

    return Key(wanted, convert)


def delimiter() -> Key:
    allowed = "+-_="
    wanted = f'"" or one of the characters {allowed}'

    def convert(value: Any, base: Path) -> str:
        # Substring test: "" (plus-addressing off) is in every string; len() stops "+-".
        if not isinstance(value, str) or len(value) > 1 or value not in allowed:
            raise Invalid(wanted, value)
        return value

    return Key(wanted, convert)


def list_of(
    wanted: str, element_wanted: str, element: Callable[[str], Any], non_empty: bool
) -> Key:
    """A list of strings, each converted by ``element`` (which raises ValueError with a reason)."""

    def convert(value: Any, base: Path) -> tuple[Any, ...]:
        if not isinstance(value, list) or (non_empty and not value):
            raise Invalid(wanted, value)
        result = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise Invalid(element_wanted, item, where=f"[{index}]")
            try:
                result.append(element(item))
            except ValueError as exc:
                raise Invalid(element_wanted, item, where=f"[{index}]", why=str(exc)) from None
        return tuple(result)

    return Key(wanted, convert)


# ----- domain names (normalised by address.normalise_domain, so that the domains here and
# the domains of RCPT TO compare with ==)


def domain_list(non_empty: bool = True) -> Key:
    inner = list_of(
        "a non-empty list of domain names" if non_empty else "a list of domain names",
        "a domain name", normalise_domain, non_empty=non_empty,
    )

    def convert(value: Any, base: Path) -> tuple[str, ...]:
        return tuple(dict.fromkeys(inner.convert(value, base)))  # de-duplicate, keep order

    return Key(inner.wanted, convert)


def hostname() -> Key:
    wanted = "a domain name"

    def convert(value: Any, base: Path) -> str:
        if not isinstance(value, str):
            raise Invalid(wanted, value)
        try:
            return normalise_domain(value)
        except ValueError as exc:
            raise Invalid(wanted, value, why=str(exc)) from None

    return Key(wanted, convert)


def report_uris() -> Key:
    """TLS-RPT rua URIs (RFC 8460 §3): ``mailto:`` an address, or ``https:`` a URL."""
    def check(uri: str) -> str:
        scheme, _, rest = uri.partition(":")
        if scheme.lower() == "mailto" and re.fullmatch(r"[^@\s,;!]+@[A-Za-z0-9.-]+", rest):
            return uri
        if scheme.lower() == "https" and re.fullmatch(r"//[A-Za-z0-9.-]+(:[0-9]+)?(/[^\s,;!]*)?", rest):
            return uri
        raise ValueError("not mailto:address or https://host/path (no commas, semicolons, !)")

    return list_of("a list of mailto: or https: URIs", "a mailto: or https: URI", check,
                   non_empty=False)


# ----- listen endpoints (checked by mailsrv.config.endpoints)


def listen(non_empty: bool = True) -> Key:
    return list_of(
        "a non-empty list of endpoint strings" if non_empty else "a list of endpoint strings",
        "an endpoint such as 'tcp:25', 'tcp:25:interface=192.0.2.1', 'ssl:465' "
        "(implicit TLS with the [tls] certificate) or 'unix:/run/mailsrv.sock'",
        check_endpoint,
        non_empty=non_empty,
    )


def metrics_endpoint() -> Key:
    """One plain endpoint (no ``ssl:``: the metrics are served in clear, on loopback or a
    private network)."""
    wanted = "an endpoint such as 'tcp:9125:interface=127.0.0.1' or 'unix:/run/mailsrv/metrics'"

    def convert(value: Any, base: Path) -> str:
        if not isinstance(value, str):
            raise Invalid(wanted, value)
        if value.startswith("ssl:"):
            raise Invalid(wanted, value, why="ssl: is for the mail listeners")
        try:
            return check_endpoint(value)
        except ValueError as exc:
            raise Invalid(wanted, value, why=str(exc)) from None

    return Key(wanted, convert)


# ----- relay
