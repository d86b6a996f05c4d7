"""``mailsrv doctor``'s judgement of the server itself: the configuration, the listeners, the
certificate, the files' permissions (pure: facts in, Findings out; mailsrv.tools.doctor.probe
gathers the facts).

The thresholds are an administrator's: a certificate is renewed 30 days before it ends
(certbot, Let's Encrypt), so 21 days left means a renewal has been failing for over a week
(warning) and 7 days left means mail servers that verify will soon refuse to talk to us
(problem).
"""

from __future__ import annotations

import datetime
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from mailsrv.tools.doctor.findings import OK, PROBLEM, WARNING, Finding

__all__ = [
    "CertFacts", "FileFacts", "ListenerFacts", "CERT_PROBLEM_DAYS", "CERT_WARNING_DAYS",
    "certificate_findings", "config_findings", "listener_finding", "name_matches",
    "permission_finding",
]

CERT_WARNING_DAYS = 21
CERT_PROBLEM_DAYS = 7
_RELOAD = "systemctl reload mailsrv"


# --------------------------------------------------------------------------- configuration


def config_findings(source: str, error: str | None, summary: str = "",
                    warnings: Sequence[str] = ()) -> list[Finding]:
    """``check-config``'s verdict: ``error`` is its ConfigError text (file: key: expected)."""
    if error is not None:
        return [Finding("config", source, PROBLEM, error,
                        "correct the key the message names, then run `mailsrv check-config` "
                        f"until it says ok, and `{_RELOAD}`")]
    found = [Finding("config", source, OK, summary or "valid")]
    for warning in warnings:  # check-config's end with what to do, in parentheses
        detail, fix = warning, ""
        if warning.endswith(")") and " (" in warning:
            detail, _, fix = warning[:-1].rpartition(" (")
        found.append(Finding("config", source, WARNING, detail, fix))
    return found


# --------------------------------------------------------------------------- listeners


@dataclass(frozen=True)
class ListenerFacts:
    """What connecting to one configured listener gave."""

    endpoint: str  # as configured
    kind: str  # "smtp" or "submission"
    address: tuple[str, int] | None  # None: port 0 (the kernel's choice), nothing to connect to
    greeting: str | None = None  # the first reply's text, code included
    error: str | None = None  # why nothing answered


def listener_finding(facts: ListenerFacts) -> Finding:
    subject = f"{facts.kind} {facts.endpoint}"
    if facts.address is None:
        return Finding("listener", subject, WARNING,
                       "port 0: the kernel picks a port at each start, so nothing can be checked",
                       "give the listener a fixed port in the configuration")
    where = f"[{facts.address[0]}]:{facts.address[1]}"
    if facts.error is not None:
        return Finding("listener", subject, PROBLEM, f"nothing answers on {where}: {facts.error}",
                       "start the server (systemctl start mailsrv) and read why it stopped or "
                       "cannot listen: journalctl -u mailsrv")
    greeting = facts.greeting or ""
    if not greeting.startswith("220"):
        return Finding("listener", subject, PROBLEM, f"{where} answers {greeting[:80]!r}, not 220",
                       "the server refuses connections (too many, or shutting down), or another "
                       "program holds the port: ss -ltnp; journalctl -u mailsrv")
    return Finding("listener", subject, OK, f"{where}: {greeting[:80]}")


# --------------------------------------------------------------------------- certificate


@dataclass(frozen=True)
class CertFacts:
    """The certificate file's leaf (``tls.cert``), and what a listener serves."""

    path: str
    not_before: datetime.datetime | None = None  # aware, UTC
    not_after: datetime.datetime | None = None
    names: tuple[str, ...] = ()  # DNS names of the subjectAltName (else the subject's CN)
    error: str | None = None  # the file could not be read or parsed
    fingerprint: str = ""  # SHA-256 of the file's leaf
    served_fingerprint: str | None = None  # what a STARTTLS/TLS listener sent; None: not seen


