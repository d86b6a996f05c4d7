"""
The daily report to the postmaster (``[report] daily``): one plain-text message, built from
the server's own counters (mailsrv.metrics), not by reading the log again.

A day's figures are the counters now less the counters at the previous report
(:func:`difference`); after a restart the counters start from nothing, and the report says
it covers the time since the start.  Pure: the figures, the time and the queue's state are
given; mailsrv.outbound.daily sends it.
"""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Figures", "QueueState", "compose", "difference", "message", "next_run", "total",
    "warnings",
]

#: (sample name, sorted labels) -> value, as mailsrv.metrics.snapshot gives them.
Figures = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]

#: How many refusal reasons, senders and recipients the report lists.
TOP = 10
#: A certificate that expires sooner than this is warned about (days).
CERTIFICATE_DAYS = 14
#: A queued message older than this is warned about (seconds).
QUEUE_AGE = 86400.0


@dataclass(frozen=True)
class QueueState:
    messages: int
    recipients: int
    oldest: float  # seconds; 0 when empty


def difference(now: Figures, before: Figures) -> dict:
    """The counters' growth since ``before`` (a counter that went down was restarted: its
    value now is all its growth)."""
    out = {}
    for key, value in now.items():
        grown = value - before.get(key, 0.0)
        out[key] = value if grown < 0 else grown
    return out


def total(figures: Figures, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in figures.items() if n == name and wanted <= set(ls))


def by_labels(figures: Figures, name: str, *label_names: str) -> list[tuple[tuple[str, ...], int]]:
    """``name``'s non-zero samples summed by ``label_names``, largest first."""
    sums: dict[tuple[str, ...], float] = {}
    for (n, labels), value in figures.items():
        if n == name and value:
            d = dict(labels)
            key = tuple(d.get(label, "") for label in label_names)
            sums[key] = sums.get(key, 0.0) + value
    return sorted(((k, int(v)) for k, v in sums.items()), key=lambda kv: (-kv[1], kv[0]))


def _size(octets: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if octets < 1000 or unit == "GB":
            return f"{octets:.0f} {unit}" if unit == "bytes" else f"{octets:.1f} {unit}"
        octets /= 1000
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} seconds"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def warnings(day: Figures, queue: QueueState | None, cert_expires: float | None,
             now: float) -> list[str]:
    """What the administrator should look at, each with what to do."""
    out = []
    if cert_expires is not None and cert_expires - now < CERTIFICATE_DAYS * 86400:
        days = (cert_expires - now) / 86400
        when = "has expired" if days < 0 else f"expires in {days:.1f} days"
        out.append(f"the TLS certificate {when}: renew it, then systemctl reload mailsrv")
    if queue is not None and queue.oldest > QUEUE_AGE:
        out.append(f"a message has waited {_age(queue.oldest)} in the queue: see "
                   "mailsrv queue list, and the relay lines of the log for the replies")
    failed = total(day, "mailsrv_reloads_total", result="failed")
    if failed:
        out.append(f"{int(failed)} reload(s) refused: the log names the file and the key")
    relayed = total(day, "mailsrv_relay_attempts_total")
    failing = relayed - total(day, "mailsrv_relay_attempts_total", result="sent")
    if relayed >= 10 and failing > relayed / 4:
        out.append(f"{int(failing)} of {int(relayed)} relay attempts failed: a blocklisted "
                   "address, DNS, or a TLS policy? (the relay lines of the log)")
    return out


def _rows(rows: Iterable[tuple[str, str]], indent: str = "  ") -> list[str]:
    rows = list(rows)
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{indent}{label.ljust(width)}  {value}" for label, value in rows]


def _top(volume: Mapping[str, tuple[int, int]]) -> list[str]:
    ranked = sorted(volume.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:TOP]
    if not ranked:
        return ["  (none)"]
    return _rows((address, f"{n:>6} message(s), {_size(size)}") for address, (n, size) in ranked)


