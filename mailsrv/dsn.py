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
   their messages this is.  Never the body: it may be large, and returning it copies
   possibly private text into yet another mailbox.

Everything a remote server said (and the recipient address it came back for) is treated as
hostile text.  A reply line could hold CR/LF, NUL, non-ASCII, a ``--boundary`` line or
thousands of characters: here it is reduced to printable ASCII, re-broken only where we
choose, and indented or folded so that no line it contributes can start a header, end a
MIME part, or exceed the 998-octet line limit (RFC 5322 section 2.1.1).

The result is a complete message with LF line ends, like every spool file (CRLF is added
on the wire), ASCII except inside the original-headers part.
"""

from __future__ import annotations

import datetime
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mailsrv.headsection import is_field

__all__ = ["RecipientReport", "build_dsn", "original_headers"]

#: Longest line we write anywhere (RFC 5322 section 2.1.1 hard limit, without CRLF).
_LINE_MAX = 998
#: Width we fold our own text and header fields to when the words allow it.
_WIDTH = 78
#: Human text is wrapped a little narrower, as mail clients show it unchanged.
_TEXT_WIDTH = 76
#: A "word" longer than this is cut into pieces; anything shorter is never broken, so a
#: long URL or address in a reply survives intact while no line can reach ``_LINE_MAX``.
_WORD_MAX = 900
#: Characters of one remote diagnostic we keep: enough for any honest multi-line reply,
#: small enough that a hostile server cannot make the bounce large.
_MAX_DIAGNOSTIC = 4000
#: Longest address we accept (RFC 5321 paths are at most 256 octets; this leaves slack
#: while keeping ``Final-Recipient: rfc822; <address>`` far below the line limit).
_ADDRESS_MAX = 512
#: Longest host name or other token copied from outside into the report.
_TOKEN_MAX = 255
#: RFC 2046 section 5.1.1: a boundary has 1 to 70 characters.
_BOUNDARY_MAX = 70

_ACTIONS = ("failed", "delayed")

# RFC 3463 enhanced status code.  [0-9], not \d: \d also matches non-ASCII digits.
_STATUS_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# Queue ids (ours and the original's): what mailsrv.queue issues.
_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}")
# Our host name: a DNS name as config.normalise_domain produces it.
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?")
# An address as mailsrv.address.Mailbox prints it: a dot-string or quoted-string local
# part, then a host name or an address literal (``postmaster`` alone is allowed too).
# Spaces are allowed only inside the quotes, where they are literal; the characters that
# would end an angle-addr or open a comment ('<', '>', '(', ',', ';', ...) only there too.
_ADDRESS_RE = re.compile(
    r"""(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")"""
    r"""(?:@(?:[A-Za-z0-9.-]+|\[[A-Za-z0-9.:-]+\]))?"""
)
# Line breaks in remote text.  Deliberately not str.splitlines(): that also breaks at
# \x0b, \x0c, \x1c-\x1e, \x85, \u2028 ..., which are simply replaced below instead.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
# Characters kept in a token (host name, client name): printable ASCII without
# whitespace and without what opens/closes comments, quoted strings or angle addresses.
_TOKEN_BAD = re.compile(r'[^\x21-\x7e]|[()\\;<>",]')
# A header field name directly followed by ':' (RFC 5322 section 2.2; as mailsrv.headers).
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


# --- validation and sanitising -------------------------------------------------------


def _check_address(value: object, what: str) -> str:
    """Return *value* if it is an address we can write into fields; else ValueError.

    The caller's addresses come from our own parser, so a failure here is a bug upstream,
    and writing such a value could open a header or an angle-addr: refuse it.
    """
    if (
        not isinstance(value, str)
        or len(value) > _ADDRESS_MAX
        or not _ADDRESS_RE.fullmatch(value)
    ):
        raise ValueError(f"bad {what} address {value!r}")
    return value


def _check(pattern: re.Pattern[str], value: object, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"bad {what} {value!r}")
    return value


def _token(value: str | None, default: str) -> str:
    """Reduce an outside name (remote MTA, client) to one safe token, or *default*."""
    if not value:
        return default
    cleaned = _TOKEN_BAD.sub("?", value[: _TOKEN_MAX * 2])[:_TOKEN_MAX]
    return cleaned or default


def _text_lines(text: str | None) -> list[str]:
    """Hostile text as lines of printable ASCII with single spaces; empty lines dropped.

    Line breaks (CRLF, CR or LF) are the only structure kept, because a multi-line SMTP
    reply reads better line by line.  Every other control or non-ASCII character becomes
    ``?`` (a tab becomes a space).  Over-long text is cut and marked with ``[...]``.
    """
    if not text:
        return []
    text = str(text)
    cut = len(text) > _MAX_DIAGNOSTIC
    text = text[:_MAX_DIAGNOSTIC]
    lines = []
    for raw in _LINE_BREAK.split(text):
        line = " ".join(_NOT_PRINTABLE.sub("?", raw.replace("\t", " ")).split())
        if line:
            lines.append(line)
    if cut and lines:
        lines[-1] += " [...]"
    return lines


