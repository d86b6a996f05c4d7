"""
DANE for SMTP (RFC 7672, RFC 7671, RFC 6698): TLSA records and matching them to a server's chain.

Pure logic: no DNS, no sockets.  mailsrv.outbound.danelookup finds the records (DNSSEC-secure
only), mailsrv.outbound.danetls checks the chain the server presented with
:func:`check_chain` when the handshake is done.

Only the usages RFC 7672 §3.1 lets an SMTP client use are *usable*: DANE-TA(2) and
DANE-EE(3), with selector Cert(0) or SPKI(1) and matching type Full(0), SHA2-256(1) or
SHA2-512(2).  PKIX-TA(0) and PKIX-EE(1), and unknown selectors or matching types, are
ignored (§3.1.3); a secure TLSA RRset with none usable still makes TLS mandatory, but
unauthenticated (§2.2).  DANE-EE ignores the names and validity dates of the certificate
(§3.1.1); DANE-TA needs the chain from the server's certificate up to the matched trust
anchor, valid today, with the MX host name (or the next-hop domain) in the certificate
(§3.2.2, §3.2.3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

__all__ = [
    "DANE_TA", "DANE_EE", "TLSA", "Verdict", "parse_tlsa", "usable", "matches", "check_chain",
]

#: Certificate usages (RFC 6698 §2.1.1, RFC 7218 names).
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
#: Selectors: the whole certificate, or its SubjectPublicKeyInfo.
CERT, SPKI = 0, 1
#: Matching types: the data itself, or its SHA2-256 / SHA2-512 digest.
FULL, SHA2_256, SHA2_512 = 0, 1, 2

#: OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED and X509_V_ERR_CERT_NOT_YET_VALID.
_EXPIRED = (9, 10)


@dataclass(frozen=True)
class TLSA:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        """The presentation format, as TLS-RPT's ``policy-string`` wants it."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """Whether an SMTP client may use it (RFC 7672 §3.1)."""
        return (self.usage in (DANE_TA, DANE_EE) and self.selector in (CERT, SPKI)
                and self.mtype in (FULL, SHA2_256, SHA2_512))


@dataclass(frozen=True)
class Verdict:
    """The outcome of matching a chain: ``result_type`` is RFC 8460 §4.3's name of a failure."""

    ok: bool
    result_type: str | None
    detail: str


def parse_tlsa(rdata: bytes) -> TLSA | None:
    """A record from its RDATA (usage, selector, matching type, data); None if too short."""
    if len(rdata) < 3:
        return None
    return TLSA(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))


def usable(records: Sequence[TLSA]) -> tuple[TLSA, ...]:
    """The records an SMTP client uses, in their order."""
    return tuple(r for r in records if r.usable)


def _selected(cert_der: bytes, selector: int) -> bytes:
    if selector == CERT:
        return cert_der
    key = x509.load_der_x509_certificate(cert_der).public_key()
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == SHA2_256:
        return hashlib.sha256(data).digest()
    if mtype == SHA2_512:
        return hashlib.sha512(data).digest()
    return data


def matches(record: TLSA, cert_der: bytes) -> bool:
    """Whether a certificate (DER) is the one the record names."""
    if not record.usable:
        return False
    try:
        return _digest(_selected(cert_der, record.selector), record.mtype) == record.data
    except ValueError:  # a certificate cryptography cannot read matches nothing
        return False


def _chain_verdict(chain: Sequence[bytes], anchor: int) -> Verdict | None:
    """None when ``chain[0]`` chains up to ``chain[anchor]`` (taken as trusted), valid today;
    else the failure.  OpenSSL does the signature and date checks (PARTIAL_CHAIN: the
    anchor need not be self-signed)."""
    store = crypto.X509Store()
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_ASN1, chain[anchor]))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    leaf = crypto.load_certificate(crypto.FILETYPE_ASN1, chain[0])
    between = [crypto.load_certificate(crypto.FILETYPE_ASN1, der) for der in chain[1:anchor]]
    try:
        crypto.X509StoreContext(store, leaf, chain=between).verify_certificate()
    except crypto.X509StoreContextError as e:
        code = e.errors[0] if e.errors else 0
        kind = "certificate-expired" if code in _EXPIRED else "certificate-not-trusted"
        return Verdict(False, kind, f"DANE-TA chain: {e}")
    return None


def _names_verdict(leaf_der: bytes, names: Sequence[str]) -> Verdict | None:
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    cert = x509.load_der_x509_certificate(leaf_der)
    for name in names:
        try:
            verify_certificate_hostname(cert, name)
            return None
        except (VerificationError, CertificateError):
            continue
    return Verdict(False, "certificate-host-mismatch",
                   f"DANE-TA: the certificate names none of {', '.join(names)}")


def check_chain(records: Sequence[TLSA], chain: Sequence[bytes], names: Sequence[str]) -> Verdict:
    """Whether the chain a server presented (DER, its certificate first) satisfies one of
    the usable ``records``; ``names`` are the reference identifiers for DANE-TA (the MX
    host name, then the next-hop domain)."""
    records = usable(records)
    if not chain:
        return Verdict(False, "validation-failure", "the server presented no certificate")
    for record in records:
        if record.usage == DANE_EE and matches(record, chain[0]):
            return Verdict(True, None, f"DANE-EE {record.usage} {record.selector} {record.mtype}")
    failure: Verdict | None = None
    for record in records:
        if record.usage != DANE_TA:
            continue
        for anchor in range(len(chain)):
            if not matches(record, chain[anchor]):
                continue
            failure = _chain_verdict(chain, anchor) or _names_verdict(chain[0], names)
            if failure is None:
                return Verdict(True, None,
                               f"DANE-TA {record.usage} {record.selector} {record.mtype}")
    if failure is not None:
        return failure
    return Verdict(False, "certificate-not-trusted",
                   "no usable TLSA record matches the server's certificate chain")
