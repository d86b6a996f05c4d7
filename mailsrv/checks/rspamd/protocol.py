"""
rspamd's HTTP protocol (``POST /checkv2``), both ends of it as data: the request's header
fields from the envelope and the client, and the JSON reply read into a :class:`Scan`.  Pure.

The request (rspamd's doc/developers/protocol): ``From`` (the envelope sender; left out for
``<>``), one ``Rcpt`` per recipient, ``IP`` (the client's address), ``Helo``, ``Hostname``
(the client's verified reverse name, left out when there is none: rspamd then scores
RDNS_NONE), ``User`` (the authenticated user: rspamd's outbound rules, its ratelimits and
DKIM signing key on it), ``Queue-Id`` (in rspamd's log and X-Rspamd-Queue-Id), ``MTA-Name``
(our hostname, the authserv-id rspamd would write) and ``Password`` when configured (the
controller worker asks for it; the normal worker ignores it).  The body is the message as it
will be stored: our ``Received:`` field, then the spool file.

The reply: ``action`` (``no action``, ``greylist``, ``add header``, ``rewrite subject``,
``soft reject``, ``reject``), ``score``, ``required_score``, ``messages.smtp_message`` (the
text to give the client) and ``milter.add_headers`` / ``milter.remove_headers``: the fields
its milter_headers module asks to add (``{name: value}``, ``{name: {"value": v, "order": n}}``
or a list of those) and remove (``{name: n}``: 0 every instance, n > 0 the n-th, n < 0 the
n-th from the end).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACTIONS", "ProtocolError", "Scan", "ScanFailure", "parse_reply", "request_headers",
]

#: Every action rspamd may answer (rspamd's ``rspamd_action_from_str``).
ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")

#: Longest text taken from rspamd for an SMTP reply or a header field value.
MAX_TEXT = 900
#: Most fields taken from one reply (milter_headers adds about ten).
MAX_FIELDS = 50

_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}\Z")


class ProtocolError(Exception):
    """A reply that is not rspamd's /checkv2 JSON (or not one we can act on)."""


@dataclass(frozen=True)
class Scan:
    """What rspamd decided about one message."""

    action: str
    score: float
    required_score: float
    #: ``messages.smtp_message``: the text for the client's reply (None: none given).
    message: str | None = None
    #: The fields to add, each ``b"Name: value\\n"`` (folded lines kept), in rspamd's order.
    add_headers: tuple[bytes, ...] = ()
    #: The fields to remove: (lower-case name, instance: 0 all, n the n-th, -n from the end).
    remove_headers: tuple[tuple[str, int], ...] = ()

    def summary(self) -> str:
        """For the log line: ``action="add header" score=7.20/15.00``."""
        return f'action="{self.action}" score={self.score:.2f}/{self.required_score:.2f}'


@dataclass(frozen=True)
class ScanFailure:
    """No usable answer (down, too slow, an HTTP error, a reply we cannot read)."""

    reason: str


def _clean(value: str) -> str:
    """A header value for the request: no line ends (they would split the field)."""
    return " ".join(value.split())


def request_headers(
    *, sender: str | None, recipients: list[str], ip: str, helo: str | None,
    reverse_name: str | None, user: str | None, queue_id: str, hostname: str,
    password: str | None = None,
) -> dict[bytes, list[bytes]]:
    """The request's header fields (each name with its values, ``Rcpt`` once per
    recipient), UTF-8 (an SMTPUTF8 address is sent as it came)."""
    fields: dict[str, list[str]] = {}
    if sender:
        fields["From"] = [sender]
    if recipients:
        fields["Rcpt"] = list(recipients)
    fields["IP"] = [ip]
    if helo:
        fields["Helo"] = [helo]
    if reverse_name:
        fields["Hostname"] = [reverse_name]
    if user:
        fields["User"] = [user]
    fields["Queue-Id"] = [queue_id]
    fields["MTA-Name"] = [hostname]
    if password is not None:
        fields["Password"] = [password]
    return {name.encode("ascii"): [_clean(v).encode("utf-8") for v in values]
            for name, values in fields.items()}


def _number(reply: dict[str, Any], key: str) -> float:
    value = reply.get(key)
    if type(value) not in (int, float):
        raise ProtocolError(f"{key} is not a number: {value!r}")
    return float(value)


def _text(value: Any) -> str | None:
    """Printable ASCII (an SMTP reply's) of at most MAX_TEXT characters, else None."""
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())[:MAX_TEXT]
    return text if text and text.isascii() and text.isprintable() else None


def header_field(name: str, value: str) -> bytes | None:
    """``b"Name: value\\n"`` as stored (LF line ends, folded lines kept when they start with
    white space), None for a name or value we will not write (CR, NUL, other controls, an
    unfolded line break, over MAX_TEXT)."""
    if not _FIELD_NAME.match(name) or len(value) > 16 * MAX_TEXT:
        return None
    lines = value.replace("\r\n", "\n").split("\n")
    if any(not line.isprintable() for line in (line.replace("\t", " ") for line in lines)):
        return None
    if any(line[:1] not in (" ", "\t") for line in lines[1:]):
        return None
    return f"{name}: {lines[0]}".rstrip(" ").encode("utf-8") + b"".join(
        b"\n" + line.encode("utf-8") for line in lines[1:]) + b"\n"


def _add_headers(milter: dict[str, Any]) -> tuple[bytes, ...]:
    found: list[bytes] = []
    add = milter.get("add_headers") or {}
    if not isinstance(add, dict):
        raise ProtocolError(f"milter.add_headers is not an object: {add!r}")
    for name, spec in add.items():
        for one in spec if isinstance(spec, list) else [spec]:
            value = one.get("value") if isinstance(one, dict) else one
            if not isinstance(value, str):
                raise ProtocolError(f"milter.add_headers.{name}: no text value: {one!r}")
            field = header_field(name, value)
            if field is None:
                raise ProtocolError(f"milter.add_headers.{name}: not a header field we write")
            found.append(field)
    if len(found) > MAX_FIELDS:
        raise ProtocolError(f"milter.add_headers: {len(found)} fields, at most {MAX_FIELDS}")
    return tuple(found)


def _remove_headers(milter: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    remove = milter.get("remove_headers") or {}
    if not isinstance(remove, dict):
        raise ProtocolError(f"milter.remove_headers is not an object: {remove!r}")
    found = []
    for name, instance in remove.items():
        if not _FIELD_NAME.match(name) or type(instance) is not int:
            raise ProtocolError(f"milter.remove_headers: {name!r}: {instance!r}")
        found.append((name.lower(), instance))
    if len(found) > MAX_FIELDS:
        raise ProtocolError(f"milter.remove_headers: {len(found)} fields, at most {MAX_FIELDS}")
    return tuple(found)


def parse_reply(body: bytes) -> Scan:
    """The /checkv2 reply read; ProtocolError for anything else (not JSON, no known action,
    no score, a milter block we cannot apply)."""
    try:
        reply = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(reply, dict):
        raise ProtocolError("not a JSON object")
    action = reply.get("action")
    if action not in ACTIONS:
        raise ProtocolError(f"unknown action {action!r}")
    messages = reply.get("messages")
    message = _text(messages.get("smtp_message")) if isinstance(messages, dict) else None
    milter = reply.get("milter") or {}
    if not isinstance(milter, dict):
        raise ProtocolError(f"milter is not an object: {milter!r}")
    return Scan(
        action=action, score=_number(reply, "score"),
        required_score=_number(reply, "required_score"), message=message,
        add_headers=_add_headers(milter), remove_headers=_remove_headers(milter),
    )
