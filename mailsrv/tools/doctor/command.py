"""``mailsrv doctor [--json]``: the command line, and the order of the checks.

The configuration comes first: when it cannot even be read there is nothing else to check,
and that is the one (problem) finding.  Otherwise every check runs, whatever the others found,
so that one run names everything that is wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path
from typing import Any

from mailsrv.config import DEFAULT_CONFIG_PATH, Config
from mailsrv.tools.doctor import evaluate, evaluate_mail, probe
from mailsrv.tools.doctor.findings import Finding, exit_status, to_json, to_text

__all__ = ["add_parser", "cmd_doctor", "run_checks"]


def add_parser(commands: Any, config_option: argparse.ArgumentParser) -> None:
    text = "check a running installation: ok / warning / problem, with the fix for each"
    sub = commands.add_parser(
        "doctor", help=text, parents=[config_option],
        description=text.capitalize() + ": the configuration, the listeners, the certificate, "
        "each local domain's DNS records, our address on the configured blocklists, the queue, "
        "the disk space and the permissions of the keys and the users file. Exit status 1 when "
        "anything is a problem (warnings do not count), else 0.",
    )
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.set_defaults(standalone=cmd_doctor)


def _local_checks(config: Config) -> tuple[list[Finding], list[Finding]]:
    """(listener and certificate findings, queue, disk and permission findings)."""
    served = None
    found: list[Finding] = []
    for kind, endpoints in (("smtp", config.smtp.listen), ("submission", config.submission.listen)):
        for endpoint in endpoints:
            facts, fingerprint = probe.listener(endpoint, kind, config.tls.enabled)
            served = served or fingerprint
            found.append(evaluate.listener_finding(facts))
    cert = None
    if config.tls.cert is not None:
        cert = probe.certificate(Path(config.tls.cert))
        cert = dataclasses.replace(cert, served_fingerprint=served)
    found += evaluate.certificate_findings(cert, config.hostname,
                                           datetime.datetime.now(datetime.timezone.utc))
    rest = evaluate_mail.queue_findings(probe.queue_state(Path(config.queue.path)), time.time(),
                                        config.queue.max_age)
    rest += [evaluate_mail.disk_finding(disk, config.smtp.max_message_size)
             for disk in probe.disks([("queue.path", Path(config.queue.path)),
                                      ("mailboxes.root", Path(config.mailboxes.root))])]
    rest += [evaluate.permission_finding(f) for f in probe.secret_files(config)]
    return found, rest


def run_checks(path: str) -> list[Finding]:
    """Every finding, in the order of the checks."""
    config, error, summary, warnings = probe.configuration(path)
    found = evaluate.config_findings(path, error, summary, warnings)
    if config is None:
        return found
    local, rest = _local_checks(config)
    from mailsrv.tools.cli_dns import run_on_reactor
    from mailsrv.tools.doctor.probe_dns import dns_findings

    return found + local + run_on_reactor(lambda reactor: dns_findings(config, reactor)) + rest


def cmd_doctor(args: argparse.Namespace) -> int:
    findings = run_checks(str(getattr(args, "config", None) or DEFAULT_CONFIG_PATH))
    sys.stdout.write(to_json(findings) if args.json else to_text(findings))
    sys.stdout.flush()
    return exit_status(findings)