def compose(
    hostname: str, since: datetime.datetime, until: datetime.datetime, restarted: bool,
    day: Figures, senders: Mapping[str, tuple[int, int]],
    recipients: Mapping[str, tuple[int, int]], queue: QueueState | None,
    cert_expires: float | None, doctor: Sequence[str] | None = None,
) -> str:
    """The report's text: the day's figures, the top refusals, senders and recipients, AUTH,
    the queue now, and the warnings: the counters' and ``doctor``'s, what ``mailsrv doctor``
    found wrong (None: it was not run)."""
    def n(name: str, **labels: str) -> str:
        return f"{int(total(day, name, **labels)):>8}"

    span = f"{since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M %Z}".rstrip()
    lines = [f"mailsrv on {hostname}: the day from {span}"]
    if restarted:
        lines.append("(mailsrv started within it: the figures cover the time since the start)")
    problems = warnings(day, queue, cert_expires, until.timestamp())
    lines += ["", "Warnings"] + ([f"  - {w}" for w in problems] or ["  none"])
    lines += ["", "mailsrv doctor"] + (
        ["  not run"] if doctor is None else [f"  - {w}" for w in doctor] or ["  all ok"])
    lines += ["", "Messages"] + _rows([
        ("received (accepted)", f"{n('mailsrv_messages_accepted_total')}   "
                                f"{_size(total(day, 'mailsrv_received_bytes_total'))}"),
        ("delivered to mailboxes", n("mailsrv_deliveries_total", result="delivered")),
        ("relayed", n("mailsrv_deliveries_total", result="relayed")),
        ("deferred (attempts)", n("mailsrv_relay_attempts_total", result="deferred")),
        ("bounced", n("mailsrv_deliveries_total", result="bounced")),
        ("expired in the queue", n("mailsrv_deliveries_total", result="expired")),
        ("DSNs sent", n("mailsrv_dsn_sent_total")),
        ("connections", n("mailsrv_connections_total")),
        ("connections refused", n("mailsrv_connections_refused_total")),
    ])
    refusals = by_labels(day, "mailsrv_refused_total", "stage", "reason")[:TOP]
    lines += ["", "Top refusal reasons (stage, reason)"] + (
        _rows((f"{stage} {reason}", f"{count:>8}") for (stage, reason), count in refusals)
        or ["  none"])
    lines += ["", "Top senders (by messages accepted)"] + _top(senders)
    lines += ["", "Top recipients (by messages accepted)"] + _top(recipients)
    lines += ["", "AUTH"] + _rows([
        ("successes", n("mailsrv_auth_total", result="success")),
        ("failures", n("mailsrv_auth_total", result="failure")),
        ("lockouts", n("mailsrv_auth_total", result="lockout")),
        ("refused while locked out", n("mailsrv_auth_total", result="locked_out")),
    ])
    lines += ["", "Queue now"]
    if queue is None:
        lines.append("  not loaded yet")
    else:
        lines += _rows([("messages", f"{queue.messages:>8}"),
                        ("recipients waiting", f"{queue.recipients:>8}"),
                        ("oldest", f"{_age(queue.oldest):>8}" if queue.messages else "       -")])
    if cert_expires is not None:
        expiry = datetime.datetime.fromtimestamp(cert_expires, datetime.timezone.utc)
        lines += ["", f"TLS certificate: expires {expiry:%Y-%m-%d %H:%M} UTC"]
    return "\n".join(lines) + "\n"


def message(hostname: str, postmaster: str, report_id: str, text: str,
            when: datetime.datetime) -> bytes:
    """The report as a message to the postmaster (LF line ends, as spool files have)."""
    head = [
        f"From: mailsrv <MAILER-DAEMON@{hostname}>",
        f"To: <{postmaster}>",
        f"Subject: mailsrv daily report for {hostname}: {when:%Y-%m-%d}",
        f"Date: {email.utils.format_datetime(when)}",
        f"Message-ID: <{report_id}.report@{hostname}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\n".join(head) + "\n\n" + text).encode("utf-8")


def next_run(now: datetime.datetime, hour: int) -> datetime.datetime:
    """The next ``hour``:00 after ``now`` (an aware local time), in ``now``'s time zone."""
    at = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    if at <= now:
        at = (at + datetime.timedelta(days=1)).replace(hour=hour)
    return at
