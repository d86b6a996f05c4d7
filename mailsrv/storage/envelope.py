"""
A queued message's envelope and per-recipient state, and its on-disk JSON form (pure).

The envelope is the one file an administrator reads to know where a message stands, so it is
plain indented JSON with every recipient's status, attempts, next try and last error.  Decoding
checks every field: a file that does not decode is corrupt and is moved aside by the queue
loader, never half-trusted.

Envelope, version 1::

    {"version": 1, "id": "...", "created": 1795381621.5, "sender": "a@b" or "",
     "received_from": "client.example[192.0.2.7]", "prefix": "Received: ...\\n...",
     "warned": false, ("double_bounce": true,)
     "recipients": [{"address": "...", "status": "queued", "attempts": 0,
                     "last_error": null, "next_attempt": 1795381621.5,
                     "last_attempt": null, "remote_mta": null}]}

``prefix`` holds the trace headers to send before the body (always ASCII).  ``status`` is
``queued`` (still to be delivered), ``sent`` or ``bounced``.  ``warned`` records that a delay
warning went out, so that only one does.  ``double_bounce`` marks the notice the relayer
sends the postmaster when a bounce (a message from ``<>``) cannot be delivered: if that notice
fails too, it is only logged, so bounces never loop (written only when true).
``no_bounce`` (written only when set) says why this message's failures are logged and never
reported to its sender: mail we forward whose sender failed SPF and DMARC, or that rspamd
judged spam, whose sender is most likely forged (a bounce would be backscatter).
The DSN parameters the client gave (RFC 3461, mailsrv.routing.dsn_params), each written only
when given: ``"ret": "FULL"|"HDRS"`` and ``"envid": "..."`` (decoded) on the message,
``"notify": ["SUCCESS", "FAILURE", "DELAY"] or ["NEVER"]`` and ``"orcpt": "rfc822;..."``
(decoded) on a recipient.
``smtputf8`` (written only when true) says the message came with SMTPUTF8 (RFC 6531): it is
relayed with that keyword, or, to a server without it, bounced when its addresses or header
fields are UTF-8 (mailsrv.outbound.utf8).
``tls_required`` (written only when set, RFC 8689): ``"yes"`` for a message that came with
``MAIL FROM:<...> REQUIRETLS`` (relayed only over verified TLS, with REQUIRETLS), ``"no"``
for one with the header ``TLS-Required: No`` (no TLS policy of ours applies to it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mailsrv.routing.dsn_params import NOTIFY_KEYWORDS, MailDSN, RecipientDSN

__all__ = [
    "ENVELOPE_VERSION",
    "QUEUED",
    "SENT",
    "BOUNCED",
    "QueuedRecipient",
    "QueuedMessage",
    "new_message",
    "encode",
    "encode_line",
    "decode",
]

ENVELOPE_VERSION = 1
QUEUED, SENT, BOUNCED = "queued", "sent", "bounced"
_STATUSES = (QUEUED, SENT, BOUNCED)


@dataclass(frozen=True)
class QueuedRecipient:
    """One recipient of a queued message and where its delivery stands."""

    address: str
    status: str = QUEUED
    attempts: int = 0
    last_error: str | None = None
    next_attempt: float = 0.0
    last_attempt: float | None = None
    remote_mta: str | None = None
    notify: tuple[str, ...] | None = None  # NOTIFY= (RFC 3461); None: not given
    orcpt: str | None = None  # ORCPT= as "type;address", decoded

    @property
    def domain(self) -> str:
        """The destination domain (the part after the last '@'), lower-case."""
        return self.address.rpartition("@")[2].lower()

    def wants(self, kind: str) -> bool:
        """Whether a report of ``kind`` (SUCCESS, FAILURE, DELAY) is owed for this recipient:
        as NOTIFY says, or without NOTIFY our default, failures and delays (RFC 3461 §4.1)."""
        return kind in (self.notify if self.notify is not None else ("FAILURE", "DELAY"))


@dataclass(frozen=True)
class QueuedMessage:
    """A message in the outbound queue.  Immutable: a state change is a new value."""

    id: str
    created: float
    sender: str  # "" for the null sender <>
    received_from: str
    prefix: str
    recipients: tuple[QueuedRecipient, ...]
    warned: bool = False
    double_bounce: bool = False  # a postmaster notice about a failed bounce: never notified on
    no_bounce: str | None = None  # why a failure is only logged (a likely forged sender)
    ret: str | None = None  # RET= (RFC 3461): "FULL" or "HDRS"; None: not given
    envid: str | None = None  # ENVID=, decoded
    smtputf8: bool = False  # came with SMTPUTF8: UTF-8 addresses or header fields (RFC 6531)
    tls_required: str | None = None  # RFC 8689: "yes" (REQUIRETLS), "no" (TLS-Required: No)

    @property
    def pending(self) -> tuple[QueuedRecipient, ...]:
        return tuple(r for r in self.recipients if r.status == QUEUED)

    @property
    def done(self) -> bool:
        """Every recipient delivered or bounced: the message can leave the queue."""
        return not self.pending

    def update(self, changed: dict[str, QueuedRecipient]) -> "QueuedMessage":
        """A copy with the recipients named in ``changed`` (by address) replaced."""
        return replace(
            self, recipients=tuple(changed.get(r.address, r) for r in self.recipients)
        )


def new_message(
    queue_id: str,
    *,
    sender: str | None,
    recipients: Sequence[str],
    prefix: bytes,
    created: float,
    received_from: str,
    double_bounce: bool = False,
    no_bounce: str | None = None,
    dsn: MailDSN | None = None,
    recipient_dsn: Mapping[str, RecipientDSN] | None = None,
    smtputf8: bool = False,
    tls_required: str | None = None,
) -> QueuedMessage:
    """A fresh envelope, every recipient due now; ValueError for anything unstorable.
    ``dsn`` and ``recipient_dsn`` (by address) are the client's DSN parameters."""
    try:
        prefix_text = prefix.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"queue {queue_id}: the prefix is not ASCII ({exc})") from None
    if isinstance(recipients, str) or not recipients:
        raise ValueError(f"queue {queue_id}: at least one recipient address is required")
    for address in recipients:
        if not isinstance(address, str) or not address:
            raise ValueError(f"queue {queue_id}: bad recipient address {address!r}")
    created = float(created)
    return QueuedMessage(
        id=queue_id,
        created=created,
        sender=sender or "",
        received_from=received_from,
        prefix=prefix_text,
        recipients=tuple(_queued(a, created, (recipient_dsn or {}).get(a)) for a in recipients),
        double_bounce=double_bounce,
        no_bounce=no_bounce or None,
        ret=dsn.ret if dsn else None,
        envid=dsn.envid if dsn else None,
        smtputf8=smtputf8,
        tls_required=_tls_required(tls_required),
    )


