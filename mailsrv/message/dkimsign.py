"""
DKIM signatures (RFC 6376, RFC 8463) over a message as it is stored: dkimpy signs.

What is signed: relaxed/relaxed canonicalization; the fields of :data:`SIGNED_FIELDS`
present in the message, and ``From`` once more than present ("oversigned"), so that no
``From:`` can be added without breaking the signature.  Trace fields (``Received:``,
``Return-Path:``, ``Delivered-To:``) are not signed: they change on the way.  Each key of the
domain makes one ``DKIM-Signature:`` field over the same message (none covers another).

Cost: dkimpy takes the message as one bytes object and makes canonical copies of the body:
signing peaks at about 6.6 times the message's size in memory (measured with tracemalloc at 1
and 25 MiB: 166 MiB for a 25 MiB message), and takes about 50 ms per MiB of body per key, plus
the signature itself: RSA-2048 by OpenSSL (see :func:`openssl_rsa_sign`), Ed25519 by
libsodium (PyNaCl), each well under a millisecond.
``smtp.max_message_size`` bounds the memory, and the modifier signs large messages one at
a time (mailsrv.checks.signing).

Pure, apart from dkimpy's clock (the ``t=`` tag).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from mailsrv.message.dkimkeys import SigningKey
from mailsrv.routing.address import normalise_domain

__all__ = ["SIGNED_FIELDS", "arc_seal", "from_domain", "openssl_rsa_sign", "read_message",
           "sign", "signed_fields"]

#: RFC 6376 §5.4.1's list, as dkimpy and OpenDKIM sign by default (lower-case).
SIGNED_FIELDS = (
    b"from", b"sender", b"reply-to", b"subject", b"date", b"message-id", b"to", b"cc",
    b"mime-version", b"content-type", b"content-transfer-encoding", b"content-id",
    b"content-description", b"resent-date", b"resent-from", b"resent-sender", b"resent-to",
    b"resent-cc", b"resent-message-id", b"in-reply-to", b"references", b"list-id",
    b"list-help", b"list-unsubscribe", b"list-subscribe", b"list-post", b"list-owner",
    b"list-archive",
)
_SIGNED = frozenset(SIGNED_FIELDS)


def signed_fields(names: Sequence[bytes]) -> list[bytes]:
    """The ``h=`` list for a header section with fields ``names`` (in order): each signed
    field as often as it occurs, then ``from`` once more."""
    present = [n.lower() for n in names if n.lower() in _SIGNED]
    return present + [b"from"]


def from_domain(originators: Sequence[tuple[str, str]]) -> str | None:
    """The domain of the message's one ``From:`` address (lower-case A-labels), None when
    there is no From:, or more than one address (nothing to align a signature with)."""
    froms = [address for field, address in originators if field.lower() == "from"]
    if len(froms) != 1:
        return None
    local, at, domain = froms[0].rpartition("@")
    if not (local and at and domain):
        return None
    try:
        return normalise_domain(domain)  # as the key directories are named: A-labels
    except ValueError:
        return None


def read_message(prefix: bytes, separator: bytes, body_path: Path) -> bytes:
    """The message as stored: our fields, the separator (if any), then the spool body."""
    with open(body_path, "rb") as body:
        return prefix + separator + body.read()


# -- RSA by OpenSSL ---------------------------------------------------------------------------
#
# dkimpy computes RSA signatures with Python integers: 7.5 ms per RSA-2048 signature, holding
# the GIL, which measured as durable intake falling from ~450 to ~85 messages a second with an
# RSA key (the reactor thread starved by the delivery threads' signing).  The same signature
# (RSASSA-PKCS1-v1_5 is deterministic: the tests compare it octet for octet with dkimpy's) is
# made by OpenSSL through the ``cryptography`` package in well under a millisecond.  dkimpy
# offers no hook for it, so its module-level ``RSASSA_PKCS1_v1_5_sign``, which its signer calls
# with the digest and the key it parsed, is replaced by :func:`openssl_rsa_sign` when this
# module is imported (the verification functions are untouched).  dkimpy's ARC signer
# (:func:`arc_seal`) calls the same function, so ARC seals are made by OpenSSL too.

_OPENSSL_KEYS: dict[int, rsa.RSAPrivateKey] = {}
_DIGESTS = {32: hashes.SHA256, 20: hashes.SHA1}


def openssl_rsa_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, private_key)``, by OpenSSL: ``hash`` is the
    digest object, ``private_key`` dkimpy's parsed key (its RFC 8017 numbers)."""
    modulus = private_key["modulus"]
    key = _OPENSSL_KEYS.get(modulus)
    if key is None:
        key = rsa.RSAPrivateNumbers(
            p=private_key["prime1"], q=private_key["prime2"],
            d=private_key["privateExponent"], dmp1=private_key["exponent1"],
            dmq1=private_key["exponent2"], iqmp=private_key["coefficient"],
            public_numbers=rsa.RSAPublicNumbers(private_key["publicExponent"], modulus),
        ).private_key()
        if len(_OPENSSL_KEYS) >= 64:  # keys rotate: never hold many old ones
            _OPENSSL_KEYS.clear()
        _OPENSSL_KEYS[modulus] = key
    digest = hash.digest()
    return key.sign(digest, padding.PKCS1v15(), Prehashed(_DIGESTS[len(digest)]()))


