"""
Relay and recipient rules: may this client send to this recipient, and where does it go?

One function decides each ``RCPT TO``, so that the rules that keep the server from being an
open relay are in one place and are tested without a network.  Pure: the caller supplies the
parsed mailbox, the :class:`~mailsrv.router.Directory` and whether the client may relay
(a trusted network or, later, an authenticated session).
"""

from __future__ import annotations

from mailsrv import replies
from mailsrv.address import Mailbox, is_safe_local_part
from mailsrv.replies import Refusal
from mailsrv.router import Directory, LocalTarget, RemoteTarget, Target, UnknownRecipient

__all__ = ["Refusal", "recipient_targets", "owns_address"]


def recipient_targets(
    mailbox: Mailbox, directory: Directory, may_relay: bool
) -> tuple[Target, ...]:
    """Decide one RCPT: the delivery targets, or raise :class:`Refusal` with the exact reply.

    Disguised routing (the %-hack, bang paths, quoted '@', source routes, address literals)
    from a client that may not relay is refused whatever the domain: some downstream system
    might interpret it and forward the mail, which would make us an open relay by proxy.  A
    client that may relay is trusted to mean what it wrote: a local domain is simply looked up
    (such names are unknown there), a foreign one is queued as written.
    """
    disguised = mailbox.relay_tokens or mailbox.source_route or mailbox.is_address_literal
    if disguised and not may_relay:
        raise Refusal(replies.RELAY_DENIED)
    if mailbox.domain == "" or directory.is_local_domain(mailbox.domain):
        if not is_safe_local_part(mailbox.local):
            raise Refusal(replies.MAILBOX_NOT_ALLOWED)
        try:
            return directory.resolve(mailbox)
        except UnknownRecipient:
            raise Refusal(replies.USER_UNKNOWN) from None
    if may_relay:
        return (RemoteTarget(str(mailbox)),)
    raise Refusal(replies.RELAY_DENIED)


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
