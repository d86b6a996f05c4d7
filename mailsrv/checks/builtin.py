"""
The first checks of the pipeline (mailsrv.checks.pipeline): the rules mailsrv always had, as checks.

- ``relay_access`` (RCPT): a client that may not relay sends only to our domains, and never
  with disguised routing (554 5.7.1);
- ``local_recipient`` (RCPT): a recipient in our domains has a safe local part (553 5.1.3)
  that names a mailbox or alias (550 5.1.1);
- ``sender_ownership`` (MAIL): an authenticated user sends only as an address they own
  (553 5.7.1);
- ``hop_limit`` (HEADER): a message with more ``Received:`` fields than
  ``smtp.max_received_headers`` is looping (554 5.4.6);
- ``header_ownership`` (HEADER, when ``submission.check_from_header``): an authenticated
  user's ``From:``, ``Sender:``, ``Resent-From:`` and ``Resent-Sender:`` are theirs, and the
  header section is one every reader reads alike (554 5.6.0, 552 5.3.4, 553 5.7.1);

and the first modifier, ``missing_fields``: a ``Message-ID:`` for a message without one, and
a ``Date:`` for a submitted message without one (RFC 6409 §8.2); then ``dkim_sign``
(mailsrv.checks.signing), which signs over the result.

The rules themselves are in mailsrv.checks.policy (relay, recipients, ownership) and
mailsrv.message.headsection (how the header section is read); these classes say when they apply and
what the client is told.  Pure, apart from the modifier's clock.
"""

from __future__ import annotations

import datetime
from dataclasses import replace
from typing import Callable

from zope.interface import implementer

from mailsrv import replies
from mailsrv.checks.auth.checks import auth_checks
from mailsrv.checks.dnsbl import Dnsbl
from mailsrv.checks.greylist import Greylisting
from mailsrv.checks.pipeline import ACCEPT, Draft, Facts, Pipeline, Reject, Stage, Verdict
from mailsrv.checks.policy import local_refusal, owns_address, relay_refusal
from mailsrv.checks.ratelimits import MessagesPerDay, RecipientsPerHour
from mailsrv.checks.rspamd.checks import rspamd_checks
from mailsrv.checks.signing import ArcSeal, DkimSign
from mailsrv.config import Config
from mailsrv.inbound.sendquota import SendQuota
from mailsrv.interfaces import ICheck, IModifier
from mailsrv.message import headers, headsection
from mailsrv.message.dkimkeys import SigningKeys
from mailsrv.replies import Refusal
from mailsrv.routing.address import parse_mail_from
from mailsrv.routing.srs import SRSError
from mailsrv.storage.greylist import Greylist

__all__ = [
    "HeaderOwnership", "HopLimit", "LocalRecipient", "MissingFields", "RelayAccess",
    "SenderOwnership", "SenderRewriting", "SrsAddress", "builtin_pipeline",
]


@implementer(ICheck)
class RelayAccess:
    """No open relay: see mailsrv.checks.policy.relay_refusal."""

    name = "relay_access"
    stage = Stage.RCPT

    def check(self, facts: Facts) -> Verdict:
        assert facts.recipient is not None
        refusal = relay_refusal(facts.recipient, facts.recipient_is_local, facts.client.may_relay)
        return ACCEPT if refusal is None else Reject(refusal)


@implementer(ICheck)
class SrsAddress:
    """A bounce to an SRS address in our SRS domain must be to one we made and that has not
    expired: any other would make us forward mail to an address of the sender's choosing."""

    name = "srs_address"
    stage = Stage.RCPT

    def check(self, facts: Facts) -> Verdict:
        assert facts.recipient is not None
        if not facts.recipient_is_local:
            return ACCEPT
        try:
            facts.directory.srs_target(facts.recipient)
        except SRSError as exc:
            return Reject(replies.SRS_INVALID.format(reason=str(exc)))
        return ACCEPT


@implementer(ICheck)
class LocalRecipient:
    """Only recipients that exist: see mailsrv.checks.policy.local_refusal."""

    name = "local_recipient"
    stage = Stage.RCPT

    def check(self, facts: Facts) -> Verdict:
        assert facts.recipient is not None
        if not facts.recipient_is_local:
            return ACCEPT
        refusal = local_refusal(facts.recipient, facts.targets)
        return ACCEPT if refusal is None else Reject(refusal)


@implementer(ICheck)
class SenderOwnership:
    """An authenticated user may only use an address they own as the envelope sender, so
    that a stolen or shared password cannot forge someone else's mail.  Any syntactically
    valid sender is accepted from an unauthenticated client (port 25 receives the world's
    mail)."""

    name = "sender_ownership"
    stage = Stage.MAIL

    def check(self, facts: Facts) -> Verdict:
        user = facts.client.authenticated_as
        if user is None or owns_address(user, facts.sender, facts.directory):
            return ACCEPT
        sender = str(facts.sender) if facts.sender is not None else ""
        return Reject(replies.SENDER_NOT_OWNED.format(sender=sender, user=user),
                      reason="sender not owned")


