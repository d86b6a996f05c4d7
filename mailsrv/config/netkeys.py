"""The converters of the keys that name things on the network: trusted networks, DNS servers,
the smarthost, an HTTP service's URL, TLS modes per domain, DNS zones with weights (pure; the
Key and Invalid they return and raise are mailsrv.config.keys').  Split from keys.py, which
keeps the generic kinds (numbers, durations, paths, names, listeners)."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from pathlib import Path
from typing import Any

from mailsrv.config.endpoints import is_decimal, is_ip_address
from mailsrv.config.keys import Invalid, Key, choice, list_of
from mailsrv.config.schema import IPNetwork, LmtpDelivery
from mailsrv.routing.address import normalise_domain

__all__ = [
    "TLS_MODES", "delivery", "dns_servers", "http_url", "networks", "smarthost", "tls_policy", "zone_weights",
]


def networks() -> Key:
    return list_of(
        "a list of networks",
        "a network such as '192.0.2.0/24' or '2001:db8::/32' with no host bits set",
        _network,
        non_empty=False,
    )


def _network(text: str) -> IPNetwork:
    # strict=True: "10.0.0.1/8" is almost certainly a typo for a host or for "10.0.0.0/8",
    # and guessing which one would silently widen who may relay.
    return ipaddress.ip_network(text, strict=True)


def dns_servers() -> Key:
    return list_of(
        "a list of DNS server addresses",
        "an IP address with an optional port: '192.0.2.53', '192.0.2.53:5353', "
        "'2001:db8::53' or '[2001:db8::53]:5353'",
        _dns_server,
        non_empty=False,
    )


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


def smarthost() -> Key:
    wanted = (
        'a host with an optional port: "smtp.example.net", "smtp.example.net:587", '
        '"192.0.2.25:587" or "[2001:db8::25]:587"'
    )

    def convert(value: Any, base: Path) -> tuple[str, int]:
        if not isinstance(value, str):
            raise Invalid(wanted, value)
        bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", value)
        if bracketed:
            host, port = bracketed.group(1), bracketed.group(2)
        elif value.count(":") == 1:
            host, port = value.split(":")
        else:
            host, port = value, None
        try:
            if is_ip_address(host):
                host = str(ipaddress.ip_address(host))
            else:
                host = normalise_domain(host)
        except ValueError as exc:
            raise Invalid(wanted, value, why=str(exc)) from None
        if port is None:
            return (host, 25)
        if not is_decimal(port, 1, 65535):
            raise Invalid(wanted, value, why="the port must be from 1 to 65535")
        return (host, int(port))

    return Key(wanted, convert)


def http_url() -> Key:
    """An ``http://host[:port]`` URL (rspamd's): plain HTTP (rspamd speaks no TLS; its own
    encryption, HTTPCrypt, is not supported), no path, query or credentials.  Normalised to
    ``http://host:port``, IPv6 hosts in brackets."""
    wanted = 'an http URL with a host and an optional port: "http://127.0.0.1:11333"'

    def convert(value: Any, base: Path) -> str:
        if not isinstance(value, str) or not value.isprintable() or " " in value:
            raise Invalid(wanted, value)
        try:
            parts = urllib.parse.urlsplit(value)
            port = parts.port
            host = parts.hostname
        except ValueError as exc:
            raise Invalid(wanted, value, why=str(exc)) from None
        if parts.scheme.lower() != "http":
            raise Invalid(wanted, value, why="only http:// is spoken")
        if not host or parts.username is not None or parts.password is not None:
            raise Invalid(wanted, value, why="a host and no user name")
        if port == 0:
            raise Invalid(wanted, value, why="the port must be from 1 to 65535")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise Invalid(wanted, value, why="no path: /checkv2 is added")
        try:
            if is_ip_address(host):
                address = ipaddress.ip_address(host)
                host = f"[{address}]" if address.version == 6 else str(address)
            else:
                host = normalise_domain(host)
        except ValueError as exc:
            raise Invalid(wanted, value, why=str(exc)) from None
        return f"http://{host}:{80 if port is None else port}"

    return Key(wanted, convert)


TLS_MODES = ("opportunistic", "verify", "none")


def tls_policy() -> Key:
    wanted = 'a table of domain = "opportunistic" | "verify" | "none"'

    def convert(value: Any, base: Path) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise Invalid(wanted, value)
        result = []
        for domain, mode in value.items():
            try:
                name = normalise_domain(domain)
            except ValueError as exc:
                raise Invalid("a domain name", domain, where=f".{domain}", why=str(exc)) from None
            if mode not in TLS_MODES:
                raise Invalid(choice(*TLS_MODES).wanted, mode, where=f".{domain}")
            result.append((name, mode))
        return tuple(result)

    return Key(wanted, convert)


def zone_weights() -> Key:
    wanted = "a table of DNS zone = weight (an integer >= 1)"

    def convert(value: Any, base: Path) -> tuple[tuple[str, int], ...]:
        if not isinstance(value, dict):
            raise Invalid(wanted, value)
        result = []
        for zone, weight in value.items():
            try:
                name = normalise_domain(zone)
            except ValueError as exc:
                raise Invalid("a DNS zone", zone, where=f".{zone}", why=str(exc)) from None
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise Invalid("an integer >= 1", weight, where=f".{zone}")
            result.append((name, weight))
        return tuple(result)

    return Key(wanted, convert)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def delivery() -> Key:
    """``[mailboxes] delivery``: "maildir" (None), or Dovecot's LMTP on a Unix socket or TCP."""
    wanted = '"maildir", "lmtp:unix:/PATH" or "lmtp:tcp:HOST:PORT"'

    def convert(value: Any, base: Path) -> LmtpDelivery | None:
        if value == "maildir":
            return None
        if not isinstance(value, str) or not value.startswith("lmtp:"):
            raise Invalid(wanted, value)
        kind, _, rest = value[len("lmtp:"):].partition(":")
        if kind == "unix" and rest:
            return LmtpDelivery(path=base / rest)
        if kind == "tcp":
            host, _, port = rest.rpartition(":")
            host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if host and is_decimal(port, 1, 65535):
                return LmtpDelivery(host=host, port=int(port))
        raise Invalid(wanted, value)

    return Key(wanted, convert)
