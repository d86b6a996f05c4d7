"""One message to be sent to one host over an outbound session (SMTP or LMTP): what the relayer
hands the session, and what the session answers for each recipient."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mailsrv.replies import Reply

__all__ = ["OutboundTransaction"]


@dataclass
class OutboundTransaction:
    """One message to one host: its envelope, its data, and (after the session) the results.

    Not :class:`mailsrv.inbound.message_intake.Transaction`, the inbound mail transaction of a session.
    """

    queue_id: str
    sender: str  # "" for <>
    recipients: list[str]
    prefix: bytes
    body_path: Path
    #: address -> the reply that decided it (RCPT refusal, or the reply to the data)
    results: dict[str, Reply] = field(default_factory=dict)
    #: MAIL FROM was sent: from here on the remote side may have the message, so a broken
    #: session defers it rather than handing it straight to the next host.
    attempted: bool = False
    #: The DSN parameters for a server that offers DSN: `` RET=... ENVID=...`` for MAIL,
    #: and by address `` NOTIFY=... ORCPT=...`` for RCPT (mailsrv.routing.dsn_params).
    dsn_mail: bytes = b""
    dsn_rcpt: dict[str, bytes] = field(default_factory=dict)
    #: The message came with SMTPUTF8 (the queue's flag, RFC 6531).
    smtputf8: bool = False
    #: REQUIRETLS (RFC 8689); ``refused``: why this host did not get it (outbound.requiretls)
    requiretls: bool = False
    refused: Reply | None = None
    tls_optional: bool = False  # TLS-Required: No (RFC 8689 §5): no TLS policy applies

    @property
    def complete(self) -> bool:
        return all(address in self.results for address in self.recipients)
