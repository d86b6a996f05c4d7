"""
Relay and recipient rules: may this client send to this recipient, and where does it go?

One function decides each ``RCPT TO``, so that the rules that keep the server from being an
open relay are in one place and are tested without a network.  Pure: the caller supplies the
parsed mailbox, the :class:`~mailsrv.routing.router.Directory` and whether the client may relay
(a trusted network or, later, an authenticated session).
"""

from __future__ import annotations

from mailsrv import replies
from mailsrv.replies import Refusal, Reply
from mailsrv.routing.address import Mailbox, is_safe_local_part
from mailsrv.routing.router import Directory, LocalTarget, RemoteTarget, Target, UnknownRecipient
from mailsrv.routing.srs import SRSError

__all__ = [
    "Refusal", "is_disguised", "is_local", "local_refusal", "owns_address", "recipient_targets",
    "relay_refusal", "route",
]


def is_local(mailbox: Mailbox, directory: Directory) -> bool:
    """Whether the recipient's domain is one of ours (an address without one is local)."""
    return mailbox.domain == "" or directory.is_local_domain(mailbox.domain)


def is_disguised(mailbox: Mailbox) -> bool:
    """Disguised routing: the %-hack, bang paths, quoted '@', source routes, address literals."""
    return bool(mailbox.relay_tokens or mailbox.source_route or mailbox.is_address_literal)


def relay_refusal(mailbox: Mailbox, local: bool, may_relay: bool) -> Reply | None:
    """The relay rule: a client that may not relay sends only to our domains, undisguised.

    Disguised routing from a client that may not relay is refused whatever the domain: some
    downstream system might interpret it and forward the mail, which would make us an open
    relay by proxy.  A client that may relay is trusted to mean what it wrote.
    """
    if may_relay:
        return None
    if is_disguised(mailbox) or not local:
        return replies.RELAY_DENIED
    return None


def route(
    mailbox: Mailbox, directory: Directory, may_relay: bool
) -> tuple[Target, ...] | None:
    """Where a recipient goes: its local targets, the queue for a foreign one the client may
    relay to, or None (an unsafe or unknown local part, a foreign domain without relay)."""
    if is_local(mailbox, directory):
        try:
            returned = directory.srs_target(mailbox)
        except SRSError:
            return None  # refused as such by the srs_address check
        if returned is not None:
            return (returned,)  # a bounce to a sender we rewrote goes back to that sender
        if not is_safe_local_part(mailbox.local):
            return None  # never looked up: such names are unknown here
        try:
            return directory.resolve(mailbox)
        except UnknownRecipient:
            return None
    return (RemoteTarget(str(mailbox)),) if may_relay else None


def local_refusal(
    mailbox: Mailbox, targets: tuple[Target, ...] | None
) -> Reply | None:
    """The local-recipient rule: a safe local part (553 5.1.3) that names someone (550 5.1.1)."""
    if not is_safe_local_part(mailbox.local):
        return replies.MAILBOX_NOT_ALLOWED
    if targets is None:
        return replies.USER_UNKNOWN
    return None


def recipient_targets(
    mailbox: Mailbox, directory: Directory, may_relay: bool
) -> tuple[Target, ...]:
    """Decide one RCPT: the delivery targets, or raise :class:`Refusal` with the exact reply.

    The rules in the order the checks pipeline runs them (mailsrv.checks.builtin): the relay
    rule first, then, for our domains, the local-recipient rule.  A client that may relay
    sending to a local domain has the name simply looked up (disguised names are unknown
    there); a foreign one is queued as written.
    """
    local = is_local(mailbox, directory)
    refusal = relay_refusal(mailbox, local, may_relay)
    targets = route(mailbox, directory, may_relay) if refusal is None else None
    if refusal is None and local:
        refusal = local_refusal(mailbox, targets)
    if refusal is not None:
        raise Refusal(refusal)
    assert targets is not None
    return targets


def owns_address(login: str, address: Mailbox | None, directory: Directory) -> bool:
    """Whether the authenticated user ``login`` may send as ``address``.

    A user owns the addresses whose mail reaches their own mailbox: their address, its
    plus-addresses, and the aliases that deliver to them (so everyone on ``sales@`` may write
    as ``sales@``).  The null sender and disguised or foreign addresses belong to nobody.
    """
    if address is None or address.relay_tokens or address.source_route:
        return False
    local, _, domain = login.rpartition("@")
    if not address.domain or not directory.is_local_domain(address.domain):
        return False
    try:
        targets = directory.resolve(address)
    except UnknownRecipient:
        return False
    return LocalTarget(domain, local) in targets