if callable(getattr(dkim, "RSASSA_PKCS1_v1_5_sign", None)):
    dkim.RSASSA_PKCS1_v1_5_sign = openssl_rsa_sign

# dkimpy also parses the PEM private key again, in Python, for every message it signs (0.12 ms
# of the ~0.55 ms an RSA signature of a 5 KB message takes on the 2-core test machine; the
# benchmark's profile under load put it higher, bench/README.md).  The parse
# is a pure function of the key's octets, so its module-level name is given a bounded cache
# (keys rotate; the parsed key, a dict of integers, is only read by the signer).
if callable(getattr(dkim, "parse_pem_private_key", None)) and not hasattr(
    dkim.parse_pem_private_key, "cache_info"
):
    dkim.parse_pem_private_key = functools.lru_cache(maxsize=64)(dkim.parse_pem_private_key)


def sign(message: bytes, keys: Sequence[SigningKey]) -> bytes:
    """One ``DKIM-Signature:`` field per key (LF line ends, as the spool), over ``message``
    (LF line ends; its header section must hold a From:).  Raises dkim.DKIMException."""
    signer = dkim.DKIM(message, linesep=b"\n")
    include = signed_fields([name for name, _ in signer.headers])
    fields = []
    for key in keys:
        field = signer.sign(
            key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
            signature_algorithm=key.signature_algorithm,
            canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
        )
        fields.append(field if field.endswith(b"\n") else field + b"\n")
    return b"".join(fields)


def arc_seal(message: bytes, key: SigningKey, srv_id: str) -> bytes:
    """The next ARC set (RFC 8617: ``ARC-Seal:``, ``ARC-Message-Signature:``,
    ``ARC-Authentication-Results:``, LF line ends) over ``message`` (LF line ends), sealed
    with ``key`` (RSA: RFC 8617 allows rsa-sha256 only).  The ``Authentication-Results:``
    of authserv-id ``srv_id`` in ``message`` is copied into the ARC-Authentication-Results:
    and its ``arc=`` result is the seal's ``cv=``.  The message signature covers the same
    fields as a DKIM signature (relaxed/relaxed, From: oversigned).  Empty when dkimpy
    finds nothing to seal (no such field, or a chain without an ``arc=`` result); raises
    dkim.DKIMException for a message it cannot seal (a chain of 50 sets, ...)."""
    sealer = dkim.ARC(message, linesep=b"\n")
    include = signed_fields([name for name, _ in sealer.headers])
    fields = sealer.sign(key.selector.encode("ascii"), key.domain.encode("ascii"),
                         key.private, srv_id.encode("ascii"), include_headers=include)
    return b"".join(f if f.endswith(b"\n") else f + b"\n" for f in fields)
