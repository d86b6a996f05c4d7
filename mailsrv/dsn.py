"""
Delivery status notifications (RFC 3464 bounces and delay warnings), built as bytes (pure).

The report goes back to a person who usually did nothing wrong, so the first part says in
plain words what happened and quotes the remote server; the second part is the
machine-readable ``message/delivery-status`` that mail clients and list managers parse; the
third gives the original headers (never the body: privacy and size).  Everything a remote
server said is treated as hostile text: it cannot end a MIME part or add a header.

Output is a whole message with LF line ends (the spool format), lines under 998 octets.
"""

from __future__ import annotations

import email.utils
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RecipientReport", "build_dsn", "original_headers"]

_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_ADDRESS_RE = re.compile(r"[\x21-\x7e]+\Z")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
_MAX_TEXT = 2000  # characters of a remote reply kept in a report


@dataclass(frozen=True)
class RecipientReport:
    """What happened to one recipient, as the DSN tells it."""

    address: str
    action: str  # "failed" or "delayed"
    status: str  # RFC 3463 enhanced status code
    diagnostic: str | None  # the remote server's words, or our own explanation
    remote_mta: str | None  # the host that answered, if one did
    last_attempt: float | None = None
    will_retry_until: float | None = None


def _clean(text: str) -> str:
    """One line of printable ASCII: controls and non-ASCII become spaces/'?'."""
    text = " ".join(str(text).split())[:_MAX_TEXT]
    return _UNSAFE.sub("?", text)


def _date(when: float) -> str:
    return email.utils.formatdate(when, localtime=False)


def _field(name: str, value: str) -> list[str]:
    """A header-style field, folded at spaces so that no line exceeds 78 characters."""
    lines = textwrap.wrap(
        f"{name}: {value}", width=78, subsequent_indent="    ", break_long_words=True,
        break_on_hyphens=False,
    )
    return lines or [f"{name}:"]


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
) -> bytes:
    """The complete DSN message (headers and MIME body), LF line ends."""
    if not original_sender:
        raise ValueError("a message from <> is never bounced")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    actions = {r.action for r in recipients}
    if len(actions) != 1 or not actions <= {"failed", "delayed"}:
        raise ValueError(f"recipients must all be 'failed' or all 'delayed', got {actions}")
    for r in recipients:
        if not _STATUS_RE.match(r.status):
            raise ValueError(f"bad enhanced status code {r.status!r}")
        if not _ADDRESS_RE.match(r.address):
            raise ValueError(f"bad recipient address {r.address!r}")
    if not _ADDRESS_RE.match(original_sender):
        raise ValueError(f"bad sender address {original_sender!r}")
    delayed = actions == {"delayed"}

    human = [
        f"This is the mail system at host {hostname}.",
        "",
    ]
    if delayed:
        human += textwrap.wrap(
            "Your message has not yet been delivered to one or more recipients. It is still "
            "in the queue and will be tried again; you do not need to send it again.", 72)
    else:
        human += textwrap.wrap(
            "I'm sorry to have to inform you that your message could not be delivered to one "
            "or more recipients. It's attached below (headers only).", 72)
    human += ["", "For further assistance, please send mail to <postmaster>.", "",
              f"The mail system (queue id {queue_id}):", ""]
    for r in recipients:
        said = _clean(r.diagnostic) if r.diagnostic else f"status {r.status}"
        intro = f"host {r.remote_mta} said: " if r.remote_mta else ""
        human += textwrap.wrap(f"<{r.address}>: {intro}{said}", 72, subsequent_indent="    ",
                               break_long_words=True, break_on_hyphens=False)
        if delayed and r.will_retry_until is not None:
            human.append(f"    (will be retried until {_date(r.will_retry_until)})")
        human.append("")

    status = _field("Reporting-MTA", f"dns; {hostname}")
    status += _field("X-Mailsrv-Queue-ID", queue_id)
    if received_from:
        status += _field("X-Mailsrv-Received-From", _clean(received_from))
    status += _field("Arrival-Date", _date(arrival))
    for r in recipients:
        status.append("")
        status += _field("Final-Recipient", f"rfc822; {r.address}")
        status += _field("Action", r.action)
        status += _field("Status", r.status)
        if r.remote_mta:
            status += _field("Remote-MTA", f"dns; {_clean(r.remote_mta)}")
        if r.diagnostic:
            status += _field("Diagnostic-Code", f"smtp; {_clean(r.diagnostic)}")
        if r.last_attempt is not None:
            status += _field("Last-Attempt-Date", _date(r.last_attempt))
        if delayed and r.will_retry_until is not None:
            status += _field("Will-Retry-Until", _date(r.will_retry_until))

    headers_part = original_headers.replace(b"\r\n", b"\n")
    if headers_part and not headers_part.endswith(b"\n"):
        headers_part += b"\n"
    eight_bit = not headers_part.isascii()

    texts = [("\n".join(human) + "\n").encode("ascii"), ("\n".join(status) + "\n").encode("ascii"),
             headers_part]
    boundary = f"{dsn_id}.{int(now)}/{hostname}"
    while any(boundary.encode("ascii") in t for t in texts):
        boundary += "=_"

    subject = "Delayed Mail (still being retried)" if delayed else (
        "Undelivered Mail Returned to Sender")
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{original_sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{dsn_id}.dsn@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'    boundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit" if eight_bit else "Content-Transfer-Encoding: 7bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    parts = [
        ("text/plain; charset=us-ascii", "Notification", "7bit"),
        ("message/delivery-status", "Delivery report", "7bit"),
        ("text/rfc822-headers", "Undelivered Message Headers", "8bit" if eight_bit else "7bit"),
    ]
    out = ("\n".join(head) + "\n").encode("ascii")
    for (ctype, description, cte), text in zip(parts, texts):
        out += (f"--{boundary}\nContent-Description: {description}\nContent-Type: {ctype}\n"
                f"Content-Transfer-Encoding: {cte}\n\n").encode("ascii")
        out += text + b"\n"
    out += f"--{boundary}--\n".encode("ascii")
    return out


_FIELD_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def original_headers(head: bytes, limit: int = 65536) -> bytes:
    """The header section at the start of ``head`` (LF line ends), cut at a line, ≤ limit."""
    out: list[bytes] = []
    size = 0
    lines = head.split(b"\n")
    complete = lines[:-1]  # the last piece has no line end: partial (or empty)
    for line in complete:
        if line in (b"", b"\r"):
            break
        if not (_FIELD_RE.match(line) or line[:1] in (b" ", b"\t")):
            break
        if size + len(line) + 1 > limit:
            break
        out.append(line)
        size += len(line) + 1
    return b"".join(line + b"\n" for line in out)
