"""
SMTPUTF8 on the way out (RFC 6531 section 3.4, pure): whether a message needs the keyword,
and what becomes of it at a server that does not offer it.

A message needs SMTPUTF8 when it came with it (its header fields may be UTF-8) or when its
sender or a recipient is a non-ASCII address (an alias may point at one).  To a server that
offers SMTPUTF8 it goes with ``MAIL FROM:<...> SMTPUTF8``.  To one that does not:

- a recipient with a non-ASCII address, or every recipient when the sender is one, is bounced
  with ``553 5.6.7`` (RFC 6531 section 3.5: non-ASCII addresses not permitted there);
- when the addresses are ASCII but the header section has UTF-8, the rest are bounced with
  ``554 5.6.9``: a downgrade (RFC 6857) rewrites addresses and fields, which would break
  signatures and can misdirect replies, so we do not do one (as Postfix does not);
- a message that came with SMTPUTF8 but is ASCII throughout goes without the keyword, as
  Postfix's ``smtputf8_autodetect`` does: there is nothing to downgrade.

Codes above 500 and below 600: the relayer bounces those recipients with these replies.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailsrv import replies
from mailsrv.replies import Reply

__all__ = ["needs_smtputf8", "utf8_verdicts"]


def needs_smtputf8(flag: bool, sender: str, recipients: Sequence[str]) -> bool:
    """Whether the transaction is one for SMTPUTF8: the queue's flag or a non-ASCII address."""
    return flag or not sender.isascii() or not all(r.isascii() for r in recipients)


def utf8_verdicts(
    flag: bool, sender: str, recipients: Sequence[str], offered: bool, head_utf8: bool,
    peer: str,
) -> tuple[bool, dict[str, Reply]]:
    """(send the SMTPUTF8 keyword, the recipients decided here with their reply).

    ``flag``: the queue's smtputf8; ``offered``: the server's EHLO named SMTPUTF8;
    ``head_utf8``: the header section (with our trace fields) has non-ASCII octets.
    """
    if not needs_smtputf8(flag, sender, recipients):
        return False, {}
    if offered:
        return True, {}
    decided: dict[str, Reply] = {}
    for address in recipients:
        if not sender.isascii() or not address.isascii():
            which = sender if not sender.isascii() else address
            decided[address] = replies.UTF8_ADDRESS_NOT_OFFERED.format(peer=peer, address=which)
        elif head_utf8:
            decided[address] = replies.UTF8_HEADER_NOT_OFFERED.format(peer=peer)
    return False, decided
