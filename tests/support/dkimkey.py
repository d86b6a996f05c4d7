"""An RSA-2048 key for the tests that sign (with dkimpy or Perl's Mail::DKIM) what mailsrv
verifies: the private key as a PKCS#1 PEM, and the ``p=`` value of its key record."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def rsa_key() -> tuple[bytes, str]:
    """(the private key's PEM, the base64 DER public key for ``p=``)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode()
