"""
An MX host's certificate judged after the TLS handshake, and what one connection requires.

The session's handshake does not verify (it cannot: whether a failure matters depends on the
policy and, with REQUIRETLS, on each message); instead, once TLS is up and before any
``MAIL FROM``, the peer's chain is verified against the trusted CAs (``relay.tls_ca_file``
or the system's) and its names against the MX host name (RFC 6125, as RFC 8461 §4.2 says),
and each failure gets TLS-RPT's name for it (RFC 8460 §4.3).  :class:`HostCheck` decides:
``enforce`` ends the session (the messages wait, never sent in clear), ``testing`` only
logs, and ``verified`` tells the session whether REQUIRETLS messages may go.
"""

from __future__ import annotations

import ssl as stdlib_ssl
from pathlib import Path
from typing import Any

import service_identity
from OpenSSL import crypto
from service_identity.pyopenssl import verify_hostname
from twisted.internet import ssl
from twisted.logger import Logger

from mailsrv import replies
from mailsrv.outbound.danetls import TLSAttempt
from mailsrv.outbound.mtasts.policy import ENFORCE, Policy
from mailsrv.replies import Reply

__all__ = ["STARTTLS_NOT_SUPPORTED", "CERTIFICATE_HOST_MISMATCH", "CERTIFICATE_EXPIRED",
           "CERTIFICATE_NOT_TRUSTED", "VALIDATION_FAILURE", "HostCheck",
           "load_store", "check_peer", "handshake_options"]

log = Logger(namespace="mailsrv")

STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"

#: OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED.
_DATE_ERRORS = (9, 10)


def load_store(path: Path | None) -> crypto.X509Store:
    """The CAs a certificate is verified against: the configured bundle, or the system's."""
    store = crypto.X509Store()
    if path is not None:
        store.load_locations(str(path))
        return store
    paths = stdlib_ssl.get_default_verify_paths()  # OpenSSL's, SSL_CERT_FILE/_DIR honoured
    cafile = paths.cafile if paths.cafile and Path(paths.cafile).exists() else None
    capath = paths.capath if paths.capath and Path(paths.capath).is_dir() else None
    if cafile or capath:
        store.load_locations(cafile, capath)
    return store


def handshake_options() -> Any:
    """The client context for a checked session: no verification in the handshake (done
    after it, by :func:`check_peer`), TLS 1.2 at least (RFC 8461 §4.2 / RFC 8689 §4.2.1)."""
    return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def check_peer(connection: Any, hostname: str, store: crypto.X509Store) -> str | None:
    """None when the peer's certificate chains to a trusted CA and names ``hostname``; else
    the RFC 8460 result type of the failure.  ``connection``: the pyOpenSSL connection."""
    leaf = connection.get_peer_certificate()
    if leaf is None:
        return CERTIFICATE_NOT_TRUSTED
    chain = list(connection.get_peer_cert_chain() or [])[1:]
    try:
        crypto.X509StoreContext(store, leaf, chain=chain).verify_certificate()
    except crypto.X509StoreContextError as e:
        code = e.errors[0] if getattr(e, "errors", None) else None
        return CERTIFICATE_EXPIRED if code in _DATE_ERRORS else CERTIFICATE_NOT_TRUSTED
    try:
        verify_hostname(connection, hostname)
    except (service_identity.VerificationError, service_identity.CertificateError):
        return CERTIFICATE_HOST_MISMATCH
    return None


class HostCheck:
    """The TLS verdicts on one connection to one MX host (``policy`` None: no MTA-STS)."""

    def __init__(self, domain: str, host: str, address: str, *, store: crypto.X509Store | None,
                 policy: Policy | None, dane: bool = False) -> None:
        self.domain, self.host, self.address, self.store = domain, host, address, store
        self.dane = dane  # DANE verified the handshake (it fails the handshake otherwise)
        self.policy = policy
        self.enforce = policy is not None and policy.mode == ENFORCE
        #: TLS is up and the certificate is valid for the host name (REQUIRETLS may go).
        self.verified = False
        self.result: str | None = None  # the RFC 8460 result type of a failure, policy or not
        self.refusal: Reply | None = None  # the reply that ended the session (enforce)
        self.judged = False  # after_handshake or without_tls was called

    def after_handshake(self, connection: Any) -> Reply | None:
        """Called once TLS is up, before any MAIL: a Reply ends the session (enforce)."""
        if self.dane:
            result = None
        elif self.store is None or self.host.startswith("["):
            result: str | None = VALIDATION_FAILURE  # nothing to verify against / no name
        elif connection.get_protocol_version_name() not in ("TLSv1.2", "TLSv1.3"):
            result = VALIDATION_FAILURE  # below the TLS 1.2 both RFCs require
        else:
            result = check_peer(connection, self.host, self.store)
        self.verified = result is None
        return self._judge(result)

    def without_tls(self) -> Reply | None:
        """Called when the session goes on without TLS: a Reply ends it (enforce)."""
        return self._judge(STARTTLS_NOT_SUPPORTED)

    def attempt(self, greeted: bool, tls: bool) -> TLSAttempt | None:
        """The session's TLS-RPT record under the policy (None: no policy, or no server
        answered); a handshake that broke before the verdict is a validation failure."""
        policy = self.policy
        if policy is None or not greeted:
            return None
        result = self.result if self.judged or tls else VALIDATION_FAILURE
        return TLSAttempt("sts", self.domain, tuple(policy.lines), self.host, self.address,
                          result, mx_patterns=policy.mx)

    def _judge(self, result: str | None) -> Reply | None:
        self.result, self.judged = result, True
        if result is None or self.policy is None:
            return None
        if self.enforce:
            log.warn("mta-sts: {domain}: {host}[{ip}] fails the policy (enforce): {result}; "
                     "not sent", domain=self.domain, host=self.host, ip=self.address,
                     result=result)
            reply = (replies.STS_NO_STARTTLS if result == STARTTLS_NOT_SUPPORTED
                     else replies.STS_CERTIFICATE)
            self.refusal = reply.format(domain=self.domain, host=self.host, result=result)
            return self.refusal
        log.warn("mta-sts: {domain}: {host}[{ip}] would fail the policy (testing): {result}; "
                 "sent anyway", domain=self.domain, host=self.host, ip=self.address,
                 result=result)
        return None
