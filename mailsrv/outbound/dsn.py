"""Delivery status notifications (RFC 3464 bounces and delay warnings), built as bytes.

Pure: no I/O, no clock (the caller passes ``now``), standard library only.

Why this module exists: when the relayer gives up on some recipients (a 5xx reply, a DNS
error, expiry in the queue) or has been retrying for a long time, the envelope sender must
be told, in a form both a person and a program can read.  The report is a
``multipart/report`` (RFC 6522) with three parts:

1. ``text/plain``: what happened, in plain words, quoting the remote server, in the style of
   Postfix's bounces (the form people and help desks already know);
2. ``message/delivery-status`` (RFC 3464): the same facts as fields that mail clients, list
   managers and bulk senders parse to unsubscribe or retry;
3. ``text/rfc822-headers``: the original header section, so the sender can tell which of
   their messages this is.  Not the body, unless the sender asked for it with ``RET=FULL``
   (RFC 3461) and the report is a failure: it may be large, and returning it copies
   possibly private text into yet another mailbox.  Then the part is ``message/rfc822``.

Besides failures and delays, a report may tell of success (RFC 3461 ``NOTIFY=SUCCESS``):
``delivered`` into a mailbox here, or ``relayed`` to a server that offers no DSN.  The
sender's ``ENVID`` is quoted as ``Original-Envelope-Id``, a recipient's ``ORCPT`` as
``Original-Recipient``.

This module checks our own data and assembles the report and its ``message/delivery-status``
part; the human-readable part and the making safe of everything a remote server said are
``mailsrv.outbound.dsn_text``'s, the original's header section ``mailsrv.outbound.dsn_original``'s.

The result is a complete message with LF line ends, like every spool file (CRLF is added
on the wire), ASCII except inside the original-headers part.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mailsrv.outbound.dsn_original import headers_part, whole_part
from mailsrv.outbound.dsn_text import date, field, human_part, text_lines, token
from mailsrv.routing.localpart import printable_utf8

__all__ = ["RecipientReport", "build_dsn"]

#: Longest address we accept (RFC 5321 paths are at most 256 octets; this leaves slack
#: while keeping ``Final-Recipient: rfc822; <address>`` far below the line limit).
_ADDRESS_MAX = 512
#: RFC 2046 section 5.1.1: a boundary has 1 to 70 characters.
_BOUNDARY_MAX = 70

_ACTIONS = ("failed", "delayed", "delivered", "relayed")
_SUCCESS = ("delivered", "relayed")

# RFC 3463 enhanced status code.  [0-9], not \d: \d also matches non-ASCII digits.
_STATUS_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# Queue ids (ours and the original's): what mailsrv.storage.queue issues.
_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}")
# Our host name: a DNS name as config.normalise_domain produces it.
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?")
# An address as mailsrv.routing.address.Mailbox prints it: a dot-string or quoted-string local
# part, then a host name or an address literal (``postmaster`` alone is allowed too).
# Spaces are allowed only inside the quotes, where they are literal; the characters that
# would end an angle-addr or open a comment ('<', '>', '(', ',', ';', ...) only there too.
_ADDRESS_RE = re.compile(
    r"""(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\u0080-\U0010ffff-]+"""  # (UTF-8: SMTPUTF8)
    r"""|"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*")"""
    r"""(?:@(?:[A-Za-z0-9.-]+|\[[A-Za-z0-9.:-]+\]))?"""
)
# What Original-Envelope-Id and Original-Recipient may hold: printable ASCII (decoded xtext).
_TEXT_RE = re.compile(r"[\x20-\x7e]{1,1000}")
# An SMTP reply starts with its three-digit code (RFC 5321 section 4.2).
_SMTP_REPLY_RE = re.compile(r"[2-5][0-9][0-9](?:[ -]|\Z)")


@dataclass(frozen=True)
class RecipientReport:
    """What happened to one recipient, as the DSN tells it."""

    address: str  # the final recipient, e.g. "bob@remote.test"
    action: str  # "failed" or "delayed"
    status: str  # RFC 3463 enhanced status code, e.g. "5.1.1"
    diagnostic: str | None  # the remote server's words, or our own explanation
    remote_mta: str | None  # the host that answered, if one did
    last_attempt: float | None = None  # epoch seconds
    will_retry_until: float | None = None  # epoch seconds; only used for "delayed"
    original_recipient: str | None = None  # ORCPT, "rfc822;address" (decoded, printable)


# --- validation -----------------------------------------------------------------------


def _check_address(value: object, what: str) -> str:
    """Return *value* if it is an address we can write into fields; else ValueError.

    The caller's addresses come from our own parser, so a failure here is a bug upstream,
    and writing such a value could open a header or an angle-addr: refuse it.
    """
    if (
        not isinstance(value, str)
        or len(value) > _ADDRESS_MAX
        or not _ADDRESS_RE.fullmatch(value)
        or not printable_utf8(value)
    ):
        raise ValueError(f"bad {what} address {value!r}")
    return value


def _typed_address(address: str) -> str:
    """``rfc822; address``, or for a UTF-8 address RFC 6533 section 3's ``utf-8; `` with
    its utf-8-addr-xtext (``\\x{F6}`` for ``ö``, and for '\\', '+', '=' and controls), so
    that the report stays 7-bit ``message/delivery-status`` for any reader."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(
        c if 0x21 <= ord(c) <= 0x7e and c not in "\\+=" else f"\\x{{{ord(c):X}}}"
        for c in address)


