"""
The cost of the Prometheus endpoint (issue 17): durable local delivery (smtp-source, 10
connections, 5 KB messages) with ``[metrics] listen`` unset, and set with the endpoint scraped
every second meanwhile (as a Prometheus with a 1 s interval would: 15 s is usual), the same
server, client and bytes otherwise.

The counters themselves are kept in both variants (they are the daily report's too), so this
measures the endpoint and its scrapes; the counting is measured against the mailsrv before
the metrics with ``--baseline`` (``python -m bench --only throughput --baseline PYTHON``).
Checked: every message delivered once with its own content, and, scraped, every scrape parsed
by prometheus_client's parser with ``mailsrv_messages_accepted_total`` equal to the count at
the end.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import urllib.request
from pathlib import Path

from bench import content, cpuload
from bench.harness import (
    MESSAGE_SIZE,
    RESULTS,
    Plan,
    alternate,
    cleanup,
    make_server,
    run_smtp_source,
    sent_message,
)
from bench.peers import wait_until

VARIANTS = ["metrics off", "metrics scraped"]
SCRAPE_INTERVAL = 1.0


def rate_measure(variant: str) -> str:
    return f"{variant} msg/s"


def cpu_measure(variant: str) -> str:
    return f"{variant} CPU ms/msg"


class Scraper:
    """GET /metrics every ``interval`` seconds in a thread; each answer parsed."""

    def __init__(self, port: int, interval: float = SCRAPE_INTERVAL) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def get(self) -> dict[str, float]:
        """One scrape: sample name with its labels -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url, timeout=10) as answer:
            text = answer.read().decode()
        return {f"{s.name}{sorted(s.labels.items())}": s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.get()
                self.scrapes += 1
            except Exception as exc:  # counted and reported, never fatal to the measure
                self.errors.append(repr(exc))


def metrics_port(server) -> int:
    found = re.search(r"listening on \S+ \(127\.0\.0\.1 port (\d+)\) for metrics",
                      server.log_text())
    if not found:
        raise RuntimeError("the metrics listener did not start")
    return int(found.group(1))


def measure_metrics(plan: Plan, work: Path) -> None:
    count = plan.messages["c10"]
    print(f"== metrics: {count} messages of 5 KB, 10 connections, durable local delivery; "
          f"[metrics] off / on and scraped every {SCRAPE_INTERVAL:g} s", flush=True)

    def one(variant: str, r: int) -> None:
        scraped = variant == "metrics scraped"
        wd = work / f"metrics-{variant.replace(' ', '-')}-{r}"
        overrides = {"metrics": {"listen": "tcp:0:interface=127.0.0.1"}} if scraped else {}
        server = make_server("mailsrv", wd, overrides=overrides)
        try:
            server.start()
            subject = f"bench metrics {os.urandom(6).hex()}"
            sent = dataclasses.replace(sent_message(),
                                       headers={**sent_message().headers, "Subject": subject})
            before = server.delivered()
            scraper = Scraper(metrics_port(server)) if scraped else None
            with cpuload.Interval() as load:
                cpu = server.cpu_seconds()
                start = time.time()
                if scraper is not None:
                    scraper.__enter__()
                try:
                    done = run_smtp_source(server.port, 10, count, 1, MESSAGE_SIZE, 300,
                                           subject=subject)
                    try:
                        wait_until(lambda: server.count() - len(before) >= count, 120,
                                   f"{count} files in new/", 0.01)
                    except RuntimeError:
                        pass
                finally:
                    if scraper is not None:
                        scraper.__exit__()
                cpu = server.cpu_seconds() - cpu
            elapsed = max(server.last_delivery() - start, 1e-6)
            new = server.delivered() - before
            checked, problems = content.check(content.read_files(server.maildir_root, new),
                                              sent)
            check = (f"{count} sent, {len(new)} in new/, content of {checked} "
                     + ("as sent" if not problems else "WRONG"))
            if scraper is not None:
                accepted = scraper.get().get(
                    "mailsrv_messages_accepted_total[('listener', 'smtp')]", 0.0)
                check += f", {scraper.scrapes} scrapes, accepted_total={accepted:g}"
                if scraper.errors or accepted != count:
                    problems.append(f"scrapes: {scraper.errors[:2]}, accepted {accepted:g}")
            if done.returncode:
                check += f" (smtp-source: {done.stderr.strip()[-200:]})"
            if problems:
                check += ": " + "; ".join(problems[:2])
            ok = done.returncode == 0 and len(new) == count and not problems
            RESULTS.add(rate_measure(variant), "mailsrv", count / elapsed, check, ok,
                        load.result)
            RESULTS.add(cpu_measure(variant), "mailsrv", 1000 * cpu / count, check, ok,
                        load.result)
        finally:
            server.stop()
            cleanup(wd)

    alternate(VARIANTS, plan.repeats, one, server="mailsrv")
