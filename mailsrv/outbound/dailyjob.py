"""
Something the server does once a day at an hour of the administrator's choosing: the daily
report (``[report] hour``, local time) and the TLS-RPT reports (``[tls_reports] hour``, UTC).

The hour is asked for at each scheduling (the TLS reports read it from the configuration then,
so a reload changes it from the next run); ``clock`` is the runtime's reactor (a ``task.Clock``
in tests).
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.application import service

from mailsrv import report

__all__ = ["DailyJob"]


class DailyJob(service.Service):
    """Calls ``run_daily`` at ``daily_hour()`` of ``current_time()``'s time zone, each day."""

    clock: Any
    _call: Any = None

    def current_time(self) -> datetime.datetime:
        """Now, as an aware datetime in the time zone the hour is meant in."""
        raise NotImplementedError

    def daily_hour(self) -> int:
        raise NotImplementedError

    def run_daily(self) -> Any:
        raise NotImplementedError

    def startService(self) -> None:
        service.Service.startService(self)
        self._schedule()

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return None

    def _schedule(self) -> None:
        now = self.current_time()
        delay = (report.next_run(now, self.daily_hour()) - now).total_seconds()
        self._call = self.clock.callLater(max(delay, 1.0), self._fire)

    def _fire(self) -> None:
        self._call = None
        self.run_daily()
        if self.running:
            self._schedule()
