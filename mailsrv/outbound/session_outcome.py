"""How one outbound SMTP or LMTP session went, beyond the per-message results: what the
relayer (mailsrv.outbound.destination), the metrics and TLS-RPT (mailsrv.outbound.tlsrpt)
read once the connection is closed.  mailsrv.outbound.smtpclient fills it in."""

from __future__ import annotations

from dataclasses import dataclass

from mailsrv.replies import Reply

__all__ = ["SessionOutcome"]


@dataclass
class SessionOutcome:
    """How a session went, beyond the per-message results."""

    greeted: bool = False  # the server said 220
    error: Reply | None = None  # why the session ended early, if it did
    loop: bool = False  # the server is ourselves
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    reason: str | None = None  # connection-level failure text (refused, reset, timeout)
    dsn: bool = False  # the server offered DSN (RFC 3461)
    #: For TLS-RPT (mailsrv.outbound.tlsrpt.results): STARTTLS in the first EHLO reply (None:
    #: no EHLO reply), and (result type, detail) when STARTTLS or the handshake failed.
    starttls_offered: bool | None = None
    tls_failure: tuple[str, str] | None = None
