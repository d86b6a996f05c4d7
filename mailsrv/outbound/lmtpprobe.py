"""The quota check at RCPT with LMTP delivery: what Dovecot's LMTP answers to ``RCPT`` now.

Dovecot (``lmtp_rcpt_check_quota = yes``) refuses ``RCPT`` with ``552 5.2.2`` for a mailbox
already full; asked before our own ``250`` to RCPT, the sending server gets that refusal
instead of a bounce later.  Only that refusal counts: anything else (Dovecot unreachable, slow,
a 4xx) lets the recipient through, and the queue delivers or retries as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer

from mailsrv.config import LmtpDelivery
from mailsrv.outbound.lmtpclient import LMTPClientFactory
from mailsrv.outbound.smtpclient import SessionOutcome
from mailsrv.outbound.transaction import OutboundTransaction
from mailsrv.replies import Reply

__all__ = ["PROBE_TIMEOUT", "full_mailbox"]

#: Seconds the probe may take before the recipient is let through.
PROBE_TIMEOUT = 10.0


def _full(reply: Reply) -> bool:
    return reply.code == 552 or reply.status.startswith("5.2.2")


def full_mailbox(reactor: Any, target: LmtpDelivery, identity: str, sender: str,
                 addresses: Sequence[str], timeout: float = PROBE_TIMEOUT) -> defer.Deferred:
    """Fires with Dovecot's refusal of the first full mailbox among ``addresses``, or None."""
    probe = OutboundTransaction(queue_id="probe", sender=sender, recipients=list(addresses),
                                prefix=b"", body_path=Path("/dev/null"))
    factory = LMTPClientFactory([probe], identity=identity, timeout=timeout, probe=True)
    if target.path is not None:
        reactor.connectUNIX(str(target.path), factory, timeout=timeout)
    else:
        reactor.connectTCP(target.host, target.port, factory, timeout=timeout)

    def decided(outcome: SessionOutcome) -> Reply | None:
        return next((r for r in probe.results.values() if _full(r)), None)

    return factory.done.addCallback(decided)
