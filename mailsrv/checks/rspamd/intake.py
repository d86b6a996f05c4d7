"""
rspamd's verdict on a message at its intake, in the delivery thread (mailsrv.inbound.message_intake
calls it between the header checks and the message checks).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from twisted.logger import Logger

from mailsrv.checks.pipeline import Client
from mailsrv.checks.rspamd.checks import REFUSING_ACTIONS
from mailsrv.checks.rspamd.protocol import Scan, ScanFailure, request_headers
from mailsrv.checks.rspamd.removal import removals, rename_in_place
from mailsrv.message import headers

if TYPE_CHECKING:
    from mailsrv.inbound.message_intake import Transaction

__all__ = ["scan_message"]

log = Logger(namespace="mailsrv")


def scan_message(
    transaction: Transaction, client: Client, received: bytes, head: bytes
) -> Scan | ScanFailure | None:
    """In the delivery thread: rspamd's verdict on the message as it will be stored (our
    Received: field, then the spool file), logged; for a message it does not refuse,
    the fields it asks to remove, and any incoming X-Spam: (we write that one), renamed
    in the spool file (mailsrv.checks.rspamd.removal).  None without [rspamd]."""
    rspamd = transaction.runtime.rspamd
    if rspamd is None:
        return None
    assert transaction.spool_path is not None
    config = transaction.runtime.config
    fields = request_headers(
        sender=str(transaction.sender) if transaction.sender else None,
        recipients=[str(r) for r in transaction.recipients], ip=client.ip, helo=client.helo,
        reverse_name=client.reverse_name, user=client.authenticated_as,
        queue_id=transaction.queue_id, hostname=config.hostname, password=config.rspamd.password,
    )
    prefix = received + (b"\n" if headers.needs_separator(head) else b"")
    started = time.monotonic()
    scan = rspamd.scan(fields, prefix, transaction.spool_path)
    took = time.monotonic() - started
    if isinstance(scan, ScanFailure):
        log.warn("rspamd id={id} failed: {reason} time={time:.3f} on_failure={then}",
                 id=transaction.queue_id, reason=scan.reason, time=took,
                 then=config.rspamd.on_failure)
        return scan
    log.info("rspamd id={id} {summary} time={time:.3f}", id=transaction.queue_id,
             summary=scan.summary(), time=took)
    if scan.action not in REFUSING_ACTIONS:
        found = removals(head, (*scan.remove_headers, ("x-spam", 0)))
        if found:
            rename_in_place(transaction.spool_path, found)
            transaction.spool_edited()
            log.info("rspamd id={id} renamed {n} header field(s) it asked to remove",
                     id=transaction.queue_id, n=len(found))
    return scan
