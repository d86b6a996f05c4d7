"""
DNS blocklists and allowlists of client addresses (RFC 5782), as Postfix's postscreen weighs
them: each listing zone adds its weight, a client whose score reaches the threshold is
refused, one listed in an allow zone never is (pure; mailsrv.inbound.blocklists asks the DNS).

The lookups start when the client connects, beside the reverse lookup the banner already
waits for, so a clean client sees no extra delay; the refusal is answered at MAIL, with the
other connection checks (smtpd_delay_reject), so that the log line names the sender too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from zope.interface import implementer

from mailsrv import replies
from mailsrv.checks.pipeline import ACCEPT, Facts, Reject, Stage, Verdict
from mailsrv.interfaces import ICheck

__all__ = ["Listing", "Dnsbl", "is_listing_answer", "query_name", "score"]

#: Answers a list gives to say it refuses the query, not that the address is listed: Spamhaus's
#: 127.255.255.252-255 (a public or unregistered resolver, a typo in the zone).
_ERROR_ANSWERS = ipaddress.ip_network("127.255.255.0/24")
_LISTED = ipaddress.ip_network("127.0.0.0/8")


@dataclass(frozen=True)
class Listing:
    """What the zones said of one client address."""

    #: The blocklist zones that list it, in the configured order.
    zones: tuple[str, ...] = ()
    #: The sum of their weights.
    score: int = 0
    #: An allow zone lists it: it is never refused by a blocklist.
    allowed_by: str | None = None


def query_name(ip: str, zone: str) -> str:
    """The name to ask for: the address's octets (IPv4) or nibbles (IPv6) reversed, then the
    zone (RFC 5782 §2.1, §2.4)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    reverse = address.reverse_pointer  # "4.3.2.1.in-addr.arpa" / "...ip6.arpa"
    return reverse.rsplit(".", 2)[0] + "." + zone


def is_listing_answer(answers: Iterable[str]) -> bool:
    """Whether the A records a zone answered mean "listed": an address in 127.0.0.0/8 (RFC
    5782 §2.3), other than a list's own error codes."""
    for text in answers:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address in _LISTED and address not in _ERROR_ANSWERS:
            return True
    return False


def score(weights: Mapping[str, int], listed_by: Iterable[str],
          allowed_by: str | None = None) -> Listing:
    """The listing of a client from the zones that list it (in ``weights``' order)."""
    found = set(listed_by)
    zones = tuple(zone for zone in weights if zone in found)
    return Listing(zones, sum(weights[zone] for zone in zones), allowed_by)


@implementer(ICheck)
class Dnsbl:
    """Refuse a client whose blocklist score reaches ``threshold`` (``554 5.7.1``, naming the
    zones), unless an allow zone lists it.  Trusted networks and authenticated users are not
    looked up, so never refused."""

    name = "dnsbl"
    stage = Stage.CONNECT

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def check(self, facts: Facts) -> Verdict:
        listing = facts.client.blocklist
        if listing is None or listing.allowed_by is not None or facts.client.may_relay:
            return ACCEPT
        if listing.score < self.threshold:
            return ACCEPT
        reply = replies.DNSBL_LISTED.format(ip=facts.client.ip, zones=", ".join(listing.zones))
        return Reject(reply, reason=f"dnsbl {' '.join(listing.zones)} score {listing.score}")
