"""
All the authentication checks for one message from another server, in a delivery thread:
SPF, DKIM on every signature, DMARC for each From: domain.  The result is a fact
(:class:`~mailsrv.checks.auth.results.AuthResults`) that the pure checks of
:mod:`mailsrv.checks.auth.checks` act on (the header field, DMARC's policy, our own domains).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from mailsrv.checks.auth import dkimcheck, dmarc, spfcheck
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
    """SPF, DKIM and DMARC through ``dns`` (lookups on the reactor, waited for here).

    ``spf``, ``dkim``, ``dmarc`` turn each check on or off; ``sample`` draws the number DMARC's
    ``pct=`` is compared with (in [0, 100)).
    """

    def __init__(
        self, dns: ThreadDNS, *, spf: bool = True, dkim: bool = True, dmarc: bool = True,
        sample: Callable[[], float] = lambda: random.uniform(0, 100),
    ) -> None:
        self.dns = dns
        self.spf, self.dkim, self.dmarc = spf, dkim, dmarc
        self.sample = sample

    def evaluate(
        self, ip: str, helo: str | None, sender: str | None, head: HeaderFacts,
        message_path: Path,
    ) -> AuthResults:
        """The results for the spooled message at ``message_path`` (LF line ends), sent by
        ``ip`` after ``helo`` with envelope sender ``sender`` (None: ``<>``).  Blocking:
        reads the file and waits for DNS answers; never raises for what it finds."""
        spf = spfcheck.check_spf(self.dns, ip, sender, helo) if self.spf else None
        dkim: tuple[dkimcheck.DKIMResult, ...] = ()
        if self.dkim and head.has_header_section:
            with open(message_path, "rb") as spool:
                start = read_head(spool)
                end = start.find(b"\n\n")
                header_section = start if end < 0 else start[: end + 1]
                if dkimcheck.signature_count(header_section):  # else the body is not read
                    message = start + spool.read()
                    dkim = dkimcheck.verify_all(message, header_section, self.dns)
        domains = from_domains(head)
        results: list[dmarc.DMARCResult] = []
        if self.dmarc:
            sample = self.sample()
            for domain in domains[:MAX_FROM_DOMAINS]:
                found = dmarc.find_policy(domain, self.dns.txt)
                results.append(dmarc.evaluate(domain, found, spf, dkim, sample))
        return AuthResults(
            spf=spf, dkim=dkim, dmarc=tuple(results), from_domains=domains,
            dkim_checked=self.dkim, dmarc_checked=self.dmarc,
        )
