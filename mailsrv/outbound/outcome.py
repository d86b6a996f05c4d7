"""
What one delivery attempt does to a queued message (pure: no I/O, no clock, no reactor).

The relayer hands this module a message, the replies its recipients got and the time; it gets
back the message's new state and the notices that state change owes somebody.  Keeping the
rules here, away from the sessions and the disk, is what lets them be tested as a table:

- ``2xx``: the recipient is sent;
- ``5xx``: it is bounced, with a failure report for the sender's DSN;
- ``4xx``: it waits for the next try on the retry schedule, or, once the message has reached
  ``queue.max_age``, it is bounced as expired (``4.4.7``, naming the last error);
- a delay warning goes out once (``warned``), when ``queue.delay_warning`` has passed and
  recipients still wait, and only to a real sender: a message from ``<>`` gets none;
- the failures of a double bounce (the postmaster's notice of a failed bounce) are dropped,
  only logged, so that bounces never loop;
- the sender's ``NOTIFY`` (RFC 3461) decides per recipient: no failure report without
  ``FAILURE`` (``NEVER``), no delay warning without ``DELAY``, and with ``SUCCESS`` a
  ``relayed`` report when the server that took it offers no DSN (one that does reports
  further on itself, RFC 3461 §5.2.2); without ``NOTIFY``, failures and delays as always.

Who hears of the reports (the sender, or for a message from ``<>`` the postmaster) is
mailsrv.outbound.bounce's decision when the relayer stores them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace

from mailsrv import replies
from mailsrv.outbound.bounce import given_up_reports
from mailsrv.outbound.dsn import RecipientReport
from mailsrv.outbound.mx import DestinationError
from mailsrv.outbound.retry import RetryPolicy
from mailsrv.replies import Reply
from mailsrv.storage.envelope import BOUNCED, QUEUED, SENT, QueuedMessage, QueuedRecipient

__all__ = [
    "SENT_NOW", "DEFERRED", "BOUNCED_NOW", "EXPIRED", "ADMIN_BOUNCE_REASON",
    "RecipientResult", "Outcome", "apply_results", "bounced_by_administrator",
    "destination_failed", "interrupted", "unreachable", "rescheduled", "delay_status",
]

#: What one attempt did to one recipient (the log's ``status=`` says "bounced" for EXPIRED).
SENT_NOW, DEFERRED, BOUNCED_NOW, EXPIRED = "sent", "deferred", "bounced", "expired"
ADMIN_BOUNCE_REASON = "returned to the sender by the administrator"


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's result of one attempt: one ``relay id=...`` log line."""

    address: str
    attempts: int  # counting this one
    status: str  # SENT_NOW, DEFERRED, BOUNCED_NOW or EXPIRED
    reply: Reply


@dataclass(frozen=True)
class Outcome:
    """A message's state after an attempt, and what that change owes to whom."""

    before: QueuedMessage
    message: QueuedMessage  # the new state: save it, or remove it when ``done``
    results: tuple[RecipientResult, ...] = ()
    #: failures to report (the sender's DSN, or the postmaster's double bounce)
    reports: tuple[RecipientReport, ...] = ()
    #: the delay warning to the sender (empty unless it is due now, and only once)
    warnings: tuple[RecipientReport, ...] = ()
    #: failures of a double bounce: told to nobody, only logged
    dropped: tuple[RecipientReport, ...] = ()
    #: the success report (NOTIFY=SUCCESS, relayed to a server without DSN)
    successes: tuple[RecipientReport, ...] = ()
    #: failures the sender asked not to hear of (NOTIFY without FAILURE): only logged
    unwanted: tuple[RecipientReport, ...] = ()

    @property
    def changed(self) -> bool:
        """Some recipient's state moved: there is something to write."""
        return self.message is not self.before


def _failed(r: QueuedRecipient, status: str, text: str) -> RecipientReport:
    return RecipientReport(
        address=r.address, action="failed", status=status, diagnostic=text,
        remote_mta=r.remote_mta, last_attempt=r.last_attempt, original_recipient=r.orcpt,
    )


