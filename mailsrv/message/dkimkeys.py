"""
DKIM signing keys on disk: ``<keys>/<domain>/<selector>.key``, made, read and published.

One file per selector, a PEM PKCS#8 private key: RSA (``k=rsa``) or Ed25519 (``k=ed25519``,
RFC 8463), the algorithm read from the key itself, so a file cannot be taken for the other
kind.  Every ``*.key`` file of a domain signs: an RSA and an Ed25519 key sign side by side,
and during a rotation the old and the new selector both sign until the old file is removed.
Other files (``s.key.old``, editor backups) are ignored.

Keys are checked when loaded (start-up, ``mailsrv check-config``, SIGHUP): a file that does
not hold a usable key, or that other users may read, is a configuration error naming it, and
the server does not start half-configured.  The keys are held in the form dkimpy signs with.

Blocking I/O (the reads and writes); the key generation and parsing are the ``cryptography``
package's (which pyOpenSSL already depends on), the signing is dkimpy's.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailsrv.config.schema import ConfigError
from mailsrv.routing.address import normalise_domain

__all__ = [
    "ALGORITHMS", "RSA_BITS", "SigningKey", "SigningKeys", "check_selector", "describe_keys",
    "generate",
    "key_path", "load_keys", "public_key", "read_key", "txt_record", "write_key",
]

#: ``--algorithm`` values, and the ``k=`` tag each publishes.
ALGORITHMS = ("rsa", "ed25519")
#: The size ``mailsrv dkim keygen`` makes (RFC 8301: at least 1024, 2048 recommended).
RSA_BITS = 2048
#: Shorter RSA keys are refused (RFC 8301 §3.2: verifiers must not accept them).
RSA_MIN_BITS = 1024

_SUFFIX = ".key"
# RFC 6376 §3.1: a selector is a sub-domain: labels of letters, digits and inner hyphens.
# Lower-case only here, because the file name is the selector and DNS ignores case.
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\Z")


@dataclass(frozen=True)
class SigningKey:
    """One selector's key, ready for dkimpy."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    #: What dkimpy's ``sign`` takes: a PKCS#1 PEM for RSA, the base64 seed for Ed25519.
    private: bytes
    path: Path

    @property
    def signature_algorithm(self) -> bytes:
        """The ``a=`` tag: ``rsa-sha256`` or ``ed25519-sha256``."""
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    def __repr__(self) -> str:  # never the private key in a log line or a traceback
        return f"SigningKey({self.selector}._domainkey.{self.domain}, {self.algorithm})"


class SigningKeys:
    """Every signing key, by domain (each domain's keys sorted by selector)."""

    def __init__(self, keys: tuple[SigningKey, ...] = (), directory: Path | None = None) -> None:
        self.directory = directory
        by_domain: dict[str, list[SigningKey]] = {}
        for key in sorted(keys, key=lambda k: (k.domain, k.selector)):
            by_domain.setdefault(key.domain, []).append(key)
        self._by_domain = {d: tuple(ks) for d, ks in by_domain.items()}

    def for_domain(self, domain: str) -> tuple[SigningKey, ...]:
        """The keys that sign mail whose From: is in ``domain`` (lower-case A-labels)."""
        return self._by_domain.get(domain, ())

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self._by_domain)

    def all(self) -> tuple[SigningKey, ...]:
        return tuple(k for keys in self._by_domain.values() for k in keys)

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._by_domain.values())


def describe_keys(keys: SigningKeys) -> str:
    """One line for the log: every domain's selectors and algorithms."""
    if not len(keys):
        return f"no signing keys in {keys.directory}"
    return ", ".join(
        f"{domain}: " + " ".join(f"{k.selector}({k.algorithm})" for k in keys.for_domain(domain))
        for domain in keys.domains
    )


def check_selector(selector: str) -> str:
    """``selector`` if it can name a key file and a DNS label; ValueError otherwise."""
    if len(selector) > 63 * 4 or not _SELECTOR.match(selector):
        raise ValueError(
            f"{selector!r} is not a selector: lower-case letters, digits, inner hyphens, "
            "labels separated by dots"
        )
    return selector


def key_path(directory: Path, domain: str, selector: str) -> Path:
    return Path(directory) / domain / f"{selector}{_SUFFIX}"


