"""
The TLS-RPT report itself (RFC 8460), pure: the ``_smtp._tls`` record read (§3), the JSON
report of one policy domain's period (§4), its gzip file's name (§5.1), and the mail that
carries it (§5.3).
"""

from __future__ import annotations

import datetime
import email.utils
import gzip
import json
from collections.abc import Sequence
from email import policy
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from mailsrv.outbound.tlsrpt.counts import PolicyTally

__all__ = ["build_report", "file_name", "gzipped", "parse_record", "report_message"]

#: At most this many rua URIs of a record are used (a record listing hundreds must not make
#: us send hundreds of reports).
MAX_RUA = 5
#: The media type of a gzipped report (§6.4); also the POST's Content-Type (§5.4).
MEDIA_TYPE = "application/tlsrpt+gzip"


def parse_record(texts: Sequence[str]) -> list[str] | None:
    """The rua URIs of a domain's ``_smtp._tls`` TXT records (each record's strings joined),
    or None when there is no valid record: none starts with ``v=TLSRPTv1``, or more than one
    does (§3: then none is used), or it has no ``rua``.  Only ``mailto:`` and ``https:``
    URIs are kept (the others are unknown schemes, §3), the first :data:`MAX_RUA` of them."""
    records = [t for t in texts if t.replace(" ", "").startswith("v=TLSRPTv1;")
               or t.strip() == "v=TLSRPTv1"]
    if len(records) != 1:
        return None
    fields = [f.strip() for f in records[0].split(";")]
    rua = [f[4:].strip() for f in fields if f.lower().replace(" ", "").startswith("rua=")]
    if not rua:
        return None
    uris = [u.strip() for u in rua[0].split(",") if u.strip()]
    kept = [u for u in uris if u.lower().startswith(("mailto:", "https:"))]
    return kept[:MAX_RUA] or None


def _datetime(seconds: float) -> str:
    when = datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    *, organization: str, contact: str, report_id: str, since: float, until: float,
    tallies: Sequence[PolicyTally],
) -> dict:
    """The report of one policy domain's ``tallies`` (§4.4) as JSON data."""
    policies = []
    for tally in tallies:
        key = tally.key
        applied: dict = {"policy-type": key.policy_type, "policy-domain": key.domain}
        if key.policy_string:
            applied["policy-string"] = list(key.policy_string)
        if key.mx_host_patterns:
            applied["mx-host"] = list(key.mx_host_patterns)
        entry: dict = {"policy": applied, "summary": {
            "total-successful-session-count": tally.successes,
            "total-failure-session-count": tally.failures}}
        details = []
        for (result_type, mx, ip, reason), count in sorted(tally.details.items()):
            detail: dict = {"result-type": result_type, "failed-session-count": count}
            if mx:
                detail["receiving-mx-hostname"] = mx
            if ip:  # none when no connection was made (DANE: the TLSA lookups failed)
                detail["receiving-ip"] = ip
            if reason:
                detail["failure-reason-code"] = reason
            details.append(detail)
        if details:
            entry["failure-details"] = details
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _datetime(since), "end-datetime": _datetime(until)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def gzipped(report: dict) -> bytes:
    """The report as a gzip file (mtime 0: the same report, the same bytes)."""
    return gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)


def file_name(submitter: str, domain: str, since: float, until: float) -> str:
    """§5.1: ``submitter!policy-domain!begin!end.json.gz`` (Unix times)."""
    return f"{submitter}!{domain}!{int(since)}!{int(until)}.json.gz"


def report_message(
    *, hostname: str, to: str, domain: str, report_id: str, data: bytes, since: float,
    until: float, now: float, message_id: str,
) -> bytes:
    """The mail of §5.3 carrying the gzipped ``data`` (LF line ends, as spool files have)."""
    message = MIMEMultipart("report")
    message.set_param("report-type", "tlsrpt")
    message["From"] = f"TLS reports <MAILER-DAEMON@{hostname}>"
    message["To"] = f"<{to}>"
    message["Subject"] = f"Report Domain: {domain} Submitter: {hostname} Report-ID: <{report_id}>"
    message["Date"] = email.utils.formatdate(now, localtime=False)
    message["Message-ID"] = f"<{message_id}.tlsrpt@{hostname}>"
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = hostname
    message["Auto-Submitted"] = "auto-generated"
    text = (f"This is an aggregate TLS report (RFC 8460) from {hostname} about the mail it\n"
            f"sent to {domain} from {_datetime(since)} to {_datetime(until)}.\n")
    message.attach(MIMEText(text, "plain", "us-ascii"))
    part = MIMEApplication(data, "tlsrpt+gzip")
    part.add_header("Content-Disposition", "attachment",
                    filename=file_name(hostname, domain, since, until))
    message.attach(part)
    return message.as_bytes(policy=policy.SMTP.clone(linesep="\n"))
