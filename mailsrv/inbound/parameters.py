"""
The MAIL FROM parameters this server implements: ``SIZE=`` (RFC 1870), ``BODY=`` (RFC 6152),
``BINARYMIME`` among them (RFC 3030), ``SMTPUTF8`` (RFC 6531, no value) and ``REQUIRETLS`` (RFC
8689, no value, only over TLS: ``530 5.7.10`` otherwise), each only after EHLO; any other is
refused (pure).
The DSN parameters (RFC 3461) of MAIL and RCPT are parsed by mailsrv.routing.dsn_params;
this checks they come after EHLO and where they belong.
"""

from __future__ import annotations

from typing import NamedTuple

from mailsrv import replies
from mailsrv.replies import Refusal
from mailsrv.routing.address import Mailbox, parse_mail_from, parse_rcpt_to
from mailsrv.routing.dsn_params import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    MailDSN,
    RecipientDSN,
    parse_mail_dsn,
    parse_rcpt_dsn,
)

__all__ = [
    "MailCommand", "check_mail_parameters", "check_rcpt_parameters", "parse_mail", "parse_rcpt",
]

#: The values BODY= takes (RFC 6152, RFC 3030).
BODY_TYPES = ("7BIT", "8BITMIME", "BINARYMIME")


class MailCommand(NamedTuple):
    """An accepted MAIL FROM: what its transaction keeps."""

    sender: Mailbox | None  #: None for ``<>``
    dsn: MailDSN  #: RET and ENVID (RFC 3461)
    smtputf8: bool  #: UTF-8 paths allowed in this transaction (RFC 6531)
    requiretls: bool  #: relayed over verified TLS only (RFC 8689)
    binary: bool  #: BODY=BINARYMIME: the message comes with BDAT, any octets (RFC 3030)


def parse_mail(rest: bytes, esmtp: bool, max_size: int, tls: bool = False) -> MailCommand:
    """MAIL FROM's argument (``tls``: the session is over TLS); Refusal when refused."""
    sender, params = parse_mail_from(rest)
    dsn = check_mail_parameters(params, esmtp, max_size, tls=tls)
    body = (params.get("BODY") or "").upper()
    return MailCommand(sender, dsn, "SMTPUTF8" in params, "REQUIRETLS" in params,
                       body == "BINARYMIME")


def parse_rcpt(rest: bytes, smtputf8: bool, esmtp: bool) -> tuple[Mailbox, RecipientDSN]:
    """RCPT TO's argument: the recipient (UTF-8 only after SMTPUTF8) and its DSN parameters."""
    recipient, params = parse_rcpt_to(rest, smtputf8)
    return recipient, check_rcpt_parameters(params, esmtp)


def check_mail_parameters(
    params: dict[str, str | None], esmtp: bool, max_size: int, *, tls: bool = False,
) -> MailDSN:
    """Raise Refusal with the reply for the first parameter that cannot be accepted; the
    DSN parameters (RET, ENVID) of an accepted MAIL."""
    for name, value in params.items():
        if not esmtp:
            raise Refusal(replies.PARAMETER_NEEDS_EHLO.format(name=name))
        if name == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise Refusal(replies.BAD_PARAMETER_VALUE.format(name=name))
            if int(value) > max_size:
                raise Refusal(replies.SIZE_EXCEEDS_LIMIT)
        elif name == "BODY":
            if value is None or value.upper() not in BODY_TYPES:
                raise Refusal(replies.BAD_PARAMETER_VALUE.format(name=name))
        elif name == "SMTPUTF8":
            if value is not None:
                raise Refusal(replies.BAD_PARAMETER_VALUE.format(name=name))
        elif name == "REQUIRETLS":
            if value is not None:
                raise Refusal(replies.BAD_PARAMETER_VALUE.format(name=name))
            if not tls:
                raise Refusal(replies.REQUIRETLS_NEEDS_TLS)
        elif name not in MAIL_PARAMETERS:
            raise Refusal(replies.UNSUPPORTED_PARAMETER.format(name=name))
    return parse_mail_dsn(params)


def check_rcpt_parameters(params: dict[str, str | None], esmtp: bool) -> RecipientDSN:
    """RCPT's DSN parameters (NOTIFY, ORCPT), or Refusal for the first one refused."""
    for name in params:
        if not esmtp:
            raise Refusal(replies.PARAMETER_NEEDS_EHLO.format(name=name))
        if name not in RCPT_PARAMETERS:
            raise Refusal(replies.UNSUPPORTED_PARAMETER.format(name=name))
    return parse_rcpt_dsn(params)
