"""
The pipeline checks that act on rspamd's verdict (``Facts.spam``), at the MESSAGE stage,
after the authentication checks.  Pure: the scan is a fact, asked for in the delivery thread
before the stage (mailsrv.inbound.message_intake).

- ``rspamd``: the action decides.  ``reject``: 550 5.7.1 with rspamd's message;
  ``soft reject``: 451 4.7.1 (rspamd's greylisting module and its ratelimits answer this);
  ``add header`` and ``rewrite subject``: accepted into the Junk folder (the subject is not
  rewritten: the folder says it); ``greylist`` and ``no action``: accepted.  ``greylist`` is
  only rspamd's threshold for its own greylisting module, which defers a message it wants to
  greylist by answering ``soft reject``: deferring every ``greylist`` here would defer such
  a message for ever when that module is off (it needs Redis), so it is accepted (mailsrv's
  own greylisting is issue 14 item 3).  No answer (down, too slow, a reply we cannot read):
  ``on_failure = "accept"`` accepts, ``"tempfail"`` defers with 451 4.7.1.
- ``rspamd_headers``: the fields rspamd asks to add (``milter.add_headers``), and
  ``X-Spam: Yes`` on a message filed into Junk (what rspamd's own milter adds for ``add
  header``) unless rspamd added an X-Spam: field itself.  Not for a refused message.
"""

from __future__ import annotations

from zope.interface import implementer

from mailsrv import replies
from mailsrv.checks.auth.checks import JUNK_FOLDER
from mailsrv.checks.pipeline import (
    ACCEPT,
    AddHeaders,
    Facts,
    FileInto,
    Reject,
    Stage,
    TempFail,
    Verdict,
)
from mailsrv.checks.rspamd.protocol import Scan, ScanFailure
from mailsrv.config import Config
from mailsrv.interfaces import ICheck

__all__ = ["JUNK_ACTIONS", "REFUSING_ACTIONS", "RspamdAction", "RspamdHeaders", "rspamd_checks"]

#: The actions that file the message into Junk.
JUNK_ACTIONS = ("add header", "rewrite subject")
#: The actions that refuse it (for good or for now).
REFUSING_ACTIONS = ("reject", "soft reject")
#: The field added to a message filed into Junk (rspamd's milter adds the same).
SPAM_FIELD = b"X-Spam: Yes\n"


@implementer(ICheck)
class RspamdAction:
    """rspamd's action as a verdict; ``on_failure`` ("accept" or "tempfail") when there is
    no answer."""

    name = "rspamd"
    stage = Stage.MESSAGE

    def __init__(self, on_failure: str = "accept") -> None:
        self.on_failure = on_failure

    def check(self, facts: Facts) -> Verdict:
        scan = facts.spam
        if scan is None:
            return ACCEPT
        if isinstance(scan, ScanFailure):
            if self.on_failure == "tempfail":
                return TempFail(replies.SPAM_FILTER_UNAVAILABLE,
                                reason=f"rspamd failed: {scan.reason}")
            return ACCEPT
        why = f"rspamd {scan.summary()}"
        if scan.action == "reject":
            return Reject(replies.SPAM_REJECTED.format(
                message=scan.message or "spam message rejected"), reason=why)
        if scan.action == "soft reject":
            return TempFail(replies.SPAM_DEFERRED.format(
                message=scan.message or "try again later"), reason=why)
        if scan.action in JUNK_ACTIONS:
            return FileInto(JUNK_FOLDER)
        return ACCEPT


@implementer(ICheck)
class RspamdHeaders:
    """The fields rspamd asks to add, and X-Spam: on junk."""

    name = "rspamd_headers"
    stage = Stage.MESSAGE

    def check(self, facts: Facts) -> Verdict:
        scan = facts.spam
        if not isinstance(scan, Scan) or scan.action in REFUSING_ACTIONS:
            return ACCEPT
        fields = list(scan.add_headers)
        if scan.action in JUNK_ACTIONS and not any(
                field.lower().startswith(b"x-spam:") for field in fields):
            fields.append(SPAM_FIELD)
        return AddHeaders(tuple(fields)) if fields else ACCEPT


def rspamd_checks(config: Config) -> list[ICheck]:
    """The checks ``[rspamd]`` turns on (none without a url)."""
    if not config.rspamd.enabled:
        return []
    return [RspamdAction(config.rspamd.on_failure), RspamdHeaders()]
