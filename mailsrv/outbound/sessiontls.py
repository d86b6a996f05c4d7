"""
The TLS steps of the relay client (mailsrv.outbound.smtpclient.RelayClient), a mixin over
Twisted's ``ESMTPClient``:

- a ``454`` to an opportunistic ``STARTTLS`` continues in plain text (as Postfix does);
- the TLS in use is noted for the log and the metrics;
- with a HostCheck (``_tls_check``, mailsrv.outbound.mtasts.tlscheck), TLS is judged once
  before the first ``MAIL FROM``: the certificate checked after the handshake, or the lack
  of TLS reported; a verdict (an MTA-STS ``enforce`` policy not met) ends the session before
  anything is sent, with the reply the messages are deferred with;
- a REQUIRETLS message is refused by a host without verified TLS or without REQUIRETLS.
"""

from __future__ import annotations

from typing import Any

from twisted.mail import smtp

from mailsrv.outbound.requiretls import requiretls_refusal

__all__ = ["SessionTLS"]


class SessionTLS:
    """Mixed into RelayClient (which sets ``_tls_check``, ``_tls_judged``, ``outcome``)."""

    _tls_check: Any
    _tls_judged: bool
    _tlsMode: bool
    _extensions: dict[bytes, Any]
    _peer: str
    outcome: Any

    def esmtpTLSRequired(self, code: int = -1, resp: bytes | None = None) -> None:
        """TLS required and not offered: the HostCheck's reply, if it has one."""
        verdict = self._tls_check.without_tls() if self._tls_check is not None else None
        if verdict is None:
            smtp.ESMTPClient.esmtpTLSRequired(self, code, resp)
            return
        self._tls_judged, self.outcome.error = True, verdict
        self._disconnectFromServer()

    def esmtpTLSFailed(self, code: int = -1, resp: bytes | None = None) -> None:
        if not self._tlsMode:  # for TLS-RPT (mailsrv.outbound.tlsrpt.results)
            self.outcome.tls_failure = ("starttls-not-supported", f"STARTTLS refused: {code}")
        if 400 <= code <= 499 and not self.requireTransportSecurity and not self._tlsMode:
            # Opportunistic: the server refused STARTTLS; the session is still usable in clear.
            self.authenticate(code, resp, self._extensions)
            return
        smtp.ESMTPClient.esmtpTLSFailed(self, code, resp)

    def _note_tls(self) -> None:
        if self._tlsMode and self.outcome.tls is None:
            try:
                handle = self.transport.getHandle()
                self.outcome.tls = f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"
            except Exception:
                self.outcome.tls = "TLS"

    def _judge_tls(self) -> bool:
        """Before the first MAIL: the HostCheck's verdict on TLS (or its absence); False
        when it ended the session."""
        if self._tls_judged:
            return True
        self._tls_judged = True
        check = self._tls_check
        verdict = (check.after_handshake(self.transport.getHandle()) if self._tlsMode
                   else check.without_tls())
        if verdict is None:
            return True
        self.outcome.error = verdict
        self._disconnectFromServer()
        return False

    def _requiretls_refused(self, current: Any) -> bool:
        """A REQUIRETLS message this host may not have (unverified TLS, or no REQUIRETLS
        offered): its ``refused`` says why (mailsrv.outbound.requiretls)."""
        if not current.requiretls:
            return False
        current.refused = requiretls_refusal(
            self._tls_check, self._tlsMode, b"REQUIRETLS" in self._extensions, self._peer)
        return current.refused is not None
