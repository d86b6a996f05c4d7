"""The text of a DSN: remote servers' words made safe, wrapped and folded, and the
human-readable part (``text/plain``) written with them.

Pure: no I/O, no clock, standard library only.  ``mailsrv.outbound.dsn`` builds the report from it.

Everything a remote server said (and the recipient address it came back for) is treated as
hostile text.  A reply line could hold CR/LF, NUL, non-ASCII, a ``--boundary`` line or
thousands of characters: here it is reduced to printable ASCII, re-broken only where we
choose, and indented or folded so that no line it contributes can start a header, end a
MIME part, or exceed the 998-octet line limit (RFC 5322 section 2.1.1).

The human part is written in the style of Postfix's bounces (the form people and help desks
already know): what happened, in plain words, quoting the remote server.
"""

from __future__ import annotations

import datetime
import email.utils
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailsrv.outbound.dsn import RecipientReport

__all__ = ["date", "field", "human_part", "text_lines", "token"]

#: Width we fold our own text and header fields to when the words allow it.
_WIDTH = 78
#: Human text is wrapped a little narrower, as mail clients show it unchanged.
_TEXT_WIDTH = 76
#: A "word" longer than this is cut into pieces; anything shorter is never broken, so a
#: long URL or address in a reply survives intact while no line can reach the line limit.
_WORD_MAX = 900
#: Characters of one remote diagnostic we keep: enough for any honest multi-line reply,
#: small enough that a hostile server cannot make the bounce large.
_MAX_DIAGNOSTIC = 4000
#: Longest host name or other token copied from outside into the report.
_TOKEN_MAX = 255

# Line breaks in remote text.  Deliberately not str.splitlines(): that also breaks at
# \x0b, \x0c, \x1c-\x1e, \x85, \u2028 ..., which are simply replaced below instead.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
# Characters kept in a token (host name, client name): printable ASCII without
# whitespace and without what opens/closes comments, quoted strings or angle addresses.
_TOKEN_BAD = re.compile(r'[^\x21-\x7e]|[()\\;<>",]')


def token(value: str | None, default: str) -> str:
    """Reduce an outside name (remote MTA, client) to one safe token, or *default*."""
    if not value:
        return default
    cleaned = _TOKEN_BAD.sub("?", value[: _TOKEN_MAX * 2])[:_TOKEN_MAX]
    return cleaned or default


def text_lines(text: str | None) -> list[str]:
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


def field(name: str, value: str) -> list[str]:
    """A header-style field as lines, folded at spaces (continuations start with a space)."""
    return _wrap([f"{name}:", *_words(value)], width=_WIDTH, rest=" ")


def date(when: float) -> str:
    """An RFC 5322 date-time in UTC (``+0000``: the time is known to be UTC)."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.timezone.utc))


def human_part(
    *,
    hostname: str,
    queue_id: str,
    received_from: str,
    arrival: float,
    recipients: Sequence[RecipientReport],
    delayed: bool,
    postmaster: bool = False,
    success: bool = False,
    whole: bool = False,
) -> list[str]:
    """The ``text/plain`` part: for a person who usually did nothing wrong.  ``success``:
    the report asked for with NOTIFY=SUCCESS; ``whole``: the message is attached (RET=FULL)."""
    lines = [f"This is the mail system at host {hostname}.", ""]
    if success:
        lines += _wrap(
            ("Your message was successfully delivered to the destination(s) listed below. "
             "If the message was delivered to a mailbox you will receive no further "
             "notifications. Otherwise (relayed to a server that offers no delivery "
             "notifications) you may still receive notifications of mail delivery errors "
             "from other systems. The headers of your message are attached below.").split(),
            width=_TEXT_WIDTH, rest="")
    elif postmaster:
        lines += _wrap(
            ("A message from the null sender <> (a bounce or another delivery notice) could "
             "not be delivered to one or more recipients. Such a message is never returned "
             "to its sender, so this notice comes to the postmaster instead; nothing more "
             "is sent about it. Its headers are attached below.").split(),
            width=_TEXT_WIDTH, rest="")
    elif delayed:
        until = [r.will_retry_until for r in recipients if r.will_retry_until is not None]
        retry = (f"it will be retried until {date(max(until))}." if until
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
             "to one or more recipients. " + ("Your message is attached below." if whole
                                               else "The headers of your message are attached "
                                               "below.")).split(),
            width=_TEXT_WIDTH, rest="")
    origin = token(received_from, "") if received_from else ""
    about = f"It arrived on {date(arrival)}"
    if origin:
        about += f" from {origin}"
    about += f" and had the queue id {queue_id} on this host."
    lines += [""]
    lines += _wrap(about.split(), width=_TEXT_WIDTH, rest="")
    if not postmaster and not success:
        lines += [
            "",
            "For further assistance, please send mail to postmaster. If you do so,",
            "please include this problem report.",
        ]
    lines += ["", "                   The mail system", ""]
    for r in recipients:
        mta = token(r.remote_mta, "") if r.remote_mta else ""
        said = text_lines(r.diagnostic)
        head = [f"<{r.address}>:"]
        if r.action == "relayed":
            head += ["relayed", "to", *(mta or "a server").split()]
            head += "that offers no delivery notifications (DSN)".split()
            head[-1] += ", which said:" if said else ""
        if r.action == "delivered":
            first, more = "delivered to mailbox", []
        elif said:
            if mta and r.action != "relayed":
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
