"""``mailsrv doctor``'s look at this machine: the configuration (check-config itself), the
listeners (a real SMTP greeting, and the certificate a TLS listener serves), the certificate
file, the queue, the filesystems, the secret files.  Plain blocking I/O, each network step
with a time limit: this is a command, not the server.  The DNS is mailsrv.tools.doctor.probe_dns's.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pwd
import socket
import ssl
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

from mailsrv.config import Config, ConfigError, endpoint_options, load_config
from mailsrv.tools.cli_queue import queued_messages
from mailsrv.tools.doctor.evaluate import CertFacts, FileFacts, ListenerFacts
from mailsrv.tools.doctor.evaluate_mail import DiskFacts, QueueFacts

__all__ = ["certificate", "configuration", "disks", "listener", "queue_state", "secret_files"]

#: Seconds to connect to a listener and for each of its replies.
LISTENER_TIMEOUT = 10.0


def configuration(path: str) -> tuple[Config | None, str | None, str, tuple[str, ...]]:
    """(the loaded Config or None, check-config's error or None, its summary, its warnings)."""
    from mailsrv.tools.checkconfig import check_config

    try:
        config = load_config(path)
    except ConfigError as e:
        return None, str(e), "", ()
    try:
        result = check_config(path)
    except ConfigError as e:
        return config, str(e), "", ()
    summary = (f"valid (hostname {config.hostname}; local domains "
               f"{', '.join(config.domains.local)})")
    return config, None, summary, result.warnings


# --------------------------------------------------------------------------- listeners


def _reply(stream: BinaryIO) -> str:
    lines = []
    while True:
        line = stream.readline(4096)
        if not line:
            raise ConnectionError("connection closed: " + (" / ".join(lines) or "no greeting"))
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text)
        if text[3:4] != "-":
            return "\n".join(lines)


def _fingerprint(der: bytes | None) -> str | None:
    return hashlib.sha256(der).hexdigest() if der else None


def _unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate is judged from its file, not here
    return context


def listener(endpoint: str, kind: str, tls: bool) -> tuple[ListenerFacts, str | None]:
    """Connect to one configured listener as a client would: (what it answered, the SHA-256
    of the certificate it served over implicit TLS or STARTTLS, or None)."""
    scheme, options = endpoint_options(endpoint)
    port = int(options.get("port", "0"))
    if port == 0:
        return ListenerFacts(endpoint, kind, None), None
    interface = options.get("interface", "")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(interface, interface)
    try:
        sock = socket.create_connection((host, port), timeout=LISTENER_TIMEOUT)
    except OSError as e:
        return ListenerFacts(endpoint, kind, (host, port), error=str(e)), None
    served = None
    try:
        if scheme == "ssl":
            sock = _unverified().wrap_socket(sock)
            served = _fingerprint(sock.getpeercert(binary_form=True))
        stream = sock.makefile("rb")
        greeting = _reply(stream)
        if greeting.startswith("220") and tls and scheme != "ssl":
            sock.sendall(b"EHLO doctor.invalid\r\n")
            if "STARTTLS" in _reply(stream).upper():
                sock.sendall(b"STARTTLS\r\n")
                if _reply(stream).startswith("220"):
                    sock = _unverified().wrap_socket(sock)
                    served = _fingerprint(sock.getpeercert(binary_form=True))
                    stream = sock.makefile("rb")
        sock.sendall(b"QUIT\r\n")
    except (OSError, ssl.SSLError, ConnectionError) as e:
        return ListenerFacts(endpoint, kind, (host, port), error=str(e)), None
    finally:
        sock.close()
    return ListenerFacts(endpoint, kind, (host, port), greeting=greeting.split("\n")[0]), served


# --------------------------------------------------------------------------- certificate


def _utc(cert: Any, name: str) -> datetime.datetime:
    value = getattr(cert, f"{name}_utc", None)  # cryptography >= 42; bookworm's 38 has not
    if value is None:
        value = getattr(cert, name).replace(tzinfo=datetime.timezone.utc)
    return value


def certificate(path: Path) -> CertFacts:
    """The first certificate of the PEM file (the leaf of a fullchain.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        return CertFacts(str(path), error=str(e))
    try:
        names = tuple(cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return CertFacts(str(path), _utc(cert, "not_valid_before"), _utc(cert, "not_valid_after"),
                     names, fingerprint=hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest())


# --------------------------------------------------------------------------- queue, disk


def queue_state(qdir: Path) -> QueueFacts:
    try:
        messages = queued_messages(qdir)
        corrupt = len(os.listdir(qdir / "corrupt")) if (qdir / "corrupt").is_dir() else 0
    except OSError as e:
        return QueueFacts(str(qdir), error=str(e))
    waiting = [r for m in messages for r in m.recipients if r.status == "queued"]
    reasons = Counter(r.last_error for r in waiting if r.last_error)
    return QueueFacts(str(qdir), len(messages), len(waiting),
                      min((m.created for m in messages), default=None),
                      tuple(reasons.most_common()), corrupt)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disks(places: list[tuple[str, Path]]) -> list[DiskFacts]:
    """One DiskFacts per filesystem holding one of ``places`` ((key, path), a path not yet
    made counting for its nearest existing parent)."""
    found: dict[int, tuple[list[str], os.statvfs_result]] = {}
    errors = []
    for key, path in places:
        label = f"{key} {path}"
        try:
            where = _existing(Path(path))
            device = os.stat(where).st_dev
            if device not in found:
                found[device] = ([], os.statvfs(where))
            found[device][0].append(label)
        except OSError as e:
            errors.append(DiskFacts((label,), error=str(e)))
    return [DiskFacts(tuple(labels), s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize,
                      s.f_files, s.f_favail) for labels, s in found.values()] + errors


# --------------------------------------------------------------------------- secret files


def _users_hold_passwords(path: Path) -> bool:
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return True  # unknown: judge it as a secret
    return any(line.partition(":")[2].strip() for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


def _facts(path: Path, what: str) -> FileFacts:
    try:
        st = os.stat(path)
    except OSError as e:
        return FileFacts(str(path), what, error=str(e))
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return FileFacts(str(path), what, st.st_mode, owner)


def secret_files(config: Config) -> list[FileFacts]:
    """The TLS key, the DKIM keys, the users file when it holds password hashes, the SRS
    secret and the smarthost password."""
    files = []
    if config.tls.key is not None:
        files.append(_facts(Path(config.tls.key), "TLS key"))
    if config.dkim.enabled and config.dkim.directory.is_dir():
        for key in sorted(config.dkim.directory.glob("*/*.key")):
            files.append(_facts(key, "DKIM key"))
    users = config.mailboxes.users
    if users is not None and _users_hold_passwords(Path(users)):
        files.append(_facts(Path(users), "users file (password hashes)"))
    for path, what in ((config.srs.secret_file, "SRS secret"),
                       (config.relay.smarthost_password_file, "smarthost password")):
        if path is not None:
            files.append(_facts(Path(path), what))
    return files