def name_matches(pattern: str, hostname: str) -> bool:
    """RFC 6125 §6.4.3: exact, or a wildcard as the whole left-most label."""
    pattern, hostname = pattern.lower().rstrip("."), hostname.lower().rstrip(".")
    if pattern == hostname:
        return True
    if pattern.startswith("*.") and "." in hostname:
        return hostname.split(".", 1)[1] == pattern[2:]
    return False


def certificate_findings(facts: CertFacts | None, hostname: str,
                         now: datetime.datetime) -> list[Finding]:
    """Valid now, naming ``hostname``, days left, and the one the server serves."""
    if facts is None:
        return [Finding("certificate", "tls.cert", WARNING,
                        "no certificate: STARTTLS is not offered, so mail to and from other "
                        "servers travels in clear text and submission is off",
                        "get a certificate for the host name (certbot certonly --standalone -d "
                        f"{hostname}) and set [tls] cert and key")]
    subject = facts.path
    renew = f"renew it (certbot renew), copy it where [tls] names it, then `{_RELOAD}`"
    if facts.error is not None or facts.not_after is None or facts.not_before is None:
        return [Finding("certificate", subject, PROBLEM, f"unreadable: {facts.error}",
                        "point [tls] cert at the PEM certificate chain (fullchain.pem)")]
    found = []
    days = (facts.not_after - now).total_seconds() / 86400
    ends = facts.not_after.strftime("%Y-%m-%d %H:%M UTC")
    if facts.not_before > now:
        found.append(Finding("certificate", subject, PROBLEM,
                             f"not valid before {facts.not_before:%Y-%m-%d %H:%M} UTC",
                             "check the system clock (timedatectl), or use the previous "
                             "certificate until then"))
    elif days <= 0:
        found.append(Finding("certificate", subject, PROBLEM, f"expired on {ends}", renew))
    elif days <= CERT_PROBLEM_DAYS:
        found.append(Finding("certificate", subject, PROBLEM,
                             f"expires in {days:.1f} days ({ends})", renew))
    elif days <= CERT_WARNING_DAYS:
        found.append(Finding("certificate", subject, WARNING,
                             f"expires in {days:.0f} days ({ends}): its renewal has not happened",
                             renew + "; see why the renewal failed: journalctl -u certbot"))
    else:
        found.append(Finding("certificate", subject, OK, f"valid until {ends} ({days:.0f} days)"))
    if any(name_matches(name, hostname) for name in facts.names):
        found.append(Finding("certificate", subject, OK, f"names {hostname}"))
    else:
        found.append(Finding("certificate", subject, PROBLEM,
                             f"names {', '.join(facts.names) or 'nothing'}, not {hostname}: "
                             "servers that verify refuse it",
                             f"get a certificate for {hostname} (or set hostname to a name it "
                             "holds)"))
    if facts.served_fingerprint is not None and facts.served_fingerprint != facts.fingerprint:
        found.append(Finding("certificate", subject, WARNING,
                             "the server still serves another certificate than the file's",
                             f"`{_RELOAD}` to load the new one"))
    return found


# --------------------------------------------------------------------------- permissions


@dataclass(frozen=True)
class FileFacts:
    """A file holding a secret (a private key, the users' password hashes, a shared secret)."""

    path: str
    what: str  # "TLS private key", "DKIM key", "users file", ...
    mode: int | None = None  # st_mode; None: missing
    owner: str = ""
    error: str | None = None


def permission_finding(facts: FileFacts) -> Finding:
    """Secrets: readable by no other user (a problem), writable by no group (a warning)."""
    subject = f"{facts.what} {facts.path}"
    if facts.mode is None:
        return Finding("permissions", subject, PROBLEM, f"cannot be examined: {facts.error}",
                       "make it exist and readable by the server's user")
    perms = stat.S_IMODE(facts.mode)
    text = f"mode {perms:04o}, owner {facts.owner}"
    if perms & 0o007:
        return Finding("permissions", subject, PROBLEM,
                       f"{text}: other users can {'read' if perms & 0o004 else 'use'} it",
                       f"chmod o-rwx {facts.path}")
    if perms & 0o020:
        return Finding("permissions", subject, WARNING, f"{text}: its group can change it",
                       f"chmod g-w {facts.path}")
    return Finding("permissions", subject, OK, text)
