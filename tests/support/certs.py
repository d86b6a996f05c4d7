"""Test certificates made with ``cryptography`` (a dependency of pyOpenSSL): a CA and leaves."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(workdir: Path, stem: str, cert, key) -> tuple[Path, Path]:
    cert_path, key_path = workdir / f"{stem}.crt", workdir / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


def _builder(subject: str, issuer: str, public_key, days: float = 30):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days)))


@dataclass
class CA:
    cert: object
    key: object
    cert_path: Path

    def issue(self, names: list[str], workdir: Path, ips: tuple[str, ...] = (),
              stem: str | None = None, days: float = 30) -> tuple[Path, Path]:
        """A leaf for ``names`` (and ``ips``) valid from yesterday for ``days`` days."""
        key = _key()
        alt = [x509.DNSName(n) for n in names]
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (_builder(names[0], "mailsrv test CA", key.public_key(), days)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        return _write(Path(workdir), stem or names[0], cert, key)

    def client_context(self) -> ssl.SSLContext:
        """A client's TLS context trusting this CA alone, as a test's smtplib or raw client."""
        return ssl.create_default_context(cafile=str(self.cert_path))


def make_ca(workdir: Path) -> CA:
    key = _key()
    cert = (_builder("mailsrv test CA", "mailsrv test CA", key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, _ = _write(Path(workdir), "test-ca", cert, key)
    return CA(cert, key, cert_path)


def self_signed(names: list[str], workdir: Path) -> tuple[Path, Path]:
    key = _key()
    cert = (_builder(names[0], names[0], key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return _write(Path(workdir), f"self-{names[0]}", cert, key)
