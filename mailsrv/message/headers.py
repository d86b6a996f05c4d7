"""Trace headers we prepend (``Return-Path:``, ``Delivered-To:``, ``Received:``,
``Message-ID:``); reading the message's own header section is ``headsection``'s.

Pure: no I/O, no clock unless asked (``make_message_id`` reads the time).

Why this module exists: Twisted's default ``Received:`` copies the raw HELO text
into the header (a client can inject whole header lines with CR/LF) and is
malformed besides (unbalanced parentheses, no ``;`` before the date).  Here every
value that came from the client is reduced to a safe character set before it is
placed into a header, so nothing a client sends can open a new header line or
unbalance a comment.

All results use LF line ends, like the spool file they are prepended to.
"""

from __future__ import annotations

import datetime
import email.utils
import ipaddress
import re
import secrets

from mailsrv.message.headsection import is_field

__all__ = [
    "HEAD_LIMIT",
    "delivered_to",
    "local_received_header",
    "PROTOCOLS",
    "needs_separator",
    "return_path",
    "date_header",
    "make_message_id",
    "message_id_header",
    "received_header",
]

#: How many bytes of a queued message a bounce reads to quote the original's header
#: section (the submission and loop checks read the whole section: ``headsection``).
HEAD_LIMIT = 65536

#: The ``with`` keywords we may write (RFC 5321 §4.4, RFC 3848, RFC 6531 §4.3 for SMTPUTF8).
PROTOCOLS = frozenset({"SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA",
                       "UTF8SMTP", "UTF8SMTPS", "UTF8SMTPA", "UTF8SMTPSA"})

# Longest client-supplied token (HELO argument, reverse DNS name, our own names)
# we copy into a header: a domain is at most 255 octets, and the cap keeps
# every line of the Received: field far below the 998-octet limit.
_NAME_CAP = 255
# Longest address copied into "for <...>" / "Return-Path: <...>"
# (RFC 5321 §4.5.3.1: a path is at most 256 octets; leave some slack).
_ADDRESS_CAP = 320

# Characters allowed in a token placed outside or inside a comment of a
# Received: field: printable ASCII without whitespace and without the
# characters that open/close comments, quoted strings, angle addresses,
# escapes, or end the token list (';').
_TOKEN_BAD = re.compile(r'[^\x21-\x7e]|[()\\;<>"]')
# Addresses go inside <...>.  Angle brackets and controls are dropped.  Inside
# an angle-addr a parser also honours comments "(...)", quoted strings and
# backslash escapes (RFC 5322 CFWS), so those (and ';', whitespace) are only
# kept within a well-formed quoted local part, where they are literal.
_ADDRESS_DROP = re.compile(r"[\x00-\x1f\x7f<>]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_ADDRESS_BAD = re.compile(r'[()\\;"\s]')
_QUOTED_ADDRESS = re.compile(r'("(?:[^"\\]|\\.)*")(@[^()\\;"\s]*)?')
# msg-id parts (RFC 5322 §3.6.4): id-left is dot-atom-text; we use letters,
# digits and a few atext specials so the id is also safe in file names/logs.
_ID_LEFT_BAD = re.compile(r"[^A-Za-z0-9._-]")
_HOST_BAD = re.compile(r"[^A-Za-z0-9.-]")


def date_header(when: datetime.datetime) -> bytes:
    """``Date:`` for a submitted message that has none (RFC 6409 §8.2)."""
    return f"Date: {email.utils.format_datetime(when)}\n".encode("ascii")


def needs_separator(head: bytes) -> bool:
    """Whether our prepended headers must be followed by an empty line.

    Without it, the first line of a bare body (say ``Hello``, or `` indented``
    which would even fold into our last header) would become part of the header
    section.  An empty message gets the separator too (headers + empty line
    is a well-formed message); a message that starts with an empty line or a
    header field needs none.
    """
    if head == b"":
        return True
    first = head.split(b"\n", 1)[0]
    if first.endswith(b"\r"):
        first = first[:-1]
    if first == b"":
        return False
    return not is_field(first)


# --- sanitising ----------------------------------------------------------------


def _token(value: str | None, *, default: str) -> str:
    """Reduce a client-supplied (or configured) name to one safe header token.

    Every character that could end the line, leave a comment, start a quoted
    string or angle address, or end the token list becomes ``?``; the result is
    capped at ``_NAME_CAP`` characters and replaced by *default* when empty.
    """
    if not value:
        return default
    cleaned = _TOKEN_BAD.sub("?", value[: _NAME_CAP * 2])[:_NAME_CAP]
    return cleaned or default


def _address(value: str | None, utf8: bool = False) -> str:
    """An address made safe to write between ``<`` and ``>``.

    Angle brackets, CR, LF and other controls are dropped; non-ASCII
    characters become ``?`` (the prefix must be ASCII).  Characters that a
    header parser would take as the start of a comment, quoted string or
    escape become ``?`` unless they sit in a well-formed quoted local part
    (``"john doe"@example.org`` is kept as it is).  Length is capped (an
    over-long value loses its tail, and with it any quoting).  ``utf8``: printable non-ASCII
    characters are kept (a message with SMTPUTF8 may have UTF-8 header fields, RFC 6532);
    the others still become ``?``.
    """
    if not value:
        return ""
    cleaned = _ADDRESS_DROP.sub("", value[: _ADDRESS_CAP * 2])
    if utf8:
        cleaned = "".join(c if c.isascii() or c.isprintable() else "?" for c in cleaned)
    else:
        cleaned = _NON_ASCII.sub("?", cleaned)
    if len(cleaned) <= _ADDRESS_CAP and _QUOTED_ADDRESS.fullmatch(cleaned):
        return cleaned
    return _ADDRESS_BAD.sub("?", cleaned[:_ADDRESS_CAP])


