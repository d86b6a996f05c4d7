"""
Sending the daily report (``[report] daily``): at ``[report] hour`` local time, the day's
figures (mailsrv.report) go to the postmaster as a message stored like a bounce (a local
postmaster's Maildir, or the queue), in a delivery thread, with what ``mailsrv doctor`` finds
wrong (run as a command of its own: it probes the listeners and the DNS on a reactor of its
own, which the server's must not wait for).

The counters at each report are kept in memory as the next day's starting point; a restart
starts them again from nothing (the report then says so).
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from typing import Any, Callable

from twisted.logger import Logger

from mailsrv import report
from mailsrv.metrics import snapshot
from mailsrv.outbound.bounce import postmaster_address, store_own
from mailsrv.outbound.dailyjob import DailyJob
from mailsrv.storage import queue
from mailsrv.storage.store import Stored

__all__ = ["DailyReport"]

log = Logger(namespace="mailsrv")


#: How long the report waits for ``mailsrv doctor`` (its every probe has a time limit).
DOCTOR_TIMEOUT = 180.0


def doctor_findings(config: Any) -> list[str] | None:
    """In a delivery thread: the warnings and problems ``mailsrv doctor --json`` finds, each
    with its fix; None for the built-in configuration (no file for the doctor to read)."""
    if config.source is None:
        return None
    command = [sys.executable, "-m", "mailsrv.tools.cli", "doctor", "--json",
               "--config", str(config.source)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOCTOR_TIMEOUT)
        findings = json.loads(done.stdout)["findings"]
        return [f"{f['level']}: {f['check']} {f['subject']}: {f['detail']}"
                + (f"; fix: {f['fix']}" if f["fix"] else "")
                for f in findings if f["level"] != "ok"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as e:
        log.warn("report: mailsrv doctor could not run: {error}", error=e)
        return [f"problem: mailsrv doctor could not run ({e}); run it by hand"]


def local_now(seconds: float) -> datetime.datetime:
    """``seconds`` (Unix time) as an aware datetime in the machine's time zone."""
    return datetime.datetime.fromtimestamp(seconds).astimezone()


class DailyReport(DailyJob):
    """Sends the report once a day at ``[report] hour``, local time."""

    def __init__(
        self, runtime: Any, now: Callable[[], float] | None = None,
        doctor: Callable[[Any], list[str] | None] = doctor_findings,
    ) -> None:
        self.runtime = runtime
        self.doctor = doctor
        self.clock = runtime.reactor
        self.now = now or self.clock.seconds
        self.hour = runtime.config.report.hour
        self.since = local_now(self.now())
        self.previous: dict = {}
        self.restarted = True
        self._call: Any = None

    def current_time(self) -> datetime.datetime:
        return local_now(self.now())

    def daily_hour(self) -> int:
        return self.hour

    def run_daily(self) -> Any:
        return self.send()

    def queue_state(self) -> report.QueueState | None:
        relayer = self.runtime.relayer
        messages = getattr(relayer, "messages", None)
        if messages is None or not getattr(relayer, "loaded", True):
            return None
        snapshot_ = list(messages.values())
        oldest = min((m.created for m in snapshot_), default=None)
        return report.QueueState(
            len(snapshot_), sum(len(m.pending) for m in snapshot_),
            max(0.0, self.now() - oldest) if oldest is not None else 0.0)

    def text(self, doctor: list[str] | None = None) -> str:
        """The report of the day so far, with ``doctor``'s findings (None: not run); the next
        one counts from here."""
        metrics = self.runtime.metrics
        now_figures = snapshot(metrics.registry)
        day = report.difference(now_figures, self.previous)
        until = local_now(self.now())
        text = report.compose(
            self.runtime.config.hostname, self.since, until, self.restarted, day,
            metrics.senders.take(), metrics.recipients.take(), self.queue_state(),
            getattr(self.runtime.tls, "expires", None), doctor)
        self.previous, self.since, self.restarted = now_figures, until, False
        return text

    def send(self) -> Any:
        """Run the doctor, compose, and store, in threads; fires when stored (or the failure
        logged)."""
        config, directory = self.runtime.config, self.runtime.directory
        d = self.runtime.in_thread(self.doctor, config)
        d.addCallback(lambda found: self.runtime.in_thread(
            store_report, config, directory, self.text(found), self.now()))

        def stored(result: tuple[str, Stored]) -> None:
            to, place = result
            queued = place.entries  # with LMTP delivery, a local postmaster's copy is queued
            log.info("report: daily report {id} for <{to}> {went}", to=to,
                     id=",".join(q.id for q in queued) or "-",
                     went="queued" if queued else "delivered")
            for entry in queued if self.runtime.relayer is not None else ():
                self.runtime.relayer.add(entry)

        def failed(failure: Any) -> None:
            log.error("report: the daily report could not be stored: {error}",
                      error=failure.getErrorMessage())

        d.addCallbacks(stored, failed)
        return d


def store_report(config: Any, directory: Any, text: str, now: float) -> tuple[str, Stored]:
    """In a delivery thread: the report stored for the postmaster; (address, where)."""
    to = postmaster_address(config, directory)
    report_id = queue.new_queue_id()
    when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    data = report.message(config.hostname, to, report_id, text, when)
    return to, store_own(config, directory, report_id, to, data, now)
