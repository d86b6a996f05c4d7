"""Twisted server endpoint strings, as mailsrv's listeners take them (``smtp.listen``).

Twisted would reject a bad endpoint string only when the reactor listens, with an error that
names neither the file nor the key; :func:`check_endpoint` finds the mistake at start-up
instead, by splitting the string exactly as Twisted does and accepting only the endpoint
types and options mailsrv supports.  :func:`endpoint_options` reads a listener back for the
tools (sendmail looks for a loopback port).  Pure string work: no sockets, no files.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

__all__ = [
    "check_endpoint",
    "endpoint_options",
    "is_decimal",
    "is_ip_address",
    "tcp_endpoint_for_ssl",
]

# Parameter names of Twisted's server endpoint parsers, in their positional order
# (twisted.internet.endpoints._parseTCP, _TCP6ServerParser._parseServer, _parseSSL,
# _parseUNIX; identical in Twisted 22.4 and 26.10).
_ENDPOINT_PARAMS: dict[str, tuple[str, ...]] = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    # Implicit TLS (port 465).  Not Twisted's own ssl endpoint: the certificate comes from
    # [tls], so that one set of TLS settings (TLS 1.2 minimum, modern ciphers) serves every
    # listener and a SIGHUP renews it everywhere.  The certificate options are refused.
    "ssl": ("port", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile"),
}
_ENDPOINT_REQUIRED: dict[str, tuple[str, ...]] = {
    "tcp": ("port",),
    "tcp6": ("port",),
    "ssl": ("port",),
    "unix": ("address",),
}
_SSL_CERT_OPTIONS = ("privateKey", "certKey", "extraCertChain", "dhParameters", "sslmethod")


def is_ip_address(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (as an endpoint's interface must be)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_decimal(text: str, low: int, high: int) -> bool:
    """Whether ``text`` is ASCII digits from ``low`` to ``high``: ``int()`` alone would also
    take ``" 25"``, ``"+25"``, ``"2_5"`` and non-ASCII digits."""
    return text.isascii() and text.isdigit() and low <= int(text) <= high


# option name -> (what it takes, test)
_ENDPOINT_OPTIONS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "port": ("a number from 0 to 65535", lambda v: is_decimal(v, 0, 65535)),
    "interface": ("an IP address", is_ip_address),
    "backlog": ("an integer >= 1", lambda v: is_decimal(v, 1, 2**31 - 1)),
    "address": ("a socket path", bool),
    "mode": ("an octal mode such as 660", lambda v: re.fullmatch(r"[0-7]{1,4}", v) is not None),
    "lockfile": ("0 or 1", lambda v: v in ("0", "1")),
}


def _split_endpoint(text: str) -> list[list[str]]:
    """Split an endpoint string the way Twisted's ``endpoints._parse`` does.

    ``:`` separates fields, the first ``=`` of a field makes it ``key=value``, and a
    backslash takes the next character literally (``interface=\\:\\:1``).  Each field is
    returned as ``[value]`` or ``[key, value]``.
    """
    fields: list[list[str]] = []
    current = [""]
    chars = iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("ends with a lone backslash")
            current[-1] += escaped
        elif char == ":":
            fields.append(current)
            current = [""]
        elif char == "=" and len(current) == 1:
            current.append("")
        else:
            current[-1] += char
    fields.append(current)
    return fields


def check_endpoint(text: str) -> str:
    """Validate one Twisted server endpoint string; return it unchanged.

    Only the endpoint types mailsrv supports are accepted, with the options Twisted's own
    parser takes, so a typo fails here with a clear message instead of in the reactor.
    """
    try:
        _check_endpoint_fields(_split_endpoint(text))
    except ValueError as exc:
        # The classic mistake: "interface=::1" is split at its colons into other fields.
        unescaped = re.search(r"interface=([0-9A-Fa-f.:]*)", text)
        if unescaped and unescaped.group(1).count(":") >= 2:
            raise ValueError(f"{exc}; escape the colons of an IPv6 address: \\:") from None
        raise
    return text


def _check_endpoint_fields(fields: list[list[str]]) -> None:
    kind = fields[0][0] if len(fields[0]) == 1 else ""
    if kind not in _ENDPOINT_PARAMS:
        raise ValueError(f"the type must be one of {', '.join(_ENDPOINT_PARAMS)}")
    params = _ENDPOINT_PARAMS[kind]
    # As in Twisted, plain values fill the parameters in order wherever they appear, and
    # key=value fields name them.
    positional = [field[0] for field in fields[1:] if len(field) == 1]
    if len(positional) > len(params):
        raise ValueError(f"too many plain values for {kind} (it takes {', '.join(params)})")
    named = [(params[i], value) for i, value in enumerate(positional)]
    named += [(field[0], field[1]) for field in fields[1:] if len(field) == 2]
    options: dict[str, str] = {}
    for name, value in named:
        if kind == "ssl" and name in _SSL_CERT_OPTIONS:
            raise ValueError(f"{name} is not taken here: the certificate is [tls] cert and key")
        if name not in params:
            raise ValueError(f"unknown option {name!r} for {kind} (allowed: {', '.join(params)})")
        if name in options:
            raise ValueError(f"{name} given twice")
        options[name] = value
    for name in _ENDPOINT_REQUIRED[kind]:
        if name not in options:
            raise ValueError(f"{kind} needs {name}")
    for name, value in options.items():
        what, test = _ENDPOINT_OPTIONS[name]
        if not test(value):
            raise ValueError(f"{name} must be {what}")


def endpoint_options(text: str) -> tuple[str, dict[str, str]]:
    """The type and the options of an endpoint string from ``smtp.listen``, every value named.

    Plain values take their parameter's name by position, as in Twisted ("tcp:25:192.0.2.1"
    names interface), so that the tools that read a listener (sendmail looks for a loopback
    port) see what Twisted will use.  For strings this module accepted; others give what
    they spell.
    """
    fields = _split_endpoint(text)
    kind = fields[0][0]
    positional = [field[0] for field in fields[1:] if len(field) == 1]
    options = dict(zip(_ENDPOINT_PARAMS.get(kind, ()), positional))
    options.update((field[0], field[1]) for field in fields[1:] if len(field) == 2)
    return kind, options


def tcp_endpoint_for_ssl(text: str) -> str:
    """The plain TCP endpoint under an ``ssl:`` listener (mailsrv layers TLS on it itself).

    The ``ssl`` options accepted here (port, interface, backlog) are ``tcp``'s, in ``tcp``'s
    positional order, so the rest of the string carries over unchanged, escapes included.
    """
    assert text.startswith("ssl:")
    return "tcp:" + text[len("ssl:"):]