# --------------------------------------------------------------------------- reading


def read_key(path: Path, domain: str, selector: str) -> SigningKey:
    """The key in ``path``; ValueError saying what is wrong with the file."""
    with open(path, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_mode & 0o077:
            raise ValueError(
                f"a key file no other user can read (mode 0600), not mode "
                f"{stat.S_IMODE(st.st_mode):04o}"
            )
        data = handle.read(64 * 1024)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"a PEM private key without a passphrase ({e})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise ValueError(f"an RSA key of at least {RSA_MIN_BITS} bits, not {key.key_size}")
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return SigningKey(domain, selector, "rsa", private, Path(path))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return SigningKey(domain, selector, "ed25519", base64.b64encode(seed), Path(path))
    raise ValueError(f"an RSA or Ed25519 key, not {type(key).__name__}")


def load_keys(
    directory: Path, source: Path | None, required: bool, key: str = "dkim.keys"
) -> SigningKeys:
    """Every key under ``directory``, checked; ConfigError naming the file that is wrong.

    A missing directory means no signing, unless ``required`` (the configuration names it).
    """
    directory = Path(directory)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        if required:
            raise ConfigError(source, key, f"an existing directory of DKIM keys: {directory} "
                              "does not exist") from None
        return SigningKeys((), directory)
    except OSError as e:
        raise ConfigError(source, key, f"a readable directory of DKIM keys: {e}") from None
    keys: list[SigningKey] = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=True):
            continue
        try:
            domain = normalise_domain(entry.name)
        except ValueError as e:
            domain = f"({e})"
        if domain != entry.name:
            raise ConfigError(source, key, f"{entry.path}: a directory named after a domain, "
                              f"in lower case (A-labels for IDNA): {domain}")
        try:
            files = sorted(os.scandir(entry.path), key=lambda e: e.name)
        except OSError as e:
            raise ConfigError(source, key, f"a readable directory of DKIM keys: {e}") from None
        for file in files:
            if file.name.startswith(".") or not file.name.endswith(_SUFFIX):
                continue
            selector = file.name[: -len(_SUFFIX)]
            try:
                check_selector(selector)
                keys.append(read_key(Path(file.path), domain, selector))
            except (OSError, ValueError) as e:
                raise ConfigError(source, key, f"{file.path}: expected {e}") from None
    return SigningKeys(tuple(keys), directory)


# --------------------------------------------------------------------------- making


def generate(algorithm: str) -> bytes:
    """A new private key as PEM PKCS#8: RSA-2048 or Ed25519."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    elif algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key(pem: bytes) -> tuple[str, str]:
    """(algorithm, the ``p=`` value) of a PEM private key: RFC 6376's base64 DER
    SubjectPublicKeyInfo for RSA, RFC 8463's base64 of the 32 raw octets for Ed25519."""
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return "rsa", base64.b64encode(der).decode("ascii")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "ed25519", base64.b64encode(raw).decode("ascii")
    raise ValueError(f"an RSA or Ed25519 key, not {type(key).__name__}")


def txt_value(algorithm: str, public: str) -> str:
    """The record's text, as one string."""
    return f"v=DKIM1; k={algorithm}; p={public}"


def txt_record(domain: str, selector: str, algorithm: str, public: str) -> str:
    """The TXT record in zone-file form, its text cut into strings of at most 255 octets
    (RFC 1035's limit for one character-string; the verifier joins them)."""
    value = txt_value(algorithm, public)
    parts = [value[i:i + 255] for i in range(0, len(value), 255)]
    strings = "\n".join(f'    "{part}"' for part in parts)
    return f"{selector}._domainkey.{domain}. IN TXT (\n{strings} )"


def write_key(
    directory: Path, domain: str, selector: str, pem: bytes, owner: tuple[int, int] | None
) -> Path:
    """Store a new key: the domain's directory made 0700, the file created 0600 (never over
    an existing one: FileExistsError), both given ``owner`` (uid, gid) when not None."""
    directory = Path(directory)
    domain_dir = directory / domain
    for made in (directory, domain_dir):
        try:
            os.mkdir(made, 0o700)
        except FileExistsError:
            continue
        if owner is not None:
            os.chown(made, *owner)
    path = key_path(directory, domain, selector)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, pem)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path
