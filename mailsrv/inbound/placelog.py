"""
The log lines of an accepted message's places, one per target: delivered into a Maildir,
queued for Dovecot (LMTP) or queued for relaying (with the ``no_bounce`` reason, if any).
Apart from mailsrv.inbound.message_intake so that the transaction keeps to its intake; the
lines keep the ``mailsrv`` namespace they always had.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.logger import Logger

from mailsrv.routing.address import Mailbox
from mailsrv.routing.router import LocalTarget, Target
from mailsrv.storage.store import Stored

__all__ = ["log_places"]

log = Logger(namespace="mailsrv")


def log_places(queue_id: str, stored: Stored, targets: Mapping[Target, Mailbox]) -> None:
    """One line per place ``stored`` put the message; ``targets`` maps each target to the
    recipient it was addressed as (``orig_to``)."""
    for target, where in stored.places:
        if isinstance(target, LocalTarget) and where == "queue":
            log.info(
                "queued id={id} to=<{rcpt}> orig_to=<{orig}> status=queued (lmtp)",
                id=stored.for_lmtp.id if stored.for_lmtp else queue_id,
                rcpt=target.address, orig=targets[target],
            )
        elif isinstance(target, LocalTarget):
            log.info(
                "delivered id={id} to=<{rcpt}> orig_to=<{orig}> mailbox={path} status=sent",
                id=queue_id, rcpt=target.address, orig=targets[target], path=where,
            )
        else:
            queued = stored.queued
            quiet = f' no_bounce="{queued.no_bounce}"' if queued and queued.no_bounce else ""
            log.info(
                "queued id={id} to=<{rcpt}> orig_to=<{orig}> status=queued{quiet}",
                id=queue_id, rcpt=target.address, orig=targets[target], quiet=quiet,
            )
