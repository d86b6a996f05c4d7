"""``mailsrv tls-report [--send-now]``: the TLS-RPT counts of the day so far, or their reports
sent now.

Without ``--send-now`` it prints, per policy domain, the report that would be sent (RFC 8460
JSON) from what the server last wrote to ``<queue>/tlsrpt.json`` (at most a couple of minutes
old): what an administrator looks at to see which domains our TLS fails with.  With
``--send-now`` it asks the running server, through the queue's control channel, to send the
reports of the period so far (the next period starts then), and prints its answer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mailsrv.config import Config
from mailsrv.outbound.tlsrpt import document
from mailsrv.outbound.tlsrpt.counts import Period, read_state
from mailsrv.outbound.tlsrpt.reporter import contact_info
from mailsrv.routing.router import Directory
from mailsrv.storage import queue_control
from mailsrv.tools.cli_exit import EXIT_FAILED, EXIT_OK, Failed

__all__ = ["add_parser", "cmd_tls_report"]


def add_parser(commands: Any, config_option: argparse.ArgumentParser) -> None:
    text = "the TLS-RPT counts of the day so far (RFC 8460), or --send-now their reports"
    sub = commands.add_parser("tls-report", help=text, description=text,
                              parents=[config_option])
    sub.add_argument("--send-now", action="store_true",
                     help="ask the running server to send the reports of the period so far")
    sub.add_argument("--wait", type=float, default=60.0,
                     help="seconds to wait for the running server's answer (default 60)")
    sub.set_defaults(run=cmd_tls_report)


def cmd_tls_report(config: Config, args: argparse.Namespace) -> int:
    if not config.tls_reports.enabled:
        raise Failed("[tls_reports] enabled is false: no TLS-RPT counts are kept")
    qdir = Path(config.queue.path)
    if args.send_now:
        return _send_now(qdir, args.wait)
    state = read_state(qdir / "tlsrpt.json")
    if state is None:
        print("no counts yet (the server writes them every couple of minutes)")
        return EXIT_OK
    since, tallies = state
    period = Period(since, time.time(), list(tallies.values()))
    reports = {domain: document.build_report(
        organization=config.tls_reports.organization or config.hostname,
        contact=contact_info(config, Directory(config.domains.local, frozenset(), {})),
        report_id="(not sent yet)", since=period.since, until=period.until, tallies=found)
        for domain, found in sorted(period.by_domain().items())}
    print(json.dumps(reports, indent=2))
    return EXIT_OK


def _send_now(qdir: Path, wait: float) -> int:
    try:
        lock = queue_control.lock_queue(qdir)
    except queue_control.QueueLocked:
        from mailsrv.tools.cli_queue import ask_server

        text = ask_server(qdir, "tlsreport", None, wait)
        print(text)
        return EXIT_OK if text.startswith("ok") else EXIT_FAILED
    lock.close()
    raise Failed("no server is running: it sends the reports (start it, then try again)")