def _tls_required(value: object) -> str | None:
    if value not in (None, "yes", "no"):
        raise ValueError(f"bad tls_required {value!r}")
    return value  # type: ignore[return-value]


def _queued(address: str, created: float, dsn: RecipientDSN | None) -> QueuedRecipient:
    if dsn is None:
        return QueuedRecipient(address, next_attempt=created)
    return QueuedRecipient(address, next_attempt=created, notify=dsn.notify, orcpt=dsn.orcpt)


def encode(message: QueuedMessage) -> bytes:
    """The envelope file's content; ValueError when it cannot be stored as text."""
    try:
        # Non-ASCII addresses stay readable; a lone surrogate fails here, before any I/O.
        text = json.dumps(_fields(message), indent=1, ensure_ascii=False)
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"queue {message.id}: envelope is not valid text ({exc})") from None


def encode_line(message: QueuedMessage) -> str:
    """The same envelope on one line of ASCII (non-ASCII and control characters escaped), for
    a channel that carries words of ASCII: ``decode`` reads it as it reads the file.  Compact,
    so that json's C encoder makes it (the file's indentation takes the pure-Python one)."""
    return json.dumps(_fields(message), separators=(",", ":"))


def _fields(message: QueuedMessage) -> dict[str, Any]:
    recipients = []
    for r in message.recipients:
        entry: dict[str, Any] = {
            "address": r.address,
            "status": r.status,
            "attempts": r.attempts,
            "last_error": r.last_error,
            "next_attempt": r.next_attempt,
            "last_attempt": r.last_attempt,
            "remote_mta": r.remote_mta,
        }
        if r.notify is not None:  # the DSN fields only when given
            entry["notify"] = list(r.notify)
        if r.orcpt:
            entry["orcpt"] = r.orcpt
        recipients.append(entry)
    data: dict[str, Any] = {
        "version": ENVELOPE_VERSION,
        "id": message.id,
        "created": message.created,
        "sender": message.sender,
        "received_from": message.received_from,
        "prefix": message.prefix,
        "warned": message.warned,
        "recipients": recipients,
    }
    if message.double_bounce:
        data["double_bounce"] = True  # only then: other envelopes are as they always were
    if message.no_bounce:
        data["no_bounce"] = message.no_bounce
    if message.ret:
        data["ret"] = message.ret
    if message.envid:
        data["envid"] = message.envid
    if message.smtputf8:
        data["smtputf8"] = True
    if message.tls_required:
        data["tls_required"] = message.tls_required
    return data


