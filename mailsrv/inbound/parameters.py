"""
The MAIL FROM parameters this server implements: ``SIZE=`` (RFC 1870), ``BODY=`` (RFC 6152)
and ``SMTPUTF8`` (RFC 6531, no value), each only after EHLO; any other is refused (pure).
"""

from __future__ import annotations

from mailsrv import replies
from mailsrv.replies import Refusal

__all__ = ["check_mail_parameters"]


def check_mail_parameters(params: dict[str, str | None], esmtp: bool, max_size: int) -> None:
    """Raise Refusal with the reply for the first parameter that cannot be accepted."""
    for name, value in params.items():
        if not esmtp:
            raise Refusal(replies.PARAMETER_NEEDS_EHLO.format(name=name))
        if name == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise Refusal(replies.BAD_PARAMETER_VALUE.format(name=name))
            if int(value) > max_size:
                raise Refusal(replies.SIZE_EXCEEDS_LIMIT)
        elif name == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise Refusal(replies.BAD_PARAMETER_VALUE.format(name=name))
        elif name == "SMTPUTF8":
            if value is not None:
                raise Refusal(replies.BAD_PARAMETER_VALUE.format(name=name))
        else:
            raise Refusal(replies.UNSUPPORTED_PARAMETER.format(name=name))
