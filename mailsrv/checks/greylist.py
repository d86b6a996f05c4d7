"""
Greylisting (as postgrey does it): the first delivery attempt of an unknown (client network,
sender, recipient) triplet is deferred with ``451 4.7.1``; a real mail server retries, and a
retry after ``delay`` passes and is remembered; a client network that passed ``auto_allow``
times is let through for every sender, and so is a sender in one of the big providers'
domains (``spf_pass_domains``) whose SPF passes: they retry late, from other addresses, and
what they send is seldom spam software's.  Much spam software never retries (pure; the memory
of triplets is mailsrv.storage.greylist).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zope.interface import implementer

from mailsrv import replies
from mailsrv.checks.pipeline import ACCEPT, Client, Facts, Stage, TempFail, Verdict
from mailsrv.interfaces import ICheck

if TYPE_CHECKING:
    from mailsrv.storage.greylist import Greylist

__all__ = [
    "Greylisting", "Triplet", "Triplets", "client_network", "exempt", "in_domains", "triplet",
    "wants_sender_spf",
]

Triplet = tuple[str, str, str]  # (client network, sender, recipient)


def client_network(ip: str) -> str:
    """The client's /24 (IPv4) or /64 (IPv6): a sending farm retries from another address of
    the same network, which must not start the wait again."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def triplet(ip: str, sender: str | None, recipient: str) -> Triplet:
    return (client_network(ip), (sender or "").lower(), recipient.lower())


def in_domains(sender: str | None, domains: tuple[str, ...]) -> bool:
    """The sender's domain is one of ``domains`` or below one (``mail.yahoo.com``)."""
    if not sender or "@" not in sender:
        return False
    domain = sender.rpartition("@")[2].lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d) for d in domains)


def exempt(client: Client) -> bool:
    """Never greylisted: authenticated users, trusted networks, allowlisted clients."""
    return client.may_relay or (client.blocklist is not None
                                and client.blocklist.allowed_by is not None)


def wants_sender_spf(client: Client, sender: str | None, domains: tuple[str, ...]) -> bool:
    """Whether SPF must be known at RCPT: only for a sender the SPF skip could let through."""
    return not exempt(client) and in_domains(sender, domains)


@dataclass
class Triplets:
    """What is remembered of one triplet: when it was first seen, when it last passed (0:
    never), and how often it passed."""

    first_seen: float
    last_passed: float = 0.0
    passes: int = 0


@implementer(ICheck)
class Greylisting:
    """The RCPT check.  Authenticated users, trusted networks and clients an allowlist zone
    ([dnsbl] allow_zones) lists are never greylisted."""

    name = "greylist"
    stage = Stage.RCPT

    def __init__(
        self, store: Callable[[], Greylist | None], delay: float, auto_allow: int,
        spf_pass_domains: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.delay = delay
        self.auto_allow = auto_allow
        self.spf_pass_domains = spf_pass_domains

    def check(self, facts: Facts) -> Verdict:
        client, store = facts.client, self.store()
        if store is None or exempt(client):
            return ACCEPT
        assert facts.recipient is not None
        sender = str(facts.sender) if facts.sender else None
        if facts.sender_spf == "pass" and in_domains(sender, self.spf_pass_domains):
            return ACCEPT
        key = triplet(client.ip, sender, str(facts.recipient))
        if self.auto_allow and store.client_passes(key[0]) >= self.auto_allow:
            return ACCEPT
        wait = store.attempt(key, self.delay)
        if wait <= 0:
            return ACCEPT
        seconds = math.ceil(wait)
        return TempFail(replies.GREYLISTED.format(seconds=str(seconds)),
                        reason=f"greylisted for {seconds} s")
