"""
The postmaster's notice that a user reached a send limit (mailsrv.checks.ratelimits): a plain
text message, stored as our bounces are (``store``, from ``<>``, DKIM-signed like them), once
per user in any 24 hours (the ledger, mailsrv.inbound.sendquota, decides when).

A user who suddenly sends a thousand messages a day has most likely lost their password: the
postmaster should hear of it the same day rather than from a blocklist's delisting form.  The
notice goes to the postmaster of the user's own domain (every local domain has one: the
router checks it at start-up), who is the person who can reset that password.
"""

from __future__ import annotations

import re
import time

from mailsrv.config import Config
from mailsrv.message.dkimkeys import SigningKeys
from mailsrv.outbound.bounce import postmaster_address, store_own
from mailsrv.outbound.dsn_text import date, token
from mailsrv.routing.router import Directory
from mailsrv.storage import queue
from mailsrv.storage.store import Stored

__all__ = ["build_notice", "notice_recipient", "send_limit_notice"]

# A users-file address as the ledger names it (checked when the file was read); anything else
# is made safe before it reaches a header.
_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def notice_recipient(config: Config, directory: Directory, user: str) -> str:
    """The postmaster of ``user``'s domain when it is ours, else this host's postmaster."""
    domain = user.rpartition("@")[2].lower()
    if domain and directory.is_local_domain(domain):
        return f"postmaster@{domain}"
    return postmaster_address(config, directory)


def build_notice(
    *, hostname: str, notice_id: str, to: str, user: str, reason: str, client: str, now: float,
) -> bytes:
    """The notice as a message (LF line ends, ASCII): who, which limit, from where, what to do."""
    who = user if _ADDRESS.fullmatch(user) else token(user, "unknown")
    why = _UNPRINTABLE.sub("?", reason)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        f"Subject: Send limit reached by {who}",
        f"Date: {date(now)}",
        f"Message-ID: <{notice_id}.limit@{hostname}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        f"The user {who} reached a limit on the mail they may send:",
        "",
        f"    {why}",
        f"    (last refused connection: {token(client, 'unknown')}, {date(now)})",
        "",
        "Their further messages are deferred (451 4.7.0) until the count over the last",
        "24 hours (messages) or the last hour (recipients) is below the limit again;",
        "nothing is lost, their mail programs retry.",
        "",
        "No person sends this much: the password may have been stolen. Check the log",
        f"(grep 'user={who}'), and if the mail is not theirs, change the password",
        "(mailsrv user passwd) and look at the queue (mailsrv queue list).",
        "If the limit is too low for this user, raise it in the [limits] section.",
        "",
        "You get this notice once a day per user; the log has a line for each refusal.",
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


def send_limit_notice(
    config: Config, directory: Directory, user: str, reason: str, client: str,
    now: float | None = None, dkim: SigningKeys | None = None,
) -> tuple[str, Stored]:
    """Build and store the notice (blocking: a worker thread); (its recipient, where it went).
    Raises Refusal when the postmaster cannot receive mail, DeliveryError when the disk
    refuses."""
    now = time.time() if now is None else now
    to = notice_recipient(config, directory, user)
    notice_id = queue.new_queue_id()
    data = build_notice(hostname=config.hostname, notice_id=notice_id, to=to, user=user,
                        reason=reason, client=client, now=now)
    return to, store_own(config, directory, notice_id, to, data, now, dkim)

