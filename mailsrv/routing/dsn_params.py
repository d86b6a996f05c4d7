"""
The DSN parameters of MAIL and RCPT (RFC 3461): ``RET=``, ``ENVID=``, ``NOTIFY=``, ``ORCPT=``.

Pure: no I/O.  They are parsed here, once, into what the queue stores and the reports honour
(``MailDSN``, ``RecipientDSN``), and turned back into parameters for a next hop that offers
DSN.  ENVID and ORCPT come as xtext (RFC 3461 §4): stored decoded, so that a report quotes
what the sender meant, and encoded again on the way out; a decoded value must be printable
ASCII, since it goes into a report's header-like fields.  Each malformed value gets
``501 5.5.4`` naming its parameter, as Postfix answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailsrv import replies
from mailsrv.replies import Refusal

__all__ = [
    "MAIL_PARAMETERS", "RCPT_PARAMETERS", "NOTIFY_KEYWORDS", "MailDSN", "RecipientDSN",
    "parse_mail_dsn", "parse_rcpt_dsn", "xtext_decode", "xtext_encode", "rcpt_arguments",
    "mail_arguments", "ENVID_MAX", "ORCPT_MAX",
]

MAIL_PARAMETERS = ("RET", "ENVID")
RCPT_PARAMETERS = ("NOTIFY", "ORCPT")
#: In the order they are stored and sent; NEVER stands alone.
NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")
#: RFC 3461 §4.4: an ENVID value is at most 100 characters (as sent, xtext).
ENVID_MAX = 100
#: RFC 3461 §4.2: the whole ORCPT value is at most 500 characters.
ORCPT_MAX = 500

# xtext (RFC 3461 §4): "+" and two upper-case hex digits, or any of "!" to "~" but "+", "=".
_XTEXT = re.compile(r"(?:\+[0-9A-F]{2}|[\x21-\x2a\x2c-\x3c\x3e-\x7e])*\Z")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+\Z")  # an atom
_PRINTABLE = re.compile(r"[\x20-\x7e]*\Z")


@dataclass(frozen=True)
class MailDSN:
    """MAIL's DSN parameters: which part of the message a failure report returns (None:
    ours to choose, the headers), and the sender's envelope id, decoded."""

    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None


@dataclass(frozen=True)
class RecipientDSN:
    """RCPT's DSN parameters: when the sender wants a report (None: NOTIFY not given, our
    default, failures and delays), and the original recipient as ``type;address``, decoded."""

    notify: tuple[str, ...] | None = None  # ("NEVER",) or some of NOTIFY_KEYWORDS, in order
    orcpt: str | None = None


def xtext_decode(value: str) -> str | None:
    """The text ``value`` encodes, None when it is not xtext."""
    if not _XTEXT.match(value):
        return None
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(text: str) -> str:
    """``text`` as xtext: "+", "=" and anything outside "!" to "~" as ``+XX``."""
    return "".join(c if "\x21" <= c <= "\x7e" and c not in "+=" else f"+{ord(c):02X}"
                   for c in text)


def _bad(name: str) -> Refusal:
    return Refusal(replies.BAD_PARAMETER_VALUE.format(name=name))


def parse_mail_dsn(params: dict[str, str | None]) -> MailDSN:
    """RET= and ENVID= of a MAIL command's parameters (others are not looked at)."""
    ret = params.get("RET")
    if "RET" in params:
        if ret is None or ret.upper() not in ("FULL", "HDRS"):
            raise _bad("RET")
        ret = ret.upper()
    envid = None
    if "ENVID" in params:
        raw = params["ENVID"]
        if raw is None or len(raw) > ENVID_MAX:
            raise _bad("ENVID")
        envid = xtext_decode(raw)
        if not envid or not _PRINTABLE.match(envid):
            raise _bad("ENVID")
    return MailDSN(ret=ret, envid=envid)


def parse_rcpt_dsn(params: dict[str, str | None]) -> RecipientDSN:
    """NOTIFY= and ORCPT= of a RCPT command's parameters (others are not looked at)."""
    notify = None
    if "NOTIFY" in params:
        raw = params["NOTIFY"]
        words = {w.upper() for w in raw.split(",")} if raw else {""}
        if words == {"NEVER"}:
            notify = ("NEVER",)
        elif not words <= set(NOTIFY_KEYWORDS):
            raise _bad("NOTIFY")  # an unknown keyword, an empty one, or NEVER with others
        else:
            notify = tuple(k for k in NOTIFY_KEYWORDS if k in words)
    orcpt = None
    if "ORCPT" in params:
        raw = params["ORCPT"]
        kind, semicolon, encoded = (raw or "").partition(";")
        address = xtext_decode(encoded) if semicolon else None
        if (raw is None or len(raw) > ORCPT_MAX or not _ADDR_TYPE.match(kind) or not address
                or not _PRINTABLE.match(address)):
            raise _bad("ORCPT")
        orcpt = f"{kind};{address}"
    return RecipientDSN(notify=notify, orcpt=orcpt)


def mail_arguments(ret: str | None, envid: str | None) -> bytes:
    """`` RET=... ENVID=...`` for a next hop that offers DSN (empty when neither is set)."""
    out = f" RET={ret}" if ret else ""
    if envid:
        out += f" ENVID={xtext_encode(envid)}"
    return out.encode("ascii")


def rcpt_arguments(notify: tuple[str, ...] | None, orcpt: str | None) -> bytes:
    """`` NOTIFY=... ORCPT=type;xtext`` for a next hop that offers DSN."""
    out = f" NOTIFY={','.join(notify)}" if notify else ""
    if orcpt:
        kind, _, address = orcpt.partition(";")
        out += f" ORCPT={kind};{xtext_encode(address)}"
    return out.encode("ascii")
