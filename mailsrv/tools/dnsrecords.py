"""
The DNS records a mail domain needs, and a verdict on what is published (pure).

``mailsrv dns DOMAIN`` prints them, ``mailsrv dns --check DOMAIN`` compares them with what the
DNS says (mailsrv.tools.cli_dns does the lookups).  What a receiver checks, and so what is
needed: an MX naming this server; its host name's address, and the reverse (PTR) of that
address naming it back (the big providers refuse mail from an address without matching
reverse DNS); one SPF record allowing this server; each DKIM selector's public key; a DMARC
record, at first ``p=none`` with aggregate reports to the postmaster, to be tightened once
the reports show every legitimate source signs.  Tag-value records (DKIM, DMARC) are read
with dkimpy's parser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dkim.util import InvalidTagValueList, parse_tag_value

__all__ = ["Record", "Verdict", "judge", "needed_records", "only_record", "zone_text"]

#: What --check says of a record.
OK, MISSING, WRONG, UNKNOWN = "ok", "missing", "wrong", "unknown"


@dataclass(frozen=True)
class Record:
    """One record to publish.  ``kind`` says how it is judged; ``value`` is the zone file's
    data (a TXT record's text unquoted); a record we cannot know (this server's public
    address, its PTR, which the address's owner publishes) is printed as a comment."""

    kind: str  # "MX", "A", "PTR", "SPF", "DKIM", "DMARC"; mailsrv.tools.tlsrecords' kinds
    name: str  # owner name, without the final dot
    rtype: str
    value: str
    comment: bool = False
    #: DKIM: the public key (``p=``) that must be published; others: unused.
    key: str = ""


@dataclass(frozen=True)
class Verdict:
    status: str  # OK, MISSING, WRONG or UNKNOWN (the lookup failed)
    detail: str = ""


def needed_records(
    domain: str, hostname: str, dkim: Sequence[tuple[str, str, str]] = (),
) -> list[Record]:
    """Every record ``domain`` needs with this server, ``hostname``, as its MX; ``dkim`` is
    (selector, algorithm, public key) of each signing key of the domain."""
    records = [
        Record("MX", domain, "MX", f"10 {hostname}."),
        Record("A", hostname, "A", "<this server's public IPv4 address>", comment=True),
        Record("PTR", hostname, "PTR",
               f"{hostname}.  (set by whoever owns the address: your provider)", comment=True),
        Record("SPF", domain, "TXT", "v=spf1 mx -all"),
    ]
    for selector, algorithm, public in dkim:
        records.append(Record("DKIM", f"{selector}._domainkey.{domain}", "TXT",
                              f"v=DKIM1; k={algorithm}; p={public}", key=public))
    records.append(Record("DMARC", f"_dmarc.{domain}", "TXT",
                          f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}"))
    return records


def _txt(value: str) -> str:
    """A TXT record's text as zone-file strings of at most 255 octets (RFC 1035)."""
    parts = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    if len(parts) == 1:
        return f'"{parts[0]}"'
    return "(\n" + "\n".join(f'    "{part}"' for part in parts) + " )"


def zone_text(records: Sequence[Record]) -> str:
    """The records in zone-file form, one after the other."""
    lines = []
    for record in records:
        value = _txt(record.value) if record.rtype == "TXT" else record.value
        # A PTR record belongs to the address (looked up from the host name's A/AAAA).
        owner = "<that address>.in-addr.arpa" if record.kind == "PTR" else f"{record.name}."
        line = f"{owner} IN {record.rtype} {value}"
        lines.append(f"; {line}" if record.comment else line)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- judging


def _tags(text: str) -> dict[bytes, bytes] | None:
    try:
        return parse_tag_value(text.encode("utf-8", "replace"))
    except InvalidTagValueList:
        return None


def judge(record: Record, found: Sequence[str] | None, hostname: str) -> Verdict:
    """What is published for ``record``: ``found`` is the answer to its lookup (MX: the
    exchanges' names; TXT: each record's text, its strings joined; A: the addresses; PTR:
    the names each address points back to), None when the lookup itself failed."""
    if found is None:
        return Verdict(UNKNOWN, "the DNS did not answer (timeout or SERVFAIL)")
    from mailsrv.tools.tlsrecords import JUDGES  # MTA-STS, TLS-RPT (it imports this module)

    judges = {**_JUDGES, **JUDGES}
    return judges[record.kind](record, list(found), hostname.lower())


def _mx(record: Record, found: list[str], hostname: str) -> Verdict:
    names = [name.lower().rstrip(".") for name in found]
    if not names:
        return Verdict(MISSING, "no MX record: mail would go to the domain's own address")
    if hostname in names:
        return Verdict(OK, "MX " + ", ".join(names))
    return Verdict(WRONG, f"MX {', '.join(names)}: none is {hostname}")


def _address(record: Record, found: list[str], hostname: str) -> Verdict:
    if not found:
        return Verdict(MISSING, f"{hostname} has no A or AAAA record")
    return Verdict(OK, ", ".join(found))


def _ptr(record: Record, found: list[str], hostname: str) -> Verdict:
    # ``found``: "address=name" per address of the host name ("address=" for none).
    if not found:
        return Verdict(MISSING, f"{hostname} has no address to look up")
    bad = [entry for entry in found if entry.partition("=")[2].lower().rstrip(".") != hostname]
    if not bad:
        return Verdict(OK, ", ".join(found))
    if all(not entry.partition("=")[2] for entry in bad):
        return Verdict(MISSING, "no PTR for " + ", ".join(e.partition("=")[0] for e in bad))
    return Verdict(WRONG, ", ".join(bad) + f": should name {hostname}")


def only_record(
    found: list[str], is_it: Callable[[str], bool], missing: str, several: str
) -> str | Verdict:
    """The one TXT record of ``found`` that ``is_it``; else the verdict: MISSING (``missing``)
    when there is none, WRONG when there are several (``several``, after their count), which
    readers of every such record (SPF, DMARC, MTA-STS, TLS-RPT) take as none."""
    matching = [text for text in found if is_it(text)]
    if not matching:
        return Verdict(MISSING, missing)
    if len(matching) > 1:
        return Verdict(WRONG, f"{len(matching)} {several}")
    return matching[0]


def _spf(record: Record, found: list[str], hostname: str) -> Verdict:
    spf = only_record(
        found, lambda t: t.lower() == "v=spf1" or t.lower().startswith("v=spf1 "),
        "no SPF record: receivers cannot tell your mail from forgeries",
        "SPF records (a permanent error for every receiver)")
    if isinstance(spf, Verdict):
        return spf
    terms = [term.lower() for term in spf.split()[1:]]
    if "+all" in terms or "all" in terms:
        return Verdict(WRONG, f'"{spf}" allows any server to send as the domain')
    if not any(t.endswith("all") or t.startswith("redirect=") for t in terms):
        return Verdict(WRONG, f'"{spf}" ends without -all or ~all')
    ours = {"mx", "+mx", f"a:{hostname}", f"+a:{hostname}"}
    if record.name.lower() == hostname:
        ours |= {"a", "+a"}
    if ours & set(terms):
        return Verdict(OK, spf)
    if any(t.lstrip("+").startswith(("include:", "redirect=", "ip4:", "ip6:")) for t in terms):
        return Verdict(OK, f"{spf} (its include:/redirect=/ip4:/ip6: not checked: make sure "
                           "they cover this server's address)")
    return Verdict(WRONG, f'"{spf}" does not name this server (mx, or a:{hostname})')


def _dkim(record: Record, found: list[str], hostname: str) -> Verdict:
    if not found:
        return Verdict(MISSING, "no key published: receivers cannot verify the signatures")
    for text in found:
        tags = _tags(text)
        if tags is not None and tags.get(b"p", b"").replace(b" ", b"").decode() == record.key:
            return Verdict(OK, "the key matches")
    return Verdict(WRONG, "a different key is published: " + found[0][:60])


def _dmarc(record: Record, found: list[str], hostname: str) -> Verdict:
    dmarc = only_record(
        found, lambda t: t.replace(" ", "").lower().startswith("v=dmarc1"),
        "no DMARC record: receivers apply no policy to forgeries",
        "DMARC records (receivers ignore them all)")
    if isinstance(dmarc, Verdict):
        return dmarc
    tags = _tags(dmarc)
    if tags is None or tags.get(b"p", b"").lower() not in (b"none", b"quarantine", b"reject"):
        return Verdict(WRONG, f'"{dmarc}": p= must be none, quarantine or reject')
    return Verdict(OK, dmarc)


_JUDGES = {"MX": _mx, "A": _address, "PTR": _ptr, "SPF": _spf, "DKIM": _dkim,
           "DMARC": _dmarc}
