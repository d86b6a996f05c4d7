"""
PIPELINING (RFC 2920) for the outbound SMTP session: to a server that offers it, MAIL, every
RCPT and DATA go out in one write and the replies are read in order.

Why: a relay session carries dozens of messages, and command by command each one waited for
a reply to MAIL, to every RCPT, to DATA and to the data; now it waits for the group's replies
(which a pipelining server sends together) and for the data's. Postfix's client does the same.

The rules of RFC 2920 section 3.1 kept here:

- every reply of the group is read, in order, whatever the earlier ones said: after a refused
  MAIL the replies to the RCPTs and to DATA still come (and mean nothing);
- DATA may be accepted (``354``) although MAIL or every RCPT was refused: the client then sends
  a lone ``.``, and the transaction ends with the refusals;
- with CHUNKING the group ends with the RCPTs: BDAT goes once they are answered, so that no
  chunk is sent for a transaction whose recipients were all refused;
- a ``421`` ends the session wherever it comes: no further reply will.

A mixin of RelayClient (mailsrv.outbound.smtpclient), whose transaction state it drives as the
command-by-command path does.
"""

from __future__ import annotations

import collections
from typing import Any

from mailsrv.replies import Reply

__all__ = ["Pipelining"]

_SUCCESS = range(200, 300)
_ANY = range(0, 1000)
_MAIL, _RCPT, _DATA = "mail", "rcpt", "data"


class Pipelining:
    """Mixed into RelayClient (which has the attributes and methods named below)."""

    _current: Any
    _extensions: dict[bytes, Any]
    successAddresses: list[str]
    toAddressesResult: list[tuple[str, int, bytes]]
    transport: Any

    def _send_group(self, mail: bytes) -> None:
        """Send *mail* (the MAIL command), the RCPTs and, unless the data goes as BDAT
        chunks, DATA; the replies come to ``_group_reply``."""
        addresses = self.getMailTo()  # type: ignore[attr-defined]
        lines = [mail] + [self._rcpt_line(a) for a in addresses]  # type: ignore[attr-defined]
        due = [(_MAIL, "")] + [(_RCPT, a) for a in addresses]
        if b"CHUNKING" not in self._extensions:
            lines.append(b"DATA")
            due.append((_DATA, ""))
        self._due = collections.deque(due)
        self._mail_refused: tuple[int, bytes] | None = None
        self.toAddressesResult, self.successAddresses = [], []
        self._expected = _ANY
        self._okresponse = self._failresponse = self._group_reply
        self.transport.write(b"\r\n".join(lines) + b"\r\n")

    def _group_reply(self, code: int, resp: bytes) -> None:
        kind, address = self._due.popleft()
        if code == 421:  # the server is closing: this transaction ends, and the session
            self._due.clear()
            self._failresponse = self.smtpTransferFailed  # type: ignore[attr-defined]
            self.smtpState_msgSent(code, resp)  # type: ignore[attr-defined]
            return
        if kind == _MAIL and code not in _SUCCESS:
            self._mail_refused = (code, resp)
        elif kind == _RCPT and self._mail_refused is None:
            self.toAddressesResult.append((address, code, resp))
            if code in _SUCCESS:
                self.successAddresses.append(address)
            else:
                self._current.results[address] = Reply.from_wire(code, resp)
        if self._due:
            return
        self._failresponse = self.smtpTransferFailed  # type: ignore[attr-defined]
        refused = self._mail_refused
        if kind != _DATA:  # CHUNKING: BDAT, or the refusals, as command by command
            if refused is not None:
                self.smtpState_msgSent(*refused)  # type: ignore[attr-defined]
            else:
                self._recipients_answered(code, resp)  # type: ignore[attr-defined]
        elif code != 354:
            self.smtpState_msgSent(*(refused or (code, resp)))  # type: ignore[attr-defined]
        elif refused is None and self.successAddresses:
            self.smtpState_data(code, resp)  # type: ignore[attr-defined]
        else:  # data accepted for no recipient: end it empty, keep the refusals
            self._expected = _ANY
            self._okresponse = self._failresponse = (
                lambda c, r: self._data_answered(*(refused or (c, r))))  # type: ignore
            self.sendLine(b".")  # type: ignore[attr-defined]