def apply_results(
    message: QueuedMessage,
    results: Mapping[str, Reply],
    *,
    where: str | None,
    now: float,
    policy: RetryPolicy,
    rng: random.Random | None = None,
    peer_dsn: bool = False,
) -> Outcome:
    """The message after its recipients got ``results`` from ``where`` ("host[addr]:port",
    None when no server answered) at ``now``; ``peer_dsn``: that server offered DSN.

    Replies for addresses that are not (or no longer) queued are ignored: an administrator
    may have bounced the message meanwhile, and a result counts once.
    """
    current = {r.address: r for r in message.recipients}
    changed: dict[str, QueuedRecipient] = {}
    reports: list[RecipientReport] = []
    successes: list[RecipientReport] = []
    lines: list[RecipientResult] = []
    remote_host = where.split("[", 1)[0] if where else None
    for address, reply in results.items():
        r = current.get(address)
        if r is None or r.status != QUEUED:
            continue
        attempts = r.attempts + 1
        base = replace(r, attempts=attempts, last_attempt=now, remote_mta=remote_host,
                       last_error=None if reply.success else str(reply))
        if reply.success:
            changed[address] = replace(base, status=SENT)
            status = SENT_NOW
            if message.sender and not peer_dsn and r.wants("SUCCESS"):
                successes.append(RecipientReport(
                    address=address, action="relayed", status=reply.status,
                    diagnostic=str(reply), remote_mta=remote_host, last_attempt=now,
                    original_recipient=r.orcpt))
        elif reply.permanent:
            changed[address] = replace(base, status=BOUNCED)
            reports.append(_failed(base, reply.status, str(reply)))
            status = BOUNCED_NOW
        else:
            retry = policy.next_attempt(message.created, now, attempts, rng)
            if retry is None:
                changed[address] = replace(base, status=BOUNCED)
                days = policy.max_age / 86400
                reports.append(_failed(
                    base, "4.4.7",
                    f"message expired after {days:g} day(s) in the queue; last error: {reply}",
                ))
                status = EXPIRED
            else:
                changed[address] = replace(base, next_attempt=retry)
                status = DEFERRED
        lines.append(RecipientResult(address, attempts, status, reply))
    if not changed:
        return Outcome(message, message, tuple(lines))
    updated = message.update(changed)
    warnings: list[RecipientReport] = []
    if policy.warn_due(updated.created, now, updated.warned) and updated.pending:
        if updated.sender:
            until = policy.expires(updated.created)
            warnings = [RecipientReport(
                address=r.address, action="delayed", status=delay_status(r.last_error),
                diagnostic=r.last_error, remote_mta=r.remote_mta, last_attempt=r.last_attempt,
                will_retry_until=until, original_recipient=r.orcpt,
            ) for r in updated.pending if r.wants("DELAY")]
        updated = replace(updated, warned=True)
    return _told(Outcome(message, updated, tuple(lines), tuple(reports), tuple(warnings),
                         successes=tuple(successes)))


def _told(outcome: Outcome) -> Outcome:
    """A double bounce's failures go to nobody (they are only logged): bounces never loop.
    Nor do those of a message whose sender is likely forged (``no_bounce``), delays and
    successes included: a report to a forged sender is backscatter.  Nor do the failures
    of recipients whose NOTIFY leaves FAILURE out."""
    message = outcome.message
    if message.no_bounce and (outcome.reports or outcome.warnings or outcome.successes):
        return replace(outcome, reports=(), warnings=(), successes=(), dropped=outcome.reports)
    if message.sender and outcome.reports:
        notify = {r.address: r for r in message.recipients}
        wanted = tuple(r for r in outcome.reports if notify[r.address].wants("FAILURE"))
        if len(wanted) != len(outcome.reports):
            unwanted = tuple(r for r in outcome.reports if r not in wanted)
            outcome = replace(outcome, reports=wanted, unwanted=unwanted)
    if message.double_bounce and outcome.reports:
        return replace(outcome, reports=(), dropped=outcome.reports)
    return outcome


def bounced_by_administrator(message: QueuedMessage) -> Outcome:
    """``mailsrv queue bounce``: every recipient still queued is bounced, the sender told.

    An administrator's bounce of a message from ``<>`` tells nobody (the postmaster did it).
    """
    reason = ADMIN_BOUNCE_REASON
    reports = given_up_reports(message, reason) if message.sender else []
    after = message.update({r.address: replace(r, status=BOUNCED, last_error=reason)
                            for r in message.pending})
    return _told(Outcome(message, after, reports=tuple(reports)))


def rescheduled(message: QueuedMessage, when: float) -> QueuedMessage:
    """The message with every recipient still queued due at ``when`` (a flush; a retry after
    the disk refused the last state change)."""
    return message.update({r.address: replace(r, next_attempt=when) for r in message.pending})


def destination_failed(error: DestinationError, smarthost: bool) -> Reply:
    """The reply that stands for a destination without a host (no MX, null MX, NXDOMAIN).

    A smarthost that does not resolve is our configuration's fault: its mail waits (4xx).
    """
    permanent = error.permanent and not smarthost
    status = error.status if permanent or error.status[0] == "4" else "4" + error.status[1:]
    return Reply(550 if permanent else 451, status, error.text)


def interrupted(
    recipients: list[str], results: Mapping[str, Reply], where: str, problem: str
) -> dict[str, Reply]:
    """The results of a transaction the session broke off after ``MAIL FROM``: the replies
    it got, and a deferral for the rest (the remote side may have the message: no other
    host gets it in this round)."""
    deferred = replies.RELAY_INTERRUPTED.format(where=where, problem=problem)
    completed = dict(results)
    for address in recipients:
        completed.setdefault(address, deferred)
    return completed


def unreachable(last_problem: str) -> Reply:
    """The reply for recipients no host of their destination answered for."""
    return replies.RELAY_UNREACHABLE.format(problem=last_problem)


def delay_status(error: str | None) -> str:
    """The enhanced status of a stored error text ("451 4.3.0 ..."), for delay notices."""
    if error:
        reply = Reply.from_wire(int(error[:3]) if error[:3].isdigit() else 451, error[4:])
        if not reply.success:
            return reply.status if reply.status[0] == "4" else "4.0.0"
    return "4.0.0"
