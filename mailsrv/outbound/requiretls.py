"""
REQUIRETLS on the way out (RFC 8689 §4.2.1), the verdict for one message at one host: pure.

A message that came with ``MAIL FROM:<...> REQUIRETLS`` goes only over TLS whose certificate
was verified for the MX host name (mailsrv.outbound.mtasts.tlscheck; an MTA-STS ``enforce``
policy or ``relay.tls = "verify"`` would have refused anything less anyway) and only to a
server that offers REQUIRETLS, which is then passed on.  A host that falls short is not sent
the message; when none of the destination's hosts will do, the message is bounced with the
refusal (mailsrv.outbound.destination).
"""

from __future__ import annotations

from typing import Any

from mailsrv import replies
from mailsrv.replies import Reply

__all__ = ["requiretls_refusal", "tls_required"]


def tls_required(requiretls: bool, head: bytes) -> str | None:
    """The queue's ``tls_required`` for a message (mailsrv.storage.envelope): ``"yes"`` when
    MAIL had REQUIRETLS, else ``"no"`` when its header section (``head``) has the field
    ``TLS-Required: No`` (RFC 8689 §5; the parameter wins over the field), else None."""
    if requiretls:
        return "yes"
    if b"tls-required" not in head.lower():
        return None  # nearly every message: no need to unfold its header section
    unfolded = head.replace(b"\r\n", b"\n").replace(b"\n ", b" ").replace(b"\n\t", b" ")
    for line in unfolded.split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"tls-required" and value.strip().lower() == b"no":
            return "no"
    return None


def requiretls_refusal(check: Any, tls: bool, offered: bool, peer: str) -> Reply | None:
    """None when a REQUIRETLS message may go to this host, else why not.

    ``check``: the session's HostCheck (None: nothing judged the certificate), ``tls``: the
    session is over TLS, ``offered``: the server offered REQUIRETLS."""
    if not tls:
        return replies.REQUIRETLS_UNVERIFIED.format(peer=peer, reason="no TLS")
    if check is None or not check.verified:
        reason = (check.result if check is not None else None) or "certificate not verified"
        return replies.REQUIRETLS_UNVERIFIED.format(peer=peer, reason=reason)
    if not offered:
        return replies.REQUIRETLS_NOT_OFFERED.format(peer=peer)
    return None
