"""
Our own TLS records for ``mailsrv dns`` (pure): what senders need to protect the mail they
send us.

- MTA-STS (RFC 8461), with ``[mta_sts] mode`` "testing" or "enforce": the policy file
  (``version``, ``mode``, one ``mx`` line for this server, ``max_age``) that a web server
  must serve at ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with a certificate for
  that name, the address record of ``mta-sts.<domain>``, and the ``_mta-sts.<domain>`` TXT
  record whose ``id`` is a hash of the policy text, so that it changes exactly when the
  policy does (senders fetch the policy again only when the id changes).
- TLS-RPT (RFC 8460), with ``[tls_reports] rua``: ``_smtp._tls.<domain>``, where senders
  send their daily reports of the TLS they could (or could not) set up with us.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from mailsrv.outbound.mtasts.policy import PolicyError, parse_txt
from mailsrv.outbound.tlsrpt.document import parse_record
from mailsrv.tools.dnsrecords import MISSING, OK, WRONG, Record, Verdict, only_record

__all__ = ["JUDGES", "policy_id", "policy_text", "policy_url", "tls_records"]


def policy_text(mode: str, hostname: str, max_age: int) -> str:
    """The MTA-STS policy file (RFC 8461 §3.2; LF line ends, which §3.2's ABNF allows)."""
    return f"version: STSv1\nmode: {mode}\nmx: {hostname}\nmax_age: {max_age}\n"


def policy_id(text: str) -> str:
    """The ``id`` for a policy text: 20 hex digits of its SHA-256 (1-32 alphanumerics)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def policy_url(domain: str) -> str:
    return f"https://mta-sts.{domain}/.well-known/mta-sts.txt"


def tls_records(
    domain: str, hostname: str, mode: str, max_age: int, rua: Sequence[str],
) -> list[Record]:
    """The MTA-STS records (unless ``mode`` is "none") and the TLS-RPT one (if ``rua``)."""
    records = []
    if mode != "none":
        text = policy_text(mode, hostname, max_age)
        records += [
            Record("MTA-STS", f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id(text)}"),
            Record("STS-WEB", f"mta-sts.{domain}", "A",
                   "<the address of the web server serving the policy over HTTPS>",
                   comment=True),
        ]
    if rua:
        records.append(Record("TLSRPT", f"_smtp._tls.{domain}", "TXT",
                              f"v=TLSRPTv1; rua={','.join(rua)}"))
    return records


def _mta_sts(record: Record, found: list[str], hostname: str) -> Verdict:
    sts = only_record(found, lambda t: t.replace(" ", "").startswith("v=STSv1"),
                      "no MTA-STS record: senders do not look for the policy",
                      "MTA-STS records (senders then use none)")
    if isinstance(sts, Verdict):
        return sts
    want = parse_txt([record.value])
    try:
        have = parse_txt([sts])  # as a sender reads it
    except PolicyError as e:
        return Verdict(WRONG, f'"{sts}": {e} (senders then use no policy)')
    if have != want:
        return Verdict(WRONG, f"id={have}, but the policy now has id={want}: serve the new "
                              "policy file first, then publish the new id")
    return Verdict(OK, sts)


def _tlsrpt(record: Record, found: list[str], hostname: str) -> Verdict:
    rpt = only_record(found, lambda t: t.replace(" ", "").startswith("v=TLSRPTv1"),
                      "no TLS-RPT record: senders do not report their TLS failures",
                      "TLS-RPT records (senders then use none)")
    if isinstance(rpt, Verdict):
        return rpt
    want = set(parse_record([record.value]) or ())
    have = set(parse_record([rpt]) or ())  # the rua a sender would use
    if have != want:
        return Verdict(WRONG, f'"{rpt}": rua is not {",".join(sorted(want))}')
    return Verdict(OK, rpt)


def _web(record: Record, found: list[str], hostname: str) -> Verdict:
    if not found:
        return Verdict(MISSING, f"{record.name} has no A or AAAA record: senders cannot fetch "
                                f"the policy at {policy_url(record.name[len('mta-sts.'):])}")
    return Verdict(OK, ", ".join(found) + " (the HTTPS policy itself is not fetched here)")


#: record kind -> its judge (mailsrv.tools.dnsrecords.judge uses these too).
JUDGES = {"MTA-STS": _mta_sts, "TLSRPT": _tlsrpt, "STS-WEB": _web}
