"""
One outbound host attempt as TLS-RPT sees it (RFC 8460 §4.3), and how a relay session's
outcome is classified into it.

A session that never got as far as the server's EHLO reply says nothing about TLS (a refused
connection, a timeout before the greeting): it is not counted.  Otherwise it is a success
when TLS was negotiated, else a failure with the §4.3 result type: the server did not offer
STARTTLS or refused it (``starttls-not-supported``), or the handshake failed (the
certificate's name, expiry or chain when we verify it, ``validation-failure`` for anything
else).  Pure but for :func:`handshake_failure`, which reads the dead TLS connection's
verification result.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL

__all__ = [
    "NO_POLICY", "STARTTLS_NOT_SUPPORTED", "CERTIFICATE_HOST_MISMATCH", "CERTIFICATE_EXPIRED",
    "CERTIFICATE_NOT_TRUSTED", "VALIDATION_FAILURE", "RESULT_TYPES", "classify",
    "classify_handshake", "handshake_failure", "listen_to_attempts", "record_attempt",
    "record_session",
]

#: policy-type of a session under relay.tls alone (no MTA-STS, no DANE).
NO_POLICY = "no-policy-found"
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
#: Every result-type of RFC 8460 §4.3 (negotiation, then DANE and MTA-STS policy failures).
RESULT_TYPES = (
    STARTTLS_NOT_SUPPORTED, CERTIFICATE_HOST_MISMATCH, CERTIFICATE_EXPIRED,
    CERTIFICATE_NOT_TRUSTED, VALIDATION_FAILURE, "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)

# OpenSSL's X509_V_ERR codes (x509_vfy.h) that say more than "certificate verify failed".
_EXPIRED = {10, 12}  # CERT_HAS_EXPIRED, CRL_HAS_EXPIRED
_NOT_YET_VALID = {9}
_HOST_MISMATCH = {62}  # HOSTNAME_MISMATCH (when OpenSSL itself checks the name)
_UNTRUSTED = {2, 18, 19, 20, 21, 24, 27, 28}  # unknown issuer, self-signed, untrusted, ...


def handshake_failure(transport: Any, reason: Any) -> tuple[str, str] | None:
    """(result type, detail) for a TLS connection lost before it was usable, None when TLS
    had been set up and the session ended for another reason.  ``reason`` is the Failure,
    ``transport`` the TLS transport (its OpenSSL connection knows the X.509 verification
    result)."""
    value = getattr(reason, "value", reason)
    kind = type(value).__name__
    done = getattr(getattr(transport, "protocol", None), "_handshakeDone", None)
    if not isinstance(value, SSL.Error) and kind != "VerificationError" and done is not False:
        return None
    text = reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else str(reason)
    return classify_handshake(_verify_code(transport), kind, text), text


def _verify_code(transport: Any) -> int:
    """OpenSSL's X509_V_ERR code of the connection (0: none, or not to be had): pyOpenSSL
    has no public call for it, and "certificate verify failed" alone cannot tell an expired
    certificate from an untrusted one."""
    try:
        handle = transport.getHandle()
        return int(SSL._lib.SSL_get_verify_result(handle._ssl))
    except Exception:
        return 0


def classify_handshake(verify_code: int, kind: str, text: str) -> str:
    """The result type of a failed handshake from OpenSSL's verification code, the error's
    class name and text (service_identity's VerificationError: the name did not match)."""
    if verify_code in _EXPIRED or verify_code in _NOT_YET_VALID:
        return CERTIFICATE_EXPIRED
    if verify_code in _HOST_MISMATCH or kind == "VerificationError" or "mismatch" in text.lower():
        return CERTIFICATE_HOST_MISMATCH
    if verify_code in _UNTRUSTED or (verify_code and "verify" in text.lower()):
        return CERTIFICATE_NOT_TRUSTED
    if "certificate verify failed" in text.lower():
        return CERTIFICATE_NOT_TRUSTED
    return VALIDATION_FAILURE


def classify(outcome: Any) -> tuple[str | None, str] | None:
    """(result type or None for success, failure reason) of a session outcome
    (mailsrv.outbound.smtpclient.SessionOutcome); None when TLS was never in question."""
    if outcome.tls:
        return None, ""
    failure = getattr(outcome, "tls_failure", None)
    if failure is not None:
        return failure
    if getattr(outcome, "starttls_offered", None) is False:
        return STARTTLS_NOT_SUPPORTED, "STARTTLS not offered"
    return None


def record_session(counts: Any, domain: str, host: str, address: str, outcome: Any) -> None:
    """Count one host attempt under relay.tls (policy ``no-policy-found``) in ``counts``
    (mailsrv.outbound.tlsrpt.counts.TLSCounts; None: TLS-RPT is off)."""
    if counts is None:
        return
    verdict = classify(outcome)
    if verdict is not None:
        result_type, reason = verdict
        counts.record(domain, NO_POLICY, (), (), host, address, result_type, reason)


def listen_to_attempts(destinations: Any, counts: Any) -> None:
    """Count the attempts under a DANE or MTA-STS policy that ``destinations``
    (mailsrv.outbound.destination.DestinationDelivery) tells its listeners of."""
    destinations.tls_attempts.append(lambda attempt: record_attempt(counts, attempt))


def record_attempt(counts: Any, attempt: Any) -> None:
    """Count one attempt under a policy (mailsrv.outbound.danetls.TLSAttempt: ``tlsa`` or
    ``sts``, its records or lines, an ``sts`` policy's mx patterns, the MX host, the address,
    None when no connection was made)."""
    counts.record(attempt.policy_domain, attempt.policy_type, attempt.policy_string,
                  attempt.mx_patterns, attempt.mx_host, attempt.ip or "", attempt.result_type,
                  attempt.detail)
