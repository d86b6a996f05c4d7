"""
All the authentication checks for one message from another server, in a delivery thread:
SPF, DKIM on every signature, DMARC for each From: domain, the ARC chain.  The result is a fact
(:class:`~mailsrv.checks.auth.results.AuthResults`) that the pure checks of
:mod:`mailsrv.checks.auth.checks` act on (the header field, DMARC's policy, our own domains).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from mailsrv.checks.auth import arccheck, dkimcheck, dmarc, spfcheck
from mailsrv.checks.auth.lookups import ThreadDNS
from mailsrv.checks.auth.results import AuthResults
from mailsrv.message.headsection import HeaderFacts, read_head

__all__ = ["Authenticator", "MAX_FROM_DOMAINS", "from_domains", "is_checked"]

#: From: domains evaluated for DMARC (a From: with more is unusual; the rest is ignored).
MAX_FROM_DOMAINS = 5


def from_domains(head: HeaderFacts) -> tuple[str, ...]:
    """The domains of the From: field's addresses, each once, in order."""
    found = [address.rpartition("@")[2].rstrip(".").lower()
             for field, address in head.originators if field == "From" and "@" in address]
    return tuple(dict.fromkeys(d for d in found if d))


def is_checked(trusted_network: bool, authenticated_as: str | None) -> bool:
    """Whether a client's mail is authenticated here: mail from other servers only.  Our
    own users (AUTH) and networks (relay.trusted_networks) are this domain's mail already;
    as with Postfix and OpenDMARC, their mail gets no Authentication-Results: field."""
    return not trusted_network and authenticated_as is None


class Authenticator:
    """SPF, DKIM, DMARC and ARC through ``dns`` (lookups on the reactor, waited for here).

    ``spf``, ``dkim``, ``dmarc``, ``arc`` turn each check on or off; ``sample`` draws the
    number DMARC's ``pct=`` is compared with (in [0, 100)); ``trusted_sealers`` are the ARC
    sealers whose results vouch for a From: domain (mailsrv.checks.auth.arccheck).
    """

    def __init__(
        self, dns: ThreadDNS, *, spf: bool = True, dkim: bool = True, dmarc: bool = True,
        arc: bool = True, trusted_sealers: tuple[str, ...] = (),
        sample: Callable[[], float] = lambda: random.uniform(0, 100),
    ) -> None:
        self.dns = dns
        self.spf, self.dkim, self.dmarc, self.arc = spf, dkim, dmarc, arc
        self.trusted_sealers = tuple(d.lower().rstrip(".") for d in trusted_sealers)
        self.sample = sample

    def evaluate(
        self, ip: str, helo: str | None, sender: str | None, head: HeaderFacts,
        message_path: Path, spf_known: spfcheck.SPFResult | None = None,
    ) -> AuthResults:
        """The results for the spooled message at ``message_path`` (LF line ends), sent by
        ``ip`` after ``helo`` with envelope sender ``sender`` (None: ``<>``); ``spf_known``:
        SPF for these same three, already checked (before RCPT, for greylisting).  Blocking:
        reads the file and waits for DNS answers; never raises for what it finds."""
        spf = None
        if self.spf:
            spf = spf_known or spfcheck.check_spf(self.dns, ip, sender, helo)
        dkim: tuple[dkimcheck.DKIMResult, ...] = ()
        arc = arccheck.ARCResult("none") if self.arc else None
        if (self.dkim or self.arc) and head.has_header_section:
            with open(message_path, "rb") as spool:
                start = read_head(spool)
                end = start.find(b"\n\n")
                header_section = start if end < 0 else start[: end + 1]
                signed = self.dkim and dkimcheck.signature_count(header_section) > 0
                sealed = self.arc and arccheck.has_arc(header_section)
                if signed or sealed:  # else the body is not read
                    message = start + spool.read()
                    if signed:
                        dkim = dkimcheck.verify_all(message, header_section, self.dns)
                    if sealed:
                        arc = arccheck.verify(message, self.dns)
                    del message
        domains = from_domains(head)
        results: list[dmarc.DMARCResult] = []
        if self.dmarc:
            sample = self.sample()
            for domain in domains[:MAX_FROM_DOMAINS]:
                found = dmarc.find_policy(domain, self.dns.txt)
                results.append(dmarc.evaluate(domain, found, spf, dkim, sample))
        trusted = arc is not None and arc.sealer in self.trusted_sealers
        return AuthResults(
            spf=spf, dkim=dkim, dmarc=tuple(results), from_domains=domains,
            dkim_checked=self.dkim, dmarc_checked=self.dmarc, arc=arc,
            arc_vouched=arccheck.vouched_domains(arc, domains, self.trusted_sealers),
            arc_unsure=trusted and arc is not None and arc.temporary,
        )
