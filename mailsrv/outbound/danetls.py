"""
The TLS side of DANE: STARTTLS to a host with secure TLSA records, and what came of it.

A :class:`DaneTLS` is the TLS connection creator of one connection attempt (Twisted's
``IOpenSSLClientConnectionCreator``, given to the SMTP client as its TLS context; the client
requires TLS).  OpenSSL's own verification is off: DANE-EE ignores names and dates, and
DANE-TA's anchor is known only once the chain is seen.  When the handshake is done, the chain
the server presented is checked against the usable TLSA records (mailsrv.outbound.dane,
microseconds of hashing, so in the reactor thread like the handshake itself); a mismatch
aborts the connection before the client says anything but EHLO, as Twisted's own host name
check does.  SNI is the TLSA base domain (RFC 7672 §8.1).

Each attempt leaves a :class:`TLSAttempt` for TLS-RPT (RFC 8460): the policy (type
``tlsa``, the records as text), the MX host and address, and the failure's result type
(§4.3) or None when the session was secured as the policy asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsrv.outbound.dane import Verdict, check_chain
from mailsrv.outbound.danelookup import DanePolicy

__all__ = ["TLSAttempt", "DaneVerificationError", "DaneTLS"]

log = Logger(namespace="mailsrv")


@dataclass(frozen=True)
class TLSAttempt:
    """One session (or lookup) under a DANE policy, as TLS-RPT counts them (RFC 8460 §4.4)."""

    policy_type: str  # "tlsa" (the report's "policy-type")
    policy_domain: str  # the destination domain ("policy-domain")
    policy_string: tuple[str, ...]  # the TLSA records, presentation format ("policy-string")
    mx_host: str  # "receiving-mx-hostname"
    ip: str | None  # "receiving-ip"; None: no connection was made (the lookups failed)
    result_type: str | None  # None: success; else RFC 8460 §4.3's "result-type"
    detail: str = ""
    mx_patterns: tuple[str, ...] = ()  # an "sts" policy's mx patterns ("mx-host")


class DaneVerificationError(Exception):
    """The server's chain does not satisfy the host's TLSA records."""


@implementer(IOpenSSLClientConnectionCreator)
class DaneTLS:
    """STARTTLS under one host's DANE policy, for one connection attempt."""

    def __init__(self, policy: DanePolicy, domain: str, address: str) -> None:
        self.policy = policy
        self.domain = domain
        self.address = address
        self.names = (policy.base, domain)
        self.started = False  # the server accepted STARTTLS: the handshake began
        self.verdict: Verdict | None = None  # set when the handshake is done
        self._context = ssl.CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        self.started = True
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self.policy.base.encode("idna"))
        connection.set_info_callback(self._info)
        return connection

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        if not where & SSL.SSL_CB_HANDSHAKE_DONE or self.verdict is not None:
            return  # (TLS 1.3 signals "done" again for each session ticket)
        try:
            chain = [crypto.dump_certificate(crypto.FILETYPE_ASN1, c)
                     for c in connection.get_peer_cert_chain() or []]
            if self.policy.authenticated:
                verdict = check_chain(self.policy.usable, chain, self.names)
            else:
                verdict = Verdict(True, None, "no usable TLSA record: TLS without authentication")
        except Exception:
            log.failure("dane: checking the chain of {host}", host=self.policy.host)
            verdict = Verdict(False, "validation-failure", "the certificate chain could not be checked")
        self.verdict = verdict
        if not verdict.ok:
            connection.get_app_data().failVerification(
                Failure(DaneVerificationError(verdict.detail)))

    def result(self, greeted: bool) -> TLSAttempt | None:
        """What the session came to, once it ended (None: no server answered, nothing to
        say about TLS).  ``greeted``: the server said 220."""
        if self.verdict is not None and not self.verdict.ok:
            kind, detail = self.verdict.result_type, self.verdict.detail
        elif self.verdict is not None:
            kind, detail = None, self.verdict.detail
        elif not greeted:
            return None
        elif not self.started:
            kind, detail = "starttls-not-supported", "STARTTLS not offered or refused"
        else:
            kind, detail = "validation-failure", "the TLS handshake failed"
        return TLSAttempt("tlsa", self.domain, self.policy.policy_string, self.policy.host,
                          self.address, kind, detail)
