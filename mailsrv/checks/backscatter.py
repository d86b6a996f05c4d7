"""
Whether a message we forward may be bounced to its sender when the next hop refuses it.

An alias that forwards off-site passes the whole gate first (blocklists, greylisting, SPF,
DKIM, DMARC, rspamd) like mail for a mailbox; what the gate lets through for a local copy can
still be refused by the server we forward to.  A bounce then goes to the envelope sender, and
when that sender is most likely forged the bounce lands on an innocent third party: the
backscatter that gets a forwarder blocklisted.  So the failures of such a forwarded copy are
only logged (mailsrv.storage.envelope ``no_bounce``).  Pure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailsrv.checks.rspamd.checks import JUNK_ACTIONS
from mailsrv.checks.rspamd.protocol import Scan

if TYPE_CHECKING:
    from mailsrv.checks.auth.results import AuthResults
    from mailsrv.checks.rspamd.protocol import ScanFailure

__all__ = ["FAILED_SPF", "forged_sender"]

#: The SPF results that say the client may not send for the sender's domain.
FAILED_SPF = ("fail", "softfail")


def forged_sender(auth: AuthResults | None, spam: Scan | ScanFailure | None) -> str | None:
    """Why the sender of a message from another server is most likely forged (its SPF failed
    and a From: domain's DMARC failed, which no trusted ARC sealer vouches for; or rspamd
    judged it spam), or None: a bounce to it is legitimate."""
    if auth is not None and auth.spf is not None and auth.spf.result in FAILED_SPF:
        failed = [r.from_domain for r in auth.dmarc
                  if r.result == "fail" and r.from_domain not in auth.arc_vouched]
        if failed:
            return f"spf={auth.spf.result} dmarc=fail for {','.join(failed)}"
    if isinstance(spam, Scan) and spam.action in JUNK_ACTIONS:
        return f"rspamd {spam.action}"
    return None
