"""
Sending the TLS-RPT reports (``[tls_reports] enabled``): once a day at ``[tls_reports] hour``
UTC (the default hour 0 makes the period the UTC day, as RFC 8460 §4.1 recommends), for each
policy domain we had sessions with, the ``_smtp._tls.<domain>`` TXT record is looked up
through the server's resolver and the gzipped report goes to each of its rua: ``mailto:`` as
a mail stored like our bounces (DKIM-signed, queued, from ``<>``), ``https:`` as a POST.
A domain without a record gets nothing (most have none).

``mailsrv tls-report --send-now`` asks the running server (through the queue's control
channel) for the reports of the period so far, now.  Counts that were taken for a report are
not kept when it cannot be delivered (a failed lookup, a refused POST): logged, not retried.
"""

from __future__ import annotations

import datetime
import time
import urllib.parse
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error

from mailsrv.outbound.bounce import postmaster_address, store_own
from mailsrv.outbound.dailyjob import DailyJob
from mailsrv.outbound.destination import load_trust_root
from mailsrv.outbound.tlsrpt import document
from mailsrv.outbound.tlsrpt.counts import Period, PolicyTally, TLSCounts
from mailsrv.outbound.tlsrpt.https import PostFailed, post_report
from mailsrv.storage import queue
from mailsrv.storage.store import Stored

__all__ = ["TLSReporter", "contact_info", "store_tls_report"]

log = Logger(namespace="mailsrv")

#: DNS timeouts per try for the _smtp._tls lookup.
DNS_TIMEOUT = (2, 5)


class TLSReporter(DailyJob):
    """Counts (``counts``) and reports once a day; ``runtime.reactor`` is its clock."""

    def __init__(self, runtime: Any, counts: TLSCounts,
                 post: Callable[..., defer.Deferred] | None = None) -> None:
        self.runtime = runtime
        self.counts = counts
        self.clock = runtime.reactor
        self._post = post or post_report
        self._call: Any = None
        self._trust_root: Any = None

    @property
    def settings(self) -> Any:
        """``[tls_reports]`` as the server has it now (a reload may change it)."""
        return self.runtime.config.tls_reports

    def startService(self) -> None:
        self.counts.start()
        DailyJob.startService(self)

    def stopService(self) -> Any:
        DailyJob.stopService(self)
        return self.counts.stop()

    def current_time(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)

    def daily_hour(self) -> int:
        return self.settings.hour

    def run_daily(self) -> Any:
        return self.send()

    def send_now(self) -> defer.Deferred:
        """For ``mailsrv tls-report --send-now``: the answer text once every report went."""
        return self.send().addCallback(
            lambda sent: "ok: " + (f"{len(sent)} report(s): " + "; ".join(sent) if sent
                                   else "no policy domain with a _smtp._tls record"))

    @defer.inlineCallbacks
    def send(self) -> Any:
        """Report the period so far, one domain after the other; fires with what was sent
        (``domain -> rua`` strings), never fails."""
        period = self.counts.take()
        sent: list[str] = []
        for domain, tallies in sorted(period.by_domain().items()):
            try:
                sent += (yield self._report_domain(domain, tallies, period))
            except Exception as e:  # one domain's trouble never stops the others
                log.error("tlsrpt: {domain}: not reported: {error}", domain=domain, error=e)
        return sent

    @defer.inlineCallbacks
    def _report_domain(self, domain: str, tallies: list[PolicyTally], period: Period) -> Any:
        rua = yield self._lookup(domain)
        if rua is None:
            log.debug("tlsrpt: {domain}: no _smtp._tls record", domain=domain)
            return []
        config = self.runtime.config
        report_id = f"{queue.new_queue_id()}.{int(period.until)}@{config.hostname}"
        body = document.build_report(
            organization=self.settings.organization or config.hostname,
            contact=contact_info(config, self.runtime.directory),
            report_id=report_id, since=period.since, until=period.until, tallies=tallies)
        data = yield self.runtime.in_thread(document.gzipped, body)
        sent = []
        for uri in rua:
            try:
                if uri.lower().startswith("mailto:"):
                    to = urllib.parse.unquote(uri[7:].split("?")[0])
                    yield self._mail(to, domain, report_id, data, period)
                else:
                    yield self._post(self.clock, self.runtime.resolver, uri, data, self._trust())
                log.info("tlsrpt: report {id} for {domain} sent to {uri}", id=report_id,
                         domain=domain, uri=uri)
                sent.append(f"{domain} -> {uri}")
            except (PostFailed, Exception) as e:
                log.error("tlsrpt: report {id} for {domain} to {uri} failed: {error}",
                          id=report_id, domain=domain, uri=uri, error=e)
        return sent

    @defer.inlineCallbacks
    def _lookup(self, domain: str) -> Any:
        """The rua of the domain's record, None without one; a failed lookup raises."""
        name = f"_smtp._tls.{domain}"
        try:
            answers, _, _ = yield self.runtime.resolver.lookupText(name, timeout=DNS_TIMEOUT)
        except error.DNSNameError:
            return None
        texts = [b"".join(a.payload.data).decode("utf-8", "replace")
                 for a in answers if a.type == dns.TXT]
        return document.parse_record(texts)

    def _mail(self, to: str, domain: str, report_id: str, data: bytes,
              period: Period) -> defer.Deferred:
        runtime = self.runtime
        d = runtime.in_thread(store_tls_report, runtime.config, runtime.directory, to, domain,
                              report_id, data, period, runtime.dkim)

        def stored(place: Stored) -> None:
            for entry in place.entries if runtime.relayer is not None else ():
                runtime.relayer.add(entry)

        return d.addCallback(stored)

    def _trust(self) -> Any:
        if self._trust_root is None:
            self._trust_root = load_trust_root(self.runtime.config.relay.tls_ca_file)
        return self._trust_root


def contact_info(config: Any, directory: Any) -> str:
    """The report's contact-info: ``[tls_reports] contact``, else our postmaster, with a
    domain (a bare ``postmaster`` says nothing to another organization)."""
    if config.tls_reports.contact:
        return config.tls_reports.contact
    address = postmaster_address(config, directory)
    return address if "@" in address else f"postmaster@{config.hostname}"


def store_tls_report(config: Any, directory: Any, to: str, domain: str, report_id: str,
                     data: bytes, period: Period, dkim: Any = None,
                     now: float | None = None) -> Stored:
    """In a delivery thread: the report's mail stored for ``to`` (queued, DKIM-signed)."""
    now = time.time() if now is None else now
    message_id = queue.new_queue_id()
    message = document.report_message(
        hostname=config.hostname, to=to, domain=domain, report_id=report_id, data=data,
        since=period.since, until=period.until, now=now, message_id=message_id)
    return store_own(config, directory, message_id, to, message, now, dkim)
