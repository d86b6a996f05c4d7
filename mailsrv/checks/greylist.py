"""
Greylisting (as postgrey does it): the first delivery attempt of an unknown (client network,
sender, recipient) triplet is deferred with ``451 4.7.1``; a real mail server retries, and a
retry after ``delay`` passes and is remembered; a client network that passed ``auto_allow``
times is let through for every sender.  Much spam software never retries (pure; the memory
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
from mailsrv.checks.pipeline import ACCEPT, Facts, Stage, TempFail, Verdict
from mailsrv.interfaces import ICheck

if TYPE_CHECKING:
    from mailsrv.storage.greylist import Greylist

__all__ = ["Greylisting", "Triplet", "Triplets", "client_network", "triplet"]

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

    def __init__(self, store: Callable[[], Greylist | None], delay: float, auto_allow: int) -> None:
        self.store = store
        self.delay = delay
        self.auto_allow = auto_allow

    def check(self, facts: Facts) -> Verdict:
        client, store = facts.client, self.store()
        if store is None or client.may_relay:
            return ACCEPT
        if client.blocklist is not None and client.blocklist.allowed_by is not None:
            return ACCEPT
        assert facts.recipient is not None
        key = triplet(client.ip, str(facts.sender) if facts.sender else None,
                      str(facts.recipient))
        if self.auto_allow and store.client_passes(key[0]) >= self.auto_allow:
            return ACCEPT
        wait = store.attempt(key, self.delay)
        if wait <= 0:
            return ACCEPT
        seconds = math.ceil(wait)
        return TempFail(replies.GREYLISTED.format(seconds=str(seconds)),
                        reason=f"greylisted for {seconds} s")
