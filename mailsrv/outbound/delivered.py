"""
Success reports for mail delivered here at once (RFC 3461 ``NOTIFY=SUCCESS``): blocking I/O.

A message for local mailboxes never enters the queue, so the relayer never sees it: the
intake (mailsrv.inbound.message_intake) calls :func:`report` in its delivery thread once every
copy is stored, and the sender of a recipient that asked for ``NOTIFY=SUCCESS`` gets a
``delivered`` report (through mailsrv.outbound.bounce, like any report we write).  The
message is already accepted by then: a report that cannot be stored is logged, never turns
into a refusal.  Nor is a report sent to a sender that is likely forged (the intake's
``no_bounce``, mailsrv.checks.backscatter): a "delivered" report to a forged sender is
backscatter like any other.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from mailsrv.outbound import bounce, dsn
from mailsrv.routing.address import Mailbox
from mailsrv.routing.dsn_params import RecipientDSN
from mailsrv.routing.router import LocalTarget, Target
from mailsrv.storage.envelope import QueuedMessage, QueuedRecipient
from mailsrv.storage.store import Stored

if TYPE_CHECKING:
    from mailsrv.inbound.message_intake import Transaction

__all__ = ["by_address", "report"]

log = Logger(namespace="mailsrv")


def by_address(
    targets: Mapping[Target, Mailbox], named: Mapping[Mailbox, RecipientDSN]
) -> dict[str, RecipientDSN]:
    """Each target's DSN parameters, by its address: those of the recipient it was named as
    (an alias's targets share its NOTIFY and ORCPT)."""
    return {t.address: named[m] for t, m in targets.items() if m in named}


def report(
    runtime: Any, transaction: "Transaction", stored: Stored,
    recipient_dsn: Mapping[str, RecipientDSN], received_from: str, original: bytes,
    no_bounce: str | None = None,
) -> None:
    """In the delivery thread: the ``delivered`` report owed for the local copies of
    ``stored``, to the transaction's sender (none for ``<>``, nor with ``no_bounce``: why
    the sender is likely forged)."""
    sender = transaction.sender
    wanted = [t for t, _ in stored.places if isinstance(t, LocalTarget)
              and "SUCCESS" in (recipient_dsn.get(t.address, RecipientDSN()).notify or ())]
    if sender is None or not wanted:
        return
    if no_bounce:
        log.info("dsn id={id}: success report not sent, the sender is likely forged ({why})",
                 id=transaction.queue_id, why=no_bounce)
        return
    now = time.time()
    reports = [dsn.RecipientReport(
        address=t.address, action="delivered", status="2.0.0", diagnostic=None,
        remote_mta=None, original_recipient=recipient_dsn[t.address].orcpt,
    ) for t in wanted]
    message = QueuedMessage(
        id=transaction.queue_id, created=now, sender=str(sender), received_from=received_from,
        prefix="", recipients=tuple(QueuedRecipient(t.address) for t in wanted),
        envid=transaction.dsn.envid, ret=transaction.dsn.ret,
    )
    try:
        where = bounce.send_dsn(runtime.config, runtime.directory, message, reports, now,
                                dkim=runtime.dkim, original=original)
    except Exception as e:  # the message is delivered: a lost report is only logged
        log.error("dsn id={id}: success report to <{to}> not stored: {error}",
                  id=transaction.queue_id, to=sender, error=e)
        return
    runtime.metrics.dsn("success")
    went = f"{where.queued.id} queued for" if where.queued else "delivered to"
    log.info("dsn id={id}: success report {went} <{to}> for {rcpts}", id=transaction.queue_id,
             went=went, to=sender, rcpts=",".join(f"<{t.address}>" for t in wanted))
    if where.queued is not None and runtime.relayer is not None:
        # On the reactor thread; a test's clock has no threads: this runs there already.
        call = getattr(runtime.reactor, "callFromThread", None)
        (call or (lambda f, *args: f(*args)))(runtime.relayer.add, where.queued)
