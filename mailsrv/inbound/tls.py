"""
The server side of TLS: one pyOpenSSL context for STARTTLS and implicit-TLS listeners.

The context is built once per (re)load and handed to every new connection; a reload on SIGHUP
builds a new one and swaps it in, so connections already running keep the context (and the
certificate) they started with, and nobody is dropped when a Let's Encrypt certificate is
renewed.  Settings follow the usual "intermediate" profile for mail servers: TLS 1.2 at least,
forward-secret AEAD ciphers only, no compression, no renegotiation.
"""

from __future__ import annotations

import calendar
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from zope.interface import implementer

__all__ = [
    "ServerTLS", "TLSSetupError", "build_server_context", "certificate_expiry", "describe_connection",
]

# TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 suites are OpenSSL's (all strong).
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


class TLSSetupError(Exception):
    """The certificate or key cannot be used; ``key`` is the configuration key to blame."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


def _ssl_reason(error: Exception) -> str:
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        parts = [str(item[2]) for item in error.args[0] if len(item) > 2 and item[2]]
        if parts:
            return "; ".join(dict.fromkeys(parts))
    return str(error) or type(error).__name__


def build_server_context(cert: Path, key: Path) -> SSL.Context:
    """A server context for ``cert`` (PEM, with its chain) and ``key``; TLSSetupError if unusable."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
    options |= getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    context.set_options(options)
    context.set_cipher_list(CIPHERS)
    context.set_session_id(b"mailsrv")
    for name, path in (("tls.cert", cert), ("tls.key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            # OpenSSL's own words for a missing file are only "system lib".
            raise TLSSetupError(name, f"a readable PEM file: {e}") from None
    try:
        context.use_certificate_chain_file(str(cert).encode())
    except SSL.Error as e:
        raise TLSSetupError(
            "tls.cert", f"a PEM certificate (then its chain) in {cert}: {_ssl_reason(e)}"
        )
    try:
        # OpenSSL also refuses a key that is not the certificate's ("key values mismatch").
        context.use_privatekey_file(str(key).encode())
    except SSL.Error as e:
        raise TLSSetupError("tls.key", f"a PEM private key in {key}: {_ssl_reason(e)}")
    return context


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """The current server context, for Twisted's TLS (listeners and ``startTLS``).

    It declares the interfaces it provides: Twisted 26 warns at start-up
    (``LegacyContextFactoryWarning``) about a context factory that only has ``getContext``.
    Both interfaces exist in every Twisted this runs on (22.4 and later).
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self._context = build_server_context(cert, key)
        #: When the certificate in use expires (Unix time), for the metrics.
        self.expires = certificate_expiry(cert)

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A connection on the context current now (Twisted sets its state and app data)."""
        return SSL.Connection(self._context, None)

    def reload(self) -> None:
        """Re-read the files; on failure keep serving the old certificate and raise."""
        self._context = build_server_context(self.cert, self.key)
        self.expires = certificate_expiry(self.cert)


def certificate_expiry(cert: Path) -> float | None:
    """The notAfter of the first certificate in ``cert`` (the server's own), as Unix time;
    None if it cannot be read (build_server_context has read it already)."""
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError):
        return None
    # not_valid_after_utc from cryptography 42; bookworm's 38 has the naive UTC one only.
    stamp = getattr(certificate, "not_valid_after_utc", None) or certificate.not_valid_after
    return float(calendar.timegm(stamp.utctimetuple()))


def describe_connection(connection: object) -> str | None:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` for a pyOpenSSL connection after its handshake."""
    if not isinstance(connection, SSL.Connection):
        return None
    cipher = connection.get_cipher_name()
    if not cipher:
        return None
    return f"{connection.get_protocol_version_name()} {cipher}"
