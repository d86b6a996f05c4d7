"""
Rate limits that no person reaches and a stolen password or a flooding client does: events
counted over a sliding window (:class:`Window`), the connections of each client address
(:class:`ConnectionRate`), and the checks that hold an authenticated user to
``[limits] messages_per_day`` (MAIL) and ``recipients_per_hour`` (RCPT), answering
``451 4.7.0``.

The windows slide: "per day" is any 24 hours, "per hour" any 60 minutes, "per minute" any 60
seconds, as mox counts its 1,000 messages a day; a calendar day would let a spammer send
twice the limit around midnight.  What a user has used is the per-user ledger's
(mailsrv.inbound.sendquota); here is only the arithmetic.

Pure: no I/O, no reactor; every time is given (or read from an injected clock).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from zope.interface import implementer

from mailsrv import replies
from mailsrv.checks.pipeline import ACCEPT, Facts, Stage, TempFail, Verdict
from mailsrv.interfaces import ICheck

if TYPE_CHECKING:
    from mailsrv.inbound.sendquota import SendQuota

__all__ = [
    "DAY", "HOUR", "MAX_CLIENTS", "MINUTE", "ConnectionRate", "MessagesPerDay",
    "RecipientsPerHour", "Window",
]

DAY, HOUR, MINUTE = 86400.0, 3600.0, 60.0

#: Client addresses whose connections are remembered at most (the least recently seen go
#: first: a flood from many addresses forgets some of them, it never grows the memory).
MAX_CLIENTS = 10_000


class Window:
    """What happened in the last ``span`` seconds: ``(time, n)`` entries, oldest first.

    Only what was admitted is added (a refused message or connection uses no quota), so a
    window holds at most as many entries as its limit allows."""

    __slots__ = ("span", "_events", "_total")

    def __init__(self, span: float) -> None:
        self.span = span
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def count(self, now: float) -> int:
        """The events of the last ``span`` seconds before ``now``."""
        events, oldest = self._events, now - self.span
        while events and events[0][0] <= oldest:
            self._total -= events.popleft()[1]
        return self._total

    def add(self, now: float, n: int = 1) -> None:
        if n > 0:
            self._events.append((now, n))
            self._total += n


class ConnectionRate:
    """``connections_per_minute`` per client address (0: no limit), counted when admitted."""

    def __init__(self, per_minute: int, clock: Callable[[], float],
                 max_clients: int = MAX_CLIENTS) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.max_clients = max_clients
        self._clients: OrderedDict[str, Window] = OrderedDict()

    def admit(self, ip: str) -> bool:
        """Count one more connection from ``ip``; False (not counted) when it is one too many."""
        if not self.per_minute:
            return True
        now = self.clock()
        window = self._clients.get(ip)
        if window is None:
            window = self._clients[ip] = Window(MINUTE)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(ip)
        if window.count(now) >= self.per_minute:
            return False
        window.add(now)
        return True

    def __len__(self) -> int:
        return len(self._clients)


def _reason(key: str, limit: int) -> str:
    """What the log line says: ``send limit messages_per_day 1000``."""
    return f"send limit {key} {limit}"


@implementer(ICheck)
class MessagesPerDay:
    """MAIL: an authenticated user who had ``messages_per_day`` messages accepted in the last
    24 hours (those in an open transaction count too) is deferred.  Others pass: a trusted
    network's mail without AUTH (local ``sendmail``, cron) is no user's."""

    name = "send_limit"
    stage = Stage.MAIL

    def __init__(self, quota: Callable[[], SendQuota | None]) -> None:
        self.quota = quota

    def check(self, facts: Facts) -> Verdict:
        user, quota = facts.client.authenticated_as, self.quota()
        if user is None or quota is None or not quota.messages_per_day:
            return ACCEPT
        if quota.messages_used(user) < quota.messages_per_day:
            return ACCEPT
        reason = _reason("messages_per_day", quota.messages_per_day)
        quota.refused(user, reason, facts.client.name)
        return TempFail(replies.SEND_LIMIT_MESSAGES.format(limit=str(quota.messages_per_day)),
                        reason=reason)


@implementer(ICheck)
class RecipientsPerHour:
    """RCPT: a recipient past ``recipients_per_hour`` in the last hour (those of accepted
    messages, and of open transactions, this one's included) is deferred; the recipients
    before it stay accepted, and the client sends the rest later (RFC 5321 §4.5.3.1.10)."""

    name = "send_limit"
    stage = Stage.RCPT

    def __init__(self, quota: Callable[[], SendQuota | None]) -> None:
        self.quota = quota

    def check(self, facts: Facts) -> Verdict:
        user, quota = facts.client.authenticated_as, self.quota()
        if user is None or quota is None or not quota.recipients_per_hour:
            return ACCEPT
        if quota.recipients_used(user) < quota.recipients_per_hour:
            return ACCEPT
        reason = _reason("recipients_per_hour", quota.recipients_per_hour)
        quota.refused(user, reason, facts.client.name)
        return TempFail(
            replies.SEND_LIMIT_RECIPIENTS.format(limit=str(quota.recipients_per_hour)),
            reason=reason)
