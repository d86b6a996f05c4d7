"""
When to try a deferred recipient again, and when to give up (pure).

Backoff grows through a schedule (by default 1 min, 5, 15, 30, 1 h, 2 h, then every 4 h) so
that a short outage of the remote side costs minutes, not hours, while a long one does not
have us knock every minute.  Jitter spreads the retries of many messages deferred at the same
moment (a remote server coming back must not be hit by the whole queue at once).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_RETRY_SCHEDULE", "RetryPolicy"]

DEFAULT_RETRY_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
JITTER = 0.1  # each delay is stretched or shrunk by up to 10 %


@dataclass(frozen=True)
class RetryPolicy:
    schedule: Sequence[float] = DEFAULT_RETRY_SCHEDULE  # the last delay repeats
    max_age: float = 5 * 86400.0  # then the recipient is bounced (expired)
    delay_warning: float = 0.0  # 0: never warn the sender of a delay

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1 for the first)."""
        base = self.schedule[min(max(attempts, 1), len(self.schedule)) - 1]
        rng = rng or random
        return base * (1.0 + rng.uniform(-JITTER, JITTER))

    def next_attempt(
        self, created: float, now: float, attempts: int, rng: random.Random | None = None
    ) -> float | None:
        """When to try again after a temporary failure, or None when the message expired.

        A retry that would fall after the message's end of life is moved to the deadline:
        one last try then, and a failure at (or after) the deadline is final.
        """
        deadline = created + self.max_age
        if now >= deadline:
            return None
        return min(now + self.delay(attempts, rng), deadline)

    def expires(self, created: float) -> float:
        return created + self.max_age

    def warn_due(self, created: float, now: float, warned: bool) -> bool:
        """True when the sender should now hear that the message is delayed."""
        return self.delay_warning > 0 and not warned and now - created >= self.delay_warning