@implementer(ICheck)
class HopLimit:
    """A message that has passed ``limit`` hops already is in a loop."""

    name = "hop_limit"
    stage = Stage.HEADER

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def check(self, facts: Facts) -> Verdict:
        assert facts.head is not None
        if facts.head.received_count > self.limit:
            return Reject(replies.TOO_MANY_HOPS)
        return ACCEPT


@implementer(ICheck)
class HeaderOwnership:
    """Every From:, Sender:, Resent-From: and Resent-Sender: address of an authenticated
    user's message must be their own: the same rule as for the envelope sender.

    The check holds only if no reader can see an originator field we did not check, so a
    header section that readers may read differently is refused (554 5.6.0), and so is one
    too long to read whole (552 5.3.4).
    """

    name = "header_ownership"
    stage = Stage.HEADER

    def check(self, facts: Facts) -> Verdict:
        head, user = facts.head, facts.client.authenticated_as
        assert head is not None
        if user is None:
            return ACCEPT
        if head.ambiguity is not None:
            return Reject(replies.HEADER_AMBIGUOUS.format(reason=head.ambiguity))
        if head.too_long:
            return Reject(replies.HEADER_TOO_LONG.format(
                limit=str(headsection.HEADER_SECTION_LIMIT)))
        for field, address in head.originators:
            try:
                mailbox, _ = parse_mail_from(f"FROM:<{address}>".encode("utf-8"))
            except Refusal:
                mailbox = None
            if not owns_address(user, mailbox, facts.directory):
                return Reject(
                    replies.FROM_NOT_OWNED.format(field=field, address=address, user=user))
        return ACCEPT


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@implementer(IModifier)
class MissingFields:
    """Adds the ``Message-ID:`` a message lacks (readers and loop detection want one) and,
    for a submitted message, the ``Date:`` the client forgot (RFC 6409 §8.2)."""

    name = "missing_fields"

    def __init__(self, now: Callable[[], datetime.datetime] = _utc_now) -> None:
        self.now = now

    def modify(self, draft: Draft) -> Draft:
        added = b""
        if not draft.head.has_message_id:
            msgid = headers.make_message_id(draft.queue_id, draft.hostname)
            added += headers.message_id_header(msgid)
        if draft.authenticated_as is not None and not draft.head.has_date:
            added += headers.date_header(self.now())
        return replace(draft, prefix=draft.prefix + added) if added else draft


@implementer(IModifier)
class SenderRewriting:
    """SRS: the queued copy of a message whose envelope sender is in a domain not ours is
    sent from an address in our SRS domain, so that the receiver's SPF check of the sender
    passes (we are not the sender's server; a forwarded message would fail it) and bounces
    come back to us, to be reversed and returned (postsrsd's rule: every such sender)."""

    name = "sender_rewriting"

    def modify(self, draft: Draft) -> Draft:
        directory, sender = draft.directory, draft.sender
        if directory is None or directory.srs is None or sender is None:
            return draft
        if directory.is_local_domain(sender.rpartition("@")[2]):
            return draft
        try:
            return replace(draft, queue_sender=directory.srs.forward(sender))
        except SRSError:
            return draft  # a quoted local part: sent as it is (SPF may fail at the receiver)


def builtin_pipeline(
    config: Config, dkim: Callable[[], SigningKeys | None] | None = None,
    greylist: Callable[[], Greylist | None] | None = None,
    send_quota: Callable[[], SendQuota | None] | None = None,
) -> Pipeline:
    """The checks and modifiers a server with ``config`` runs, in their order; with
    ``dkim`` (the current signing keys), DKIM signing and ARC sealing last, over the
    finished message."""
    checks: list[ICheck] = [
        SenderOwnership(), RelayAccess(), SrsAddress(), LocalRecipient(),
        HopLimit(config.smtp.max_received_headers),
    ]
    if config.submission.check_from_header:
        checks.append(HeaderOwnership())
    if config.dnsbl.zones:
        checks.append(Dnsbl(config.dnsbl.threshold))
    if config.greylist.enabled and greylist is not None:
        # After the recipient checks: an unknown recipient is refused, not greylisted.
        checks.append(Greylisting(greylist, config.greylist.delay, config.greylist.auto_allow,
                                  config.greylist.spf_pass_domains))
    if send_quota is not None:
        # After the other MAIL and RCPT checks: a recipient they refuse is no use of the quota.
        checks += [MessagesPerDay(send_quota), RecipientsPerHour(send_quota)]
    checks += auth_checks(config)
    checks += rspamd_checks(config)  # last: its fields below Authentication-Results:
    modifiers: list[IModifier] = [MissingFields(), SenderRewriting()]
    if dkim is not None:
        modifiers.append(DkimSign(dkim))  # it signs the message as it will be stored
        modifiers.append(ArcSeal(dkim))  # last: it seals the queued copy, signatures and all
    return Pipeline(checks, modifiers)