def _check(pattern: re.Pattern[str], value: object, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"bad {what} {value!r}")
    return value


# --- the report ----------------------------------------------------------------------


def _diagnostic_type(first_line: str) -> str:
    """RFC 3464 section 2.3.6: ``smtp`` only for an actual SMTP reply.

    Our own explanations (a DNS error, expiry, the administrator's bounce) are not replies
    from a server, so they get an ``X-`` type, as Postfix does with ``X-Postfix``.
    """
    return "smtp" if _SMTP_REPLY_RE.match(first_line) else "X-Mailsrv"


def _boundary(base: str, contents: Sequence[bytes]) -> str:
    """A boundary (at most 70 characters) that occurs in none of *contents*.

    The base is predictable (ids, time, host name), and the headers part is the sender's
    own text, so it could contain it; a counter is then appended until it does not.  The
    contents are finite, so this ends.
    """
    base = base[: _BOUNDARY_MAX - 12]
    candidate = base
    n = 0
    while any(candidate.encode("ascii") in content for content in contents):
        n += 1
        candidate = f"{base}=_{n}"
    return candidate


def _status_part(
    *, hostname: str, queue_id: str, arrival: float, recipients: Sequence[RecipientReport],
    delayed: bool, envid: str | None = None,
) -> list[str]:
    """The ``message/delivery-status`` part (RFC 3464 section 2): field blocks."""
    lines = field("Original-Envelope-Id", envid) if envid else []
    lines += field("Reporting-MTA", f"dns; {hostname}")
    lines += field("X-Mailsrv-Queue-ID", queue_id)
    lines += field("Arrival-Date", date(arrival))
    for r in recipients:
        lines.append("")
        if r.original_recipient:
            lines += field("Original-Recipient", r.original_recipient)
        lines += field("Final-Recipient", _typed_address(r.address))
        lines += field("Action", r.action)
        lines += field("Status", r.status)
        if r.remote_mta:
            lines += field("Remote-MTA", f"dns; {token(r.remote_mta, 'unknown')}")
        said = text_lines(r.diagnostic)
        if said:
            lines += field("Diagnostic-Code", f"{_diagnostic_type(said[0])}; {' '.join(said)}")
        if r.last_attempt is not None:
            lines += field("Last-Attempt-Date", date(r.last_attempt))
        if delayed and r.will_retry_until is not None:
            lines += field("Will-Retry-Until", date(r.will_retry_until))
    return lines


