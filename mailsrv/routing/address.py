"""
SMTP paths and parameters: parsing, normalisation, and safe mailbox names.

Twisted's own ``smtp.Address`` is lenient in ways that matter for a server on the open
Internet: it accepts several '@', silently keeps source routes and %-hacks, and leaves domains
in whatever case the client sent.  Everything that decides who gets a message (router, policy)
wants one canonical form, so this module turns the raw bytes after ``MAIL``/``RCPT`` into a
:class:`Mailbox` with a normalised domain, or refuses them with the exact SMTP reply.

It is pure: no I/O, no reactor, so every corner of the grammar is tested directly.

The grammar is RFC 5321 section 4.1.2 (``Path``, ``Mailbox``, ``Local-part``, address
literals) with the section 4.5.3.1 size limits, and RFC 6531's extension of it: after
``MAIL FROM:<...> SMTPUTF8`` a path may hold UTF-8 (atext and qtext gain every printable
non-ASCII character; a domain may be written in U-labels, normalised here to A-labels, so that
``jörg@bücher.example`` and ``jörg@xn--bcher-kva.example`` are one mailbox).  Without the
keyword any octet outside ASCII in a path is refused with ``553 5.6.7``.  Local parts are kept
in Unicode's NFC, so that the two spellings of ``ö`` (one code point, or ``o`` and a combining
diaeresis) are one mailbox too.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

from mailsrv import replies
from mailsrv.replies import Refusal, Reply
from mailsrv.routing.localpart import (
    MAX_LOCAL_PART,
    fold_local,
    is_safe_local_part,
    printable_utf8,
)

__all__ = [
    "Mailbox",
    "parse_mail_from",
    "parse_rcpt_to",
    "normalise_domain",
    "host_domains",
    "is_safe_local_part",
    "is_dot_atom",
    "fold_local",
    "MAX_LOCAL_PART",
    "MAX_DOMAIN",
    "MAX_PATH",
]

# RFC 5321 section 4.5.3.1: sizes in octets.
MAX_DOMAIN = 255
MAX_PATH = 256  # including the angle brackets, the source route and its separators
# DNS: 253 octets of presentation form without the final dot (RFC 1035 section 2.3.4).
_MAX_DNS_NAME = 253
_MAX_LABEL = 63


# atext of RFC 5321/5322: letters, digits and these specials.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
# RFC 6531 section 3.3: atext =/ UTF8-non-ascii (which characters of it are refused is
# printable_utf8's business).
_UTEXT = _ATEXT + "\u0080-\U0010ffff"
_DOT_ATOM_RE = re.compile(rf"[{_UTEXT}]+(?:\.[{_UTEXT}]+)*\Z")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE_RE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")  # printable ASCII except '=' and space


def is_dot_atom(text: str) -> bool:
    """True when ``text`` is an RFC 5321 Dot-string (atoms of atext joined by single dots),
    with RFC 6531's UTF-8 atext (printable non-ASCII characters only).

    A local part that is a dot-atom needs no quoting; the loaders use this too, so that every
    name in the users and aliases files can actually be written in a ``RCPT TO``.
    """
    return bool(_DOT_ATOM_RE.match(text)) and printable_utf8(text)


@dataclass(frozen=True)
class Mailbox:
    """One mailbox of a path, in canonical form.

    ``local`` is dequoted and keeps its case (RFC 5321 says only the receiving host may
    interpret it); ``domain`` is normalised so that comparisons are plain string equality.
    ``quoted`` and ``source_route`` record how the client wrote it, because such disguises
    matter to the relay policy even though they do not change the address.
    """

    local: str
    domain: str
    quoted: bool = False
    source_route: bool = False

    def __str__(self) -> str:
        if self.domain == "":
            # RFC 5321's special <postmaster>, the only mailbox without a domain.
            return "postmaster"
        local = self.local if is_dot_atom(self.local) else _quote(self.local)
        return f"{local}@{self.domain}"

    @property
    def is_address_literal(self) -> bool:
        """True for ``user@[192.0.2.1]`` style addresses (they bypass domain-based rules)."""
        return self.domain.startswith("[")

    @property
    def relay_tokens(self) -> bool:
        """True when the local part holds '@', '%' or '!'.

        Those are the old relay syntaxes (quoted '@', the %-hack, UUCP bang paths): a server
        that ever interprets them can be made an open relay, so the policy refuses them from
        clients that may not relay anyway.
        """
        return any(c in self.local for c in "@%!")


def _quote(local: str) -> str:
    """The local part as an RFC 5321 Quoted-string."""
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def normalise_domain(domain: str) -> str:
    """The canonical form of a host name: lower case, A-labels, no trailing dot.

    Raises ``ValueError`` (with a reason) for anything that is not a valid DNS host name.
    One canonical form lets the router and config compare domains with ``==``; the checks
    refuse names that can never resolve, rather than letting them into queues and Maildirs.
    Address literals are not host names and are refused here (the path parser handles them).
    """
    if not isinstance(domain, str):
        raise ValueError("domain must be a string")
    name = domain.lower()
    if not name.isascii():
        try:
            # The stdlib "idna" codec (IDNA 2003): nameprep, then ToASCII per label.  It also
            # maps ideographic full stops to '.'.
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError as exc:
            raise ValueError(f"invalid internationalised domain {domain!r}: {exc}") from None
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("empty domain")
    if len(name) > _MAX_DNS_NAME:
        raise ValueError(f"domain longer than {_MAX_DNS_NAME} octets")
    for label in name.split("."):
        if not label:
            raise ValueError(f"empty label in domain {domain!r}")
        if len(label) > _MAX_LABEL:
            raise ValueError(f"label longer than {_MAX_LABEL} octets in domain {domain!r}")
        if not _LABEL_RE.match(label):
            raise ValueError(
                f"label {label!r} in domain {domain!r}: only letters, digits and inner hyphens"
            )
        if label.startswith("xn--"):
            # An A-label must decode, or two spellings could name one domain (or none).
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                raise ValueError(
                    f"label {label!r} in domain {domain!r} is not valid punycode"
                ) from None
    if label.isdigit():
        # RFC 1123 section 2.1: a host name never looks like a dotted-decimal address, which
        # must be written as an address literal "[192.0.2.1]" instead.
        raise ValueError(f"all-numeric top-level label in domain {domain!r}")
    return name


def _normalise_literal(literal: str) -> str:
    """Canonical form of an address literal ``[...]``, or ValueError.

    IPv4 and IPv6 are validated with ``ipaddress`` so that one address has one spelling
    (``[IPv6:2001:DB8:0::1]`` and ``[IPv6:2001:db8::1]`` are the same host).  General
    address literals (``[tag:...]``) are refused: nothing could route them.
    """
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        text = inner[5:]
        if "%" in text:  # zone ids are meaningless off-host
            raise ValueError("IPv6 zone id in address literal")
        return f"[IPv6:{ipaddress.IPv6Address(text).compressed}]"
    if ":" in inner:
        raise ValueError("unsupported address literal")
    return f"[{ipaddress.IPv4Address(inner)}]"


def _split_params(text: str) -> dict[str, str | None]:
    """``KEYWORD[=VALUE]`` tokens separated by spaces (RFC 5321 ``Mail-parameters``)."""
    params: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:
            continue  # tolerate several spaces
        key, eq, value = token.partition("=")
        if not _KEYWORD_RE.match(key):
            raise Refusal(replies.BAD_PARAMETER_SYNTAX)
        if eq and not _VALUE_RE.match(value):
            raise Refusal(replies.BAD_PARAMETER_SYNTAX)
        key = key.upper()
        if key in params:
            raise Refusal(replies.DUPLICATE_PARAMETER.format(name=key))
        params[key] = value if eq else None
    return params


def _split_path(rest: bytes, keyword: str, usage: Reply) -> tuple[str, str]:
    """Split ``FROM:<path> params`` into the path (without brackets) and the parameter text.

    Both are latin-1 decoded so that non-ASCII octets survive to be reported precisely; the
    parameters are parsed only after the path, so a bad address is what the client hears
    about first.  Raises the 501 usage error when the framing itself is wrong.
    """
    syntax = Refusal(usage)
    text = rest.decode("latin-1")
    if text[: len(keyword)].upper() != keyword:
        raise syntax
    text = text[len(keyword):].lstrip(" ")  # "MAIL FROM: <a@b>" is a common broken client
    if not text.startswith("<"):
        # Tolerated: a bare path, but only when nothing (no parameters) follows it.
        path = text.rstrip(" ")
        if not path or " " in path or "<" in path or ">" in path:
            raise syntax
        return path, ""
    # Find the closing '>' outside any quoted-string, honouring backslash escapes.
    i, in_quotes = 1, False
    while i < len(text):
        c = text[i]
        if in_quotes:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quotes = False
        elif c == '"':
            in_quotes = True
        elif c == ">":
            break
        elif c == "<":
            raise syntax
        i += 1
    else:
        raise syntax
    path, after = text[1:i], text[i + 1:]
    if after and not after.startswith(" "):
        raise syntax
    return path, after


def _parse_mailbox(
    path: str, bad: Reply, too_long: Reply, what: str, utf8: bool = False
) -> Mailbox | None:
    """Parse the inside of ``<...>``; None for the null path ``<>``.

    ``bad``/``too_long`` are the replies (5.1.7 sender / 5.1.3 recipient); ``what`` is
    "sender" or "recipient"; ``utf8``: the transaction has SMTPUTF8 (``path`` is still the
    latin-1 reading of the octets, decoded as UTF-8 here, after the sizes were measured).
    """
    if not path.isascii():
        if not utf8:
            raise Refusal(replies.NON_ASCII_ADDRESS)
        octets = path.encode("latin-1")
        if len(octets) + 2 > MAX_PATH:
            raise Refusal(too_long.format(part="path", limit=str(MAX_PATH)))
        try:
            path = octets.decode("utf-8")
        except UnicodeDecodeError:
            raise Refusal(bad) from None
        if not printable_utf8(path):
            raise Refusal(bad)
    if path == "":
        return None

    # Optional source route: "@a,@b:" (RFC 5321 A-d-l); validated, then discarded.
    source_route = False
    body = path
    if path.startswith("@"):
        route, colon, body = path.partition(":")
        if not colon:
            raise Refusal(bad)
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise Refusal(bad)
            try:
                normalise_domain(hop[1:])
            except ValueError:
                raise Refusal(bad) from None
        source_route = True

    # Local part: Quoted-string or Dot-string.
    quoted = False
    if body.startswith('"'):
        chars: list[str] = []
        i = 1
        while True:
            if i >= len(body):
                raise Refusal(bad)  # unterminated quoted-string
            c = body[i]
            if c == '"':
                break
            if c == "\\":
                i += 1
                if i >= len(body) or not 32 <= ord(body[i]) <= 126:
                    raise Refusal(bad)
                chars.append(body[i])
            elif 32 <= ord(c) <= 126 or ord(c) > 127:  # (non-ASCII only got here with utf8)
                chars.append(c)
            else:
                raise Refusal(bad)
            i += 1
        raw_local = body[: i + 1]
        local = "".join(chars)
        quoted = True
        remainder = body[i + 1:]
        if remainder and not remainder.startswith("@"):
            raise Refusal(bad)
        has_domain = bool(remainder)
        domain = remainder[1:]
    else:
        raw_local, at, domain = body.partition("@")
        local = raw_local
        has_domain = bool(at)

    # Size limits first, so that the client is told which one it broke.  The local part is
    # measured as written (a Quoted-string with its quotes, as RFC 5321 section 4.5.3.1.1
    # counts it); the path includes its angle brackets and any source route.
    if len(raw_local.encode("utf-8")) > MAX_LOCAL_PART:
        raise Refusal(too_long.format(part="local part", limit=str(MAX_LOCAL_PART)))
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise Refusal(too_long.format(part="domain", limit=str(MAX_DOMAIN)))
    if len(path.encode("utf-8")) + 2 > MAX_PATH:
        raise Refusal(too_long.format(part="path", limit=str(MAX_PATH)))

    if not quoted and not is_dot_atom(local):
        raise Refusal(bad)
    if not has_domain:
        # Only RCPT's special <postmaster> may lack a domain (RFC 5321 section 4.1.1.3).
        special = not quoted and not source_route and local.lower() == "postmaster"
        if what == "recipient" and special:
            return Mailbox("postmaster", "")
        raise Refusal(bad)
    try:
        if domain.startswith("[") and domain.endswith("]"):
            domain = _normalise_literal(domain)
        else:
            domain = normalise_domain(domain)
    except ValueError:
        raise Refusal(bad) from None
    if not local.isascii():
        local = unicodedata.normalize("NFC", local)
    return Mailbox(local, domain, quoted=quoted, source_route=source_route)


def parse_mail_from(rest: bytes) -> tuple[Mailbox | None, dict[str, str | None]]:
    """Parse what follows ``MAIL``: the reverse-path (None for ``<>``) and its parameters.

    Raises :class:`~mailsrv.replies.Refusal` with the reply to send.  Which parameters are
    *supported* is the protocol's business; this only checks their syntax, except that
    ``SMTPUTF8`` among them lets the path hold UTF-8 (RFC 6531 section 3.4).
    """
    path, after = _split_path(rest, "FROM:", replies.MAIL_SYNTAX)
    utf8 = any(token.upper() == "SMTPUTF8" for token in after.split(" "))
    mailbox = _parse_mailbox(path, replies.BAD_SENDER, replies.SENDER_TOO_LONG, "sender", utf8)
    return mailbox, _split_params(after)


def parse_rcpt_to(rest: bytes, utf8: bool = False) -> tuple[Mailbox, dict[str, str | None]]:
    """Parse what follows ``RCPT``: the forward-path and its parameters.

    ``<>`` is refused (a recipient must exist); ``<postmaster>`` without a domain is
    accepted as ``Mailbox("postmaster", "")``, which the router sends to the first local
    domain's postmaster.  ``utf8``: the transaction's MAIL had SMTPUTF8.
    """
    path, after = _split_path(rest, "TO:", replies.RCPT_SYNTAX)
    mailbox = _parse_mailbox(
        path, replies.BAD_RECIPIENT, replies.RECIPIENT_TOO_LONG, "recipient", utf8)
    if mailbox is None:
        raise Refusal(replies.BAD_RECIPIENT)
    return mailbox, _split_params(after)


def host_domains(hostname: str) -> tuple[str, ...]:
    """The host name, then its parent domain (``mx.example.org``, ``example.org``): where mail
    about the host itself belongs (its postmaster, the signatures of its bounces, its SRS
    addresses), the first that is ours."""
    parent = hostname.partition(".")[2]
    return (hostname, parent) if parent else (hostname,)