class _Corrupt(ValueError):
    pass


def _get(data: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise _Corrupt(f"{where}no {key!r}")
    value = data[key]
    # bool is an int: refuse true/false where a number belongs.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise _Corrupt(f"{where}{key!r} is {value!r}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


_NUMBER = (int, float)
_OPTIONAL_TEXT = (str, type(None))


def _optional_text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if not isinstance(value, _OPTIONAL_TEXT):
        raise _Corrupt(f"{key!r} is {value!r}")
    return value or None


def _printable(data: dict[str, Any], key: str, where: str = "") -> str | None:
    """An optional DSN text (ENVID, ORCPT): printable ASCII, as the parser admitted it."""
    value = data.get(key)
    if value is not None and (not isinstance(value, str) or not value or not value.isascii()
                              or not value.isprintable()):
        raise _Corrupt(f"{where}{key!r} is {value!r}")
    return value


def _notify(data: dict[str, Any], where: str) -> tuple[str, ...] | None:
    value = data.get("notify")
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or (value != ["NEVER"] and value != [k for k in NOTIFY_KEYWORDS if k in value])):
        raise _Corrupt(f"{where}'notify' is {value!r}")
    return tuple(value)


def _recipient(data: Any, index: int) -> QueuedRecipient:
    where = f"recipients[{index}]: "
    if not isinstance(data, dict):
        raise _Corrupt(f"{where}not an object")
    address = _get(data, "address", str, where)
    status = _get(data, "status", str, where)
    if not address or status not in _STATUSES:
        raise _Corrupt(f"{where}bad address or status")
    last_attempt = data.get("last_attempt")
    if last_attempt is not None and (
        not isinstance(last_attempt, _NUMBER) or isinstance(last_attempt, bool)
    ):
        raise _Corrupt(f"{where}'last_attempt' is {last_attempt!r}")
    remote_mta = data.get("remote_mta")
    if not isinstance(remote_mta, _OPTIONAL_TEXT):
        raise _Corrupt(f"{where}'remote_mta' is {remote_mta!r}")
    return QueuedRecipient(
        address=address,
        status=status,
        attempts=_get(data, "attempts", int, where),
        last_error=_get(data, "last_error", _OPTIONAL_TEXT, where),
        next_attempt=float(_get(data, "next_attempt", _NUMBER, where)),
        last_attempt=None if last_attempt is None else float(last_attempt),
        remote_mta=remote_mta,
        notify=_notify(data, where),
        orcpt=_printable(data, "orcpt", where),
    )


def _ret(data: dict[str, Any]) -> str | None:
    value = data.get("ret")
    if value not in (None, "FULL", "HDRS"):
        raise _Corrupt(f"'ret' is {value!r}")
    return value


def decode(raw: bytes | str) -> QueuedMessage:
    """Parse an envelope (a file's bytes, or ``encode_line``'s text); ValueError saying what is
    wrong when it is corrupt."""
    try:
        data = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt queue envelope: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("corrupt queue envelope: not a JSON object")
    if data.get("version") != ENVELOPE_VERSION:
        raise ValueError(
            f"unsupported queue envelope version {data.get('version')!r}"
            f" (expected {ENVELOPE_VERSION})"
        )
    try:
        recipients = _get(data, "recipients", list, "")
        if not recipients:
            raise _Corrupt("no recipients")
        message = QueuedMessage(
            id=_get(data, "id", str, ""),
            created=float(_get(data, "created", _NUMBER, "")),
            sender=_get(data, "sender", str, ""),
            received_from=data.get("received_from") or "",
            prefix=_get(data, "prefix", str, ""),
            warned=bool(data.get("warned", False)),
            double_bounce=data.get("double_bounce", False) is True,
            no_bounce=_optional_text(data, "no_bounce"),
            ret=_ret(data),
            envid=_printable(data, "envid"),
            smtputf8=data.get("smtputf8", False) is True,
            tls_required=_decoded_tls_required(data),
            recipients=tuple(_recipient(r, i) for i, r in enumerate(recipients)),
        )
    except _Corrupt as exc:
        raise ValueError(f"corrupt queue envelope: {exc}") from None
    if not message.prefix.isascii():
        raise ValueError("corrupt queue envelope: the prefix is not ASCII")
    return message


def _decoded_tls_required(data: dict) -> str | None:
    value = data.get("tls_required")
    if value not in (None, "yes", "no"):
        raise _Corrupt(f"bad tls_required {value!r}")
    return value
