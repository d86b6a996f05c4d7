"""
The ledger of what each authenticated user has sent, against ``[limits] messages_per_day``
and ``recipients_per_hour`` (the checks are mailsrv.checks.ratelimits).

When a message counts: once it is accepted (the ``250`` after the final dot), with the
recipients it was accepted for, so that a message refused at any stage (a bad recipient, a
check at the end of DATA, a full disk) or abandoned (RSET, a dropped connection) uses no
quota.  While a transaction is open its message and its accepted recipients are held as
*open* and count too, so that a spammer's parallel connections cannot pass the limit
together; they are released when the transaction ends, either way.

The first refusal of a user in any 24 hours also tells the postmaster (``notify``, which
the runtime makes store a notice: mailsrv.outbound.notice), whichever limit it was.
In memory, as the AUTH failures are: a restart forgets the counts (the limits are far above
what a person sends, and an attacker cannot restart the server).  Reactor thread only.
"""

from __future__ import annotations

from collections.abc import Callable

from mailsrv.checks.ratelimits import DAY, HOUR, Window

__all__ = ["SendQuota"]


class _Usage:
    """One user's: accepted messages and recipients, what is open, when the postmaster was
    last told (None: not in the last day)."""

    __slots__ = ("messages", "recipients", "open_messages", "open_recipients", "notified")

    def __init__(self) -> None:
        self.messages = Window(DAY)
        self.recipients = Window(HOUR)
        self.open_messages = 0
        self.open_recipients = 0
        self.notified: float | None = None

    def idle(self, now: float) -> bool:
        return (not self.open_messages and not self.open_recipients
                and not self.messages.count(now) and not self.recipients.count(now)
                and (self.notified is None or now - self.notified >= DAY))


class SendQuota:
    """Every authenticated user's usage (0 turns a limit off)."""

    def __init__(
        self, messages_per_day: int, recipients_per_hour: int, clock: Callable[[], float],
        notify: Callable[[str, str, str], object] = lambda user, reason, client: None,
    ) -> None:
        self.messages_per_day = messages_per_day
        self.recipients_per_hour = recipients_per_hour
        self.clock = clock
        #: Called as notify(user, reason, client) once per user in any 24 hours.
        self.notify = notify
        self._users: dict[str, _Usage] = {}

    def _usage(self, user: str) -> _Usage:
        usage = self._users.get(user)
        if usage is None:
            usage = self._users[user] = _Usage()
        return usage

    def messages_used(self, user: str) -> int:
        """Messages accepted in the last 24 hours, and those of open transactions."""
        usage = self._users.get(user)
        if usage is None:
            return 0
        return usage.messages.count(self.clock()) + usage.open_messages

    def recipients_used(self, user: str) -> int:
        """Recipients of messages accepted in the last hour, and those of open transactions."""
        usage = self._users.get(user)
        if usage is None:
            return 0
        return usage.recipients.count(self.clock()) + usage.open_recipients

    def opened(self, user: str) -> None:
        """MAIL was accepted: a transaction of ``user`` is open."""
        self._usage(user).open_messages += 1

    def recipient_added(self, user: str) -> None:
        """RCPT was accepted in an open transaction of ``user``."""
        self._usage(user).open_recipients += 1

    def closed(self, user: str, recipients: int, accepted: bool) -> None:
        """A transaction of ``user`` with ``recipients`` accepted recipients ended: its
        message counts if it was ``accepted`` (the 250 was given), else nothing does."""
        usage = self._usage(user)
        usage.open_messages = max(0, usage.open_messages - 1)
        usage.open_recipients = max(0, usage.open_recipients - recipients)
        now = self.clock()
        if accepted:
            usage.messages.add(now)
            usage.recipients.add(now, recipients)
        elif usage.idle(now):
            del self._users[user]

    def refused(self, user: str, reason: str, client: str) -> bool:
        """A check deferred ``user`` for ``reason``: the postmaster is told if that is the
        user's first refusal in 24 hours (True then)."""
        usage, now = self._usage(user), self.clock()
        if usage.notified is not None and now - usage.notified < DAY:
            return False
        usage.notified = now
        self.notify(user, reason, client)
        return True

    def __len__(self) -> int:
        return len(self._users)
