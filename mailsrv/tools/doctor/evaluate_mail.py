"""``mailsrv doctor``'s judgement of what the mail depends on: each local domain's DNS records,
our address on the blocklists, the queue, the disk space (pure: facts in, Findings out).

The DNS verdicts are mailsrv.tools.dnsrecords' (what ``mailsrv dns --check`` says); here they
get a level and the fix.  A missing DMARC record is a warning (the mail still goes; it is the
policy for forgeries that is missing); any other missing or wrong record a problem, since the
big providers refuse or file as spam mail from a server without it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from mailsrv.checks.dnsbl import Listing
from mailsrv.tools import dnsrecords, tlsrecords
from mailsrv.tools.dnsrecords import Record, Verdict
from mailsrv.tools.doctor.findings import OK, PROBLEM, WARNING, Finding

__all__ = ["DiskFacts", "QueueFacts", "blocklist_findings", "dane_resolver_finding", "disk_finding",
           "dns_finding", "queue_findings", "age"]

#: Free space (of the size, blocks and inodes alike) under which the disk is a warning, a problem.
DISK_WARNING, DISK_PROBLEM = 0.10, 0.05
#: A queue whose oldest message waited this long, or this many messages, is a warning.
QUEUE_OLD_SECONDS, QUEUE_MANY = 86400.0, 1000


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# --------------------------------------------------------------------------- DNS


def _addresses_in(text: str) -> list[str]:
    """The IP addresses a PTR verdict names ("192.0.2.1=name, ..." or "no PTR for ...")."""
    found: list[str] = []
    for word in text.replace(",", " ").split():
        candidate = word.partition("=")[0].rstrip(":")
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if candidate not in found:
            found.append(candidate)
    return found


def dns_finding(record: Record, verdict: Verdict, hostname: str) -> Finding:
    subject = f"{record.kind} {record.name}"
    if verdict.status == dnsrecords.OK:
        return Finding("dns", subject, OK, verdict.detail)
    if verdict.status == dnsrecords.UNKNOWN:
        return Finding("dns", subject, WARNING, verdict.detail,
                       "check that the servers in relay.dns_servers (else /etc/resolv.conf) "
                       f"answer: dig {record.name} {record.rtype}")
    level = WARNING if (record.kind, verdict.status) == ("DMARC", dnsrecords.MISSING) else PROBLEM
    if record.kind in tlsrecords.JUDGES:
        level = WARNING  # MTA-STS, TLS-RPT: the mail flows; the policy is not in effect
    if record.kind == "PTR":
        which = ", ".join(_addresses_in(verdict.detail))
        if not which:
            fix = f"publish an A record for {hostname} first; then set its address's PTR"
        else:
            fix = (f"ask whoever owns {which} (your hosting provider: \"reverse DNS\" in its "
                   f"control panel) to set its PTR record to {hostname}, which must keep "
                   "resolving to that address (forward-confirmed)")
    elif record.kind == "STS-WEB":
        fix = (f"publish an A (and AAAA) record for {record.name}: the web server serving "
               f"{tlsrecords.policy_url(record.name[len('mta-sts.'):])} "
               "(mailsrv dns DOMAIN --mta-sts-policy prints the file)")
    elif record.kind == "A":
        fix = (f"publish an A record (and an AAAA record for IPv6) for {hostname} with this "
               "server's public address")
    else:
        fix = "publish: " + dnsrecords.zone_text([record]).rstrip("\n")
    return Finding("dns", subject, level, verdict.detail, fix)


def dane_resolver_finding(servers: str, secure: bool | None) -> Finding:
    """With relay.dane: whether the resolvers it trusts validate DNSSEC, told by the AD bit
    of their answer about the root zone (signed since 2010).  Without it DANE never applies:
    mail still goes, unprotected, hence a warning."""
    subject = f"relay.dns_servers {servers}"
    if secure:
        return Finding("dane", subject, OK, "validating: the AD bit is set for the root zone")
    if secure is None:
        return Finding("dane", subject, WARNING, "no answer about the root zone",
                       "check that the servers in relay.dns_servers answer: dig . NS +dnssec")
    return Finding("dane", subject, WARNING,
                   "not validating: no AD bit for the root zone, so relay.dane never applies",
                   "point relay.dns_servers at a DNSSEC-validating resolver (e.g. unbound on "
                   "127.0.0.1), or set relay.dane = false")


# --------------------------------------------------------------------------- blocklists


def blocklist_findings(listings: Mapping[str, Listing], zones: Mapping[str, int],
                       threshold: int) -> list[Finding]:
    """One finding per address of ours: listed by any configured zone is a problem (other
    servers using the same list refuse our mail, whatever our own threshold)."""
    found = []
    for address, listing in listings.items():
        subject = address
        if listing.zones:
            found.append(Finding(
                "dnsbl", subject, PROBLEM,
                f"listed by {', '.join(listing.zones)} (score {listing.score}, our own "
                f"threshold {threshold})",
                "find out why (an open relay, a compromised account sending spam: mailsrv queue "
                "list, journalctl -u mailsrv), stop it, then ask each list to delist "
                f"{address} on its web site"))
        else:
            found.append(Finding("dnsbl", subject, OK, f"not listed by {', '.join(zones)}"))
    return found


# --------------------------------------------------------------------------- queue


@dataclass(frozen=True)
class QueueFacts:
    path: str
    messages: int = 0
    waiting: int = 0  # recipients still queued
    oldest: float | None = None  # creation time of the oldest message
    #: (last error, recipients deferred with it), most frequent first
    reasons: tuple[tuple[str, int], ...] = ()
    corrupt: int = 0  # files set aside in corrupt/
    error: str | None = None


def queue_findings(facts: QueueFacts, now: float, max_age: float) -> list[Finding]:
    subject = facts.path
    if facts.error is not None:
        return [Finding("queue", subject, PROBLEM, f"cannot be read: {facts.error}",
                        "run the doctor as root or as the server's user (runuser -u mailsrv)")]
    found = []
    if facts.messages == 0 or facts.oldest is None:
        found.append(Finding("queue", subject, OK, "empty"))
    else:
        waited = now - facts.oldest
        detail = (f"{facts.messages} message(s), {facts.waiting} recipient(s) waiting, the "
                  f"oldest for {age(waited)}")
        if facts.reasons:
            detail += "; deferred: " + "; ".join(f"{n}x {reason[:160]}"
                                                 for reason, n in facts.reasons[:3])
        if waited > max_age + 3600:
            found.append(Finding("queue", subject, PROBLEM,
                                 detail + f": older than queue.max_age ({age(max_age)})",
                                 "the server is not working through its queue: is it running? "
                                 "journalctl -u mailsrv"))
        elif waited > QUEUE_OLD_SECONDS or facts.messages >= QUEUE_MANY:
            found.append(Finding("queue", subject, WARNING, detail,
                                 "see why in the deferred reasons (mailsrv queue list), mend "
                                 "the cause, then mailsrv queue flush"))
        else:
            found.append(Finding("queue", subject, OK, detail))
    if facts.corrupt:
        found.append(Finding("queue", f"{subject}/corrupt", WARNING,
                             f"{facts.corrupt} file(s) set aside as corrupt at start-up",
                             f"read them, then remove them: ls -l {subject}/corrupt"))
    return found


# --------------------------------------------------------------------------- disk


@dataclass(frozen=True)
class DiskFacts:
    """One filesystem (from statvfs) and what of ours is on it."""

    paths: tuple[str, ...]  # "queue.path /var/spool/mailsrv", ...
    size: int = 0  # bytes (f_blocks * f_frsize)
    available: int = 0  # bytes an unprivileged user may use (f_bavail * f_frsize)
    files: int = 0  # inodes (f_files; 0 on filesystems without a fixed number)
    files_available: int = 0  # f_favail
    error: str | None = None


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def disk_finding(facts: DiskFacts, max_message_size: int) -> Finding:
    """Free space and inodes against the filesystem's own size: under 5 % (or less room than
    one message of the largest size we accept) is a problem, under 10 % a warning."""
    subject = " and ".join(facts.paths)
    if facts.error is not None:
        return Finding("disk", subject, PROBLEM, f"cannot be examined: {facts.error}",
                       "make the directory exist (the server creates it at start-up)")
    fix = ("free space there (old mail, logs: du -xsh on it) or grow the filesystem; while it "
           "is full, mail is refused with 452 4.3.1 and the queue cannot be written")
    share = facts.available / facts.size if facts.size else 0.0
    inodes = facts.files_available / facts.files if facts.files else 1.0
    detail = (f"{_mib(facts.available)} of {_mib(facts.size)} free ({share:.0%})"
              + (f", {facts.files_available} of {facts.files} inodes ({inodes:.0%})"
                 if facts.files else ""))
    if share < DISK_PROBLEM or facts.available < max_message_size or inodes < DISK_PROBLEM:
        if facts.available < max_message_size:
            detail += f": not room for one message of smtp.max_message_size ({_mib(max_message_size)})"
        return Finding("disk", subject, PROBLEM, detail, fix)
    if share < DISK_WARNING or inodes < DISK_WARNING:
        return Finding("disk", subject, WARNING, detail, fix)
    return Finding("disk", subject, OK, detail)