def _words(line: str) -> list[str]:
    """The words of a cleaned line; words over ``_WORD_MAX`` characters are cut up."""
    words = []
    for word in line.split():
        while len(word) > _WORD_MAX:
            words.append(word[:_WORD_MAX])
            word = word[_WORD_MAX:]
        words.append(word)
    return words


def _wrap(words: list[str], *, width: int, first: str = "", rest: str = "    ") -> list[str]:
    """Greedy fill of *words* into lines of at most *width* (a single long word excepted).

    The first line starts with *first*, the others with *rest*.  With ``rest=" "`` this
    is RFC 5322 folding: each break replaces exactly one space, so unfolding restores the
    text.  A cut-up long word (``_words``) gains a space where it was cut.
    """
    lines: list[str] = []
    line: str | None = None
    for word in words:
        if line is None:
            line = first + word
        elif len(line) + 1 + len(word) <= width:
            line += " " + word
        else:
            lines.append(line)
            line = rest + word
    if line is not None:
        lines.append(line)
    return lines


def _field(name: str, value: str) -> list[str]:
    """A header-style field as lines, folded at spaces (continuations start with a space)."""
    return _wrap([f"{name}:", *_words(value)], width=_WIDTH, rest=" ")


def _date(when: float) -> str:
    """An RFC 5322 date-time in UTC (``+0000``: the time is known to be UTC)."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.timezone.utc))


def _diagnostic_type(first_line: str) -> str:
    """RFC 3464 section 2.3.6: ``smtp`` only for an actual SMTP reply.

    Our own explanations (a DNS error, expiry, the administrator's bounce) are not replies
    from a server, so they get an ``X-`` type, as Postfix does with ``X-Postfix``.
    """
    return "smtp" if _SMTP_REPLY_RE.match(first_line) else "X-Mailsrv"


def _headers_part(raw: bytes) -> bytes:
    """The original header section as the content of the ``text/rfc822-headers`` part.

    Cut at the first empty line even if the caller passed more (the body never goes back);
    CRLF becomes LF, a stray CR or NUL becomes ``?`` (neither is allowed in 8bit content);
    a line over the limit is split into continuation lines rather than truncated, and the
    result ends with a newline.  8-bit octets are kept: the part is then sent as 8bit.
    """
    text = raw.replace(b"\r\n", b"\n")
    if text.startswith(b"\n"):
        return b""
    end = text.find(b"\n\n")
    if end >= 0:
        text = text[: end + 1]
    text = text.replace(b"\r", b"?").replace(b"\x00", b"?")
    if not text:
        return b""
    if not text.endswith(b"\n"):
        text += b"\n"
    out = []
    for line in text[:-1].split(b"\n"):
        while len(line) > _LINE_MAX:
            out.append(line[:_LINE_MAX])
            line = b" " + line[_LINE_MAX:]
        out.append(line)
    return b"\n".join(out) + b"\n"


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


# --- the report ----------------------------------------------------------------------


def _human_part(
    *,
    hostname: str,
    queue_id: str,
    received_from: str,
    arrival: float,
    recipients: Sequence[RecipientReport],
    delayed: bool,
    postmaster: bool = False,
) -> list[str]:
    """The ``text/plain`` part: for a person who usually did nothing wrong."""
    lines = [f"This is the mail system at host {hostname}.", ""]
    if postmaster:
        lines += _wrap(
            ("A message from the null sender <> (a bounce or another delivery notice) could "
             "not be delivered to one or more recipients. Such a message is never returned "
             "to its sender, so this notice comes to the postmaster instead; nothing more "
             "is sent about it. Its headers are attached below.").split(),
            width=_TEXT_WIDTH, rest="")
    elif delayed:
        until = [r.will_retry_until for r in recipients if r.will_retry_until is not None]
        retry = (f"it will be retried until {_date(max(until))}." if until
                 else "it will be retried for a while.")
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
        ]
        lines += _wrap(
            ("Your message has not yet been delivered to one or more recipients. "
             f"It is still in the queue, and {retry}").split(),
            width=_TEXT_WIDTH, rest="")
    else:
        lines += _wrap(
            ("I'm sorry to have to inform you that your message could not be delivered "
             "to one or more recipients. The headers of your message are attached "
             "below.").split(),
            width=_TEXT_WIDTH, rest="")
    origin = _token(received_from, "") if received_from else ""
    about = f"It arrived on {_date(arrival)}"
    if origin:
        about += f" from {origin}"
    about += f" and had the queue id {queue_id} on this host."
    lines += [""]
    lines += _wrap(about.split(), width=_TEXT_WIDTH, rest="")
    if not postmaster:
        lines += [
            "",
            "For further assistance, please send mail to postmaster. If you do so,",
            "please include this problem report.",
        ]
    lines += ["", "                   The mail system", ""]
    for r in recipients:
        mta = _token(r.remote_mta, "") if r.remote_mta else ""
        said = _text_lines(r.diagnostic)
        head = [f"<{r.address}>:"]
        if said:
            if mta:
                head += ["host", mta, "said:"]
            first, more = said[0], said[1:]
        else:
            verb = "delayed" if delayed else "failed"
            where = f" at host {mta}" if mta else ""
            first, more = f"delivery {verb}{where} (status {r.status})", []
        lines += _wrap(head + _words(first), width=_TEXT_WIDTH)
        for line in more:
            lines += _wrap(_words(line), width=_TEXT_WIDTH, first="    ")
        lines.append("")
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _status_part(
    *, hostname: str, queue_id: str, arrival: float, recipients: Sequence[RecipientReport],
    delayed: bool,
) -> list[str]:
    """The ``message/delivery-status`` part (RFC 3464 section 2): field blocks."""
    lines = _field("Reporting-MTA", f"dns; {hostname}")
    lines += _field("X-Mailsrv-Queue-ID", queue_id)
    lines += _field("Arrival-Date", _date(arrival))
    for r in recipients:
        lines.append("")
        lines += _field("Final-Recipient", f"rfc822; {r.address}")
        lines += _field("Action", r.action)
        lines += _field("Status", r.status)
        if r.remote_mta:
            lines += _field("Remote-MTA", f"dns; {_token(r.remote_mta, 'unknown')}")
        said = _text_lines(r.diagnostic)
        if said:
            lines += _field("Diagnostic-Code", f"{_diagnostic_type(said[0])}; {' '.join(said)}")
        if r.last_attempt is not None:
            lines += _field("Last-Attempt-Date", _date(r.last_attempt))
        if delayed and r.will_retry_until is not None:
            lines += _field("Will-Retry-Until", _date(r.will_retry_until))
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
) -> bytes:
    """The complete DSN message (header section, empty line, MIME body) with LF line ends.

    One report covers recipients that all ``failed`` (a bounce) or all ``delayed`` (a
    warning): the subject and the wording depend on it, so a mix is a caller bug.  With
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
    if len(actions) != 1 or not actions <= set(_ACTIONS):
        raise ValueError(f"recipients must be all 'failed' or all 'delayed', got {sorted(actions)}")
    for r in recipients:
        _check(_STATUS_RE, r.status, "enhanced status code")
        _check_address(r.address, "recipient")
    delayed = actions == {"delayed"}
    if delayed and postmaster is not None:
        raise ValueError("the postmaster is told of failures only")

    human = _human_part(hostname=hostname, queue_id=queue_id, received_from=received_from,
                        arrival=arrival, recipients=recipients, delayed=delayed,
                        postmaster=postmaster is not None)
    status = _status_part(hostname=hostname, queue_id=queue_id, arrival=arrival,
                          recipients=recipients, delayed=delayed)
    original = _headers_part(original_headers)
    eight_bit = not original.isascii()
    contents = [
        ("\n".join(human) + "\n").encode("ascii"),
        ("\n".join(status) + "\n").encode("ascii"),
        original,
    ]
    boundary = _boundary(f"{dsn_id}.{int(now)}/{hostname}", contents)

    subject = ("Delayed Mail (still being retried)" if delayed
               else "Postmaster Copy: Undelivered Mail" if postmaster is not None
               else "Undelivered Mail Returned to Sender")
    cte = "8bit" if eight_bit else "7bit"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
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
        ("Notification", "text/plain; charset=us-ascii", "7bit"),
        ("Delivery report", "message/delivery-status", "7bit"),
        ("Undelivered Message Headers", "text/rfc822-headers", cte),
    ]
    out = ["\n".join(head).encode("ascii") + b"\n"]
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


# --- the original's header section ---------------------------------------------------


def original_headers(head: bytes, limit: int = 65536) -> bytes:
    """The header section at the start of *head*, cut at a line boundary to ≤ *limit* octets.

    *head* is the first bytes of the spooled original (LF line ends) and may stop mid-line;
    a line without its LF is dropped, since it may be cut anywhere.  The section ends at
    the first empty line, or at the first line that is neither a header field in the current
    syntax (``headsection.is_field(line, obsolete=False)``: a name with WSP before its colon
    ends it, unlike in ``headsection.inspect_head``) nor the continuation (leading SP/HTAB)
    of one: a message without a header section gives ``b""``.  Lines are returned unchanged,
    8-bit octets included, each with its LF.
    """
    out: list[bytes] = []
    size = 0
    complete = head.split(b"\n")[:-1]  # the last piece has no LF: partial or empty
    for line in complete:
        if line in (b"", b"\r"):
            break
        if line[:1] in (b" ", b"\t"):
            if not out:
                break  # a continuation with no field before it
        elif not is_field(line, obsolete=False):  # "Name :" ends it, as it always has
            break
        if size + len(line) + 1 > limit:
            break
        out.append(line + b"\n")
        size += len(line) + 1
    return b"".join(out)