def build_dsn(
    *,
    hostname: str,
    dsn_id: str,
    queue_id: str,
    original_sender: str,
    received_from: str,
    arrival: float,
    recipients: Sequence[RecipientReport],
    original_headers: bytes,
    now: float,
    postmaster: str | None = None,
    envid: str | None = None,
    original_message: bytes | None = None,
) -> bytes:
    """The complete DSN message (header section, empty line, MIME body) with LF line ends.

    One report covers recipients that all ``failed`` (a bounce), all ``delayed`` (a
    warning) or all succeeded (``delivered`` or ``relayed``): the subject and the wording
    depend on it, so a mix is a caller bug.  ``envid`` is the sender's ENVID (decoded);
    ``original_message`` the whole original (``RET=FULL``, failures only), returned as
    ``message/rfc822`` instead of its headers.  With
    ``postmaster`` (an address), it is instead the postmaster's notice that a message from
    ``<>`` failed (a double bounce, as Postfix sends): addressed to the postmaster, and the
    original sender may be empty.  Raises ValueError for an empty sender (a bounce is never
    bounced to its sender), no recipients, a mix or unknown action, a postmaster notice
    about a delay, a malformed status code, address, id or host name: all of them are our
    own data, and a bad value must not reach a header.
    """
    if postmaster is not None:
        to = _check_address(postmaster, "postmaster")
    elif not original_sender:
        raise ValueError("a message from <> is never bounced")
    else:
        to = original_sender
    if original_sender:
        _check_address(original_sender, "sender")
    _check(_HOSTNAME_RE, hostname, "host name")
    _check(_ID_RE, dsn_id, "DSN queue id")
    _check(_ID_RE, queue_id, "queue id")
    recipients = list(recipients)
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    actions = {r.action for r in recipients}
    success = actions <= set(_SUCCESS)
    if not actions <= set(_ACTIONS) or (len(actions) != 1 and not success):
        raise ValueError(f"recipients must be all 'failed' or all 'delayed' (or all delivered "
                         f"or relayed), got {sorted(actions)}")
    for r in recipients:
        _check(_STATUS_RE, r.status, "enhanced status code")
        _check_address(r.address, "recipient")
        if r.original_recipient is not None:
            _check(_TEXT_RE, r.original_recipient, "original recipient")
    if envid is not None:
        _check(_TEXT_RE, envid, "envelope id")
    delayed = actions == {"delayed"}
    if (delayed or success) and postmaster is not None:
        raise ValueError("the postmaster is told of failures only")
    if original_message is not None and actions != {"failed"}:
        raise ValueError("only a failure report returns the whole message")

    human = human_part(hostname=hostname, queue_id=queue_id, received_from=received_from,
                       arrival=arrival, recipients=recipients, delayed=delayed,
                       postmaster=postmaster is not None, success=success,
                       whole=original_message is not None)
    status = _status_part(hostname=hostname, queue_id=queue_id, arrival=arrival,
                          recipients=recipients, delayed=delayed, envid=envid)
    original = (headers_part(original_headers) if original_message is None
                else whole_part(original_message))
    human_utf8 = not "".join(human).isascii()  # a UTF-8 address (SMTPUTF8)
    eight_bit = not original.isascii() or human_utf8
    contents = [
        ("\n".join(human) + "\n").encode("utf-8"),
        ("\n".join(status) + "\n").encode("ascii"),
        original,
    ]
    boundary = _boundary(f"{dsn_id}.{int(now)}/{hostname}", contents)

    subject = ("Delayed Mail (still being retried)" if delayed
               else "Successful Mail Delivery Report" if success
               else "Postmaster Copy: Undelivered Mail" if postmaster is not None
               else "Undelivered Mail Returned to Sender")
    cte = "8bit" if eight_bit else "7bit"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        f"Date: {date(now)}",
        f"Message-ID: <{dsn_id}.dsn@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"Content-Transfer-Encoding: {cte}",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    parts = [
        ("Notification", "text/plain; charset=utf-8" if human_utf8
         else "text/plain; charset=us-ascii", "8bit" if human_utf8 else "7bit"),
        ("Delivery report", "message/delivery-status", "7bit"),
        ("Undelivered Message Headers", "text/rfc822-headers", cte)
        if original_message is None else ("Undelivered Message", "message/rfc822", cte),
    ]
    if success:
        parts[2] = ("Message Headers", "text/rfc822-headers", cte)
    out = ["\n".join(head).encode("utf-8") + b"\n"]  # (To: may be UTF-8: SMTPUTF8)
    for (description, ctype, encoding), content in zip(parts, contents):
        out.append(
            f"--{boundary}\nContent-Description: {description}\nContent-Type: {ctype}\n"
            f"Content-Transfer-Encoding: {encoding}\n\n".encode("ascii")
        )
        # The newline before a delimiter belongs to the delimiter (RFC 2046 section
        # 5.1.1), so one more keeps each part's own last newline.
        out.append(content + b"\n")
    out.append(f"--{boundary}--\n".encode("ascii"))
    return b"".join(out)