def _hostname(value: str) -> str:
    """Our host name as a dot-atom usable on the right of a msg-id."""
    cleaned = _HOST_BAD.sub("-", value or "")
    labels = [label for label in cleaned.split(".") if label]
    return ".".join(labels)[:_NAME_CAP] or "localhost"


def _ip_literal(client_ip: str) -> str:
    """The address literal for the ``from`` comment (RFC 5321 §4.1.3).

    IPv4-mapped IPv6 addresses are shown as IPv4 (that is what the client
    used); a zone index (``%eth0``) is dropped.  Raises ValueError for
    something that is not an IP address: that is a caller bug, not client
    input, and must not be written into a trace header.
    """
    text = client_ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    text = text.split("%", 1)[0]
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


# --- builders ------------------------------------------------------------------


def return_path(sender: str | None, utf8: bool = False) -> bytes:
    """``Return-Path:`` for the envelope sender; the null sender gives ``<>``.  ``utf8``:
    the message came with SMTPUTF8, and a UTF-8 address is written as UTF-8 (RFC 6532)."""
    return f"Return-Path: <{_address(sender, utf8)}>\n".encode("utf-8")


def delivered_to(mailbox: str, utf8: bool = False) -> bytes:
    """``Delivered-To:`` naming the mailbox a local copy lands in (as Postfix's local does).

    What Sieve's ``envelope "to"`` fallbacks, loop detectors and mail readers use to tell
    which of a user's addresses a copy was delivered to: the final address, after aliases,
    written as a bare addr-spec (Postfix's form) made safe like ``Return-Path:``.
    """
    return f"Delivered-To: {_address(mailbox, utf8)}\n".encode("utf-8")


def make_message_id(queue_id: str, hostname: str) -> str:
    """A new msg-id (with angle brackets) for a message that has none.

    The left part is the UTC time plus the queue id, which is unique per
    message on this host; the right part is our host name, reduced to letters,
    digits, '-' and '.' so the result always parses as an RFC 5322 msg-id.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    left_id = _ID_LEFT_BAD.sub("", queue_id or "").strip(".")
    left_id = re.sub(r"\.{2,}", ".", left_id)[:64] or secrets.token_hex(8)
    return f"<{now:%Y%m%dT%H%M%S}.{left_id}@{_hostname(hostname)}>"


# One <left@right> token of printable ASCII without '<', '>' and with a single '@'.
_MSGID_RE = re.compile(r"<[\x21-\x3b\x3d\x3f\x41-\x7e]+@[\x21-\x3b\x3d\x3f\x41-\x7e]+>")


def message_id_header(msgid: str) -> bytes:
    """``Message-ID:`` field for *msgid* (as made by ``make_message_id``).

    Raises ValueError for anything that is not a single ``<left@right>``
    token of printable ASCII, so a bad value can never reach a header.
    """
    if not _MSGID_RE.fullmatch(msgid):
        raise ValueError(f"not a msg-id: {msgid!r}")
    return f"Message-ID: {msgid}\n".encode("ascii")


def _with_clause(protocol: str, detail: str | None = None) -> str:
    """``with <protocol>`` plus an optional comment.

    The comment is where a later feature puts TLS details, e.g.
    ``with ESMTPS (TLS1.3 TLS_AES_256_GCM_SHA384)``; it is sanitised like
    client text because cipher names come from the peer negotiation.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    if detail:
        safe = " ".join(_token(word, default="") for word in detail.split())
        if safe:
            return f"with {protocol} ({safe})"
    return f"with {protocol}"


def received_header(
    *,
    helo: str,
    client_ip: str,
    reverse_name: str | None,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    when: datetime.datetime,
    tls: str | None = None,
) -> bytes:
    """An RFC 5321 §4.4 ``Received:`` field, folded with LF + TAB, ending in LF.

    *tls* (``"TLSv1.3 TLS_AES_256_GCM_SHA384"``) goes in a comment after
    the protocol, which is then ESMTPS or ESMTPSA.

    ``from <helo> (<reverse name or unknown> <ip literal>) by <hostname>
    (mailsrv) with <protocol> id <queue id> [for <recipient>]; <date>``.
    *helo*, *reverse_name* and *recipient* come from the client (or its DNS)
    and are sanitised so the field stays one field with balanced comments.
    A naive *when* is taken as UTC.
    """
    with_clause = _with_clause(protocol, tls)
    ip_literal = _ip_literal(client_ip)
    if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    date = email.utils.format_datetime(when)

    lines = [
        f"Received: from {_token(helo, default='unknown')}"
        f" ({_token(reverse_name, default='unknown')} {ip_literal})",
        f"\tby {_token(hostname, default='localhost')} (mailsrv) {with_clause}"
        f" id {_token(queue_id, default='unknown')}",
    ]
    if recipient is not None:
        lines.append(f"\tfor <{_address(recipient)}>")
    lines[-1] += f"; {date}"
    return ("\n".join(lines) + "\n").encode("ascii")


def local_received_header(
    *, hostname: str, queue_id: str, recipient: str | None, when: datetime.datetime
) -> bytes:
    """``Received:`` for a message we generate ourselves (a bounce): no client, so no ``from``.

    The form Postfix uses for local mail: ``by <hostname> (mailsrv) id <id> [for <rcpt>];
    <date>``, so the queue id still ties the copy to its log lines.
    """
    if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    lines = [f"Received: by {_token(hostname, default='localhost')} (mailsrv)"
             f" id {_token(queue_id, default='unknown')}"]
    if recipient is not None:
        lines.append(f"\tfor <{_address(recipient)}>")
    lines[-1] += f"; {email.utils.format_datetime(when)}"
    return ("\n".join(lines) + "\n").encode("ascii")
