"""
DNS for code that runs in a delivery thread (SPF, DKIM, DMARC), through the server's own
twisted.names resolver.

pyspf and dkimpy are blocking libraries: they ask for a record and wait for it.  They run in a
delivery thread, so the thread may wait, but the lookup itself must go through the resolver
built from ``relay.dns_servers`` (never the system's resolver, never a second DNS stack), and
that resolver lives on the reactor.  :class:`ThreadDNS` hands each query to the reactor with
``blockingCallFromThread`` and waits for the answer, which a deadline on the reactor bounds, so
a DNS server that never answers costs ``timeout`` seconds and a ``DNSTempError``, never a hung
thread.  Answers are cached on the reactor thread (only there: no locks) for their TTL, at
most an hour, and answers that say "no such record" for a minute; failures are not cached.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread
from twisted.names import dns, error
from twisted.python import threadable

__all__ = ["DNSTempError", "Record", "ThreadDNS"]

#: Longest time an answer is kept, whatever its TTL; and the time "no such record" is kept.
MAX_TTL = 3600
NEGATIVE_TTL = 60
#: Entries the cache holds at most (the oldest go first).
MAX_ENTRIES = 10000

_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "PTR": dns.PTR}


class DNSTempError(Exception):
    """No answer in time, SERVFAIL, REFUSED or a broken answer: SPF's and DMARC's
    ``temperror``; nothing is known about the name."""


@dataclass(frozen=True)
class Record:
    """One record of an answer: its owner name (lower case, no final dot), its type
    (``"A"``, ``"AAAA"``, ``"MX"``, ``"TXT"``, ``"PTR"``, ``"CNAME"``) and its value: an
    address as text, ``(preference, name)``, the TXT strings as a tuple of bytes, or a name."""

    name: str
    type: str
    value: Any


def _name(payload: Any) -> str:
    """The domain name a record points to (an MX's exchange, a PTR's or CNAME's target)."""
    return payload.name.name.decode("ascii", "replace").rstrip(".").lower()


def _records(answers: list[Any]) -> tuple[Record, ...]:
    """The answer section as Records (other types, like RRSIG or DNAME, are left out)."""
    found = []
    for rr in answers:
        owner = rr.name.name.decode("ascii", "replace").rstrip(".").lower()
        payload = rr.payload
        if rr.type == dns.A:
            value: Any = payload.dottedQuad()
        elif rr.type == dns.AAAA:
            value = socket.inet_ntop(socket.AF_INET6, payload.address)
        elif rr.type == dns.MX:
            value = (payload.preference, _name(payload))
        elif rr.type in (dns.TXT, dns.SPF):
            value = tuple(payload.data)
        elif rr.type in (dns.PTR, dns.CNAME):
            value = _name(payload)
        else:
            continue
        found.append(Record(owner, dns.QUERY_TYPES.get(rr.type, str(rr.type)), value))
    return tuple(found)


def _ttl(answers: list[Any]) -> int:
    ttls = [rr.ttl for rr in answers]
    return max(0, min([MAX_TTL, *ttls])) if ttls else NEGATIVE_TTL


class ThreadDNS:
    """Blocking lookups for worker threads, made on the reactor by ``resolver``.

    ``timeout`` bounds each lookup (all tries of all servers together).  ``clock`` is the
    cache's idea of now (time.monotonic); tests give their own.
    """

    def __init__(
        self, resolver: Any, reactor: Any, timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.reactor = reactor
        self.timeout = timeout
        self.clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, tuple[Record, ...]]] = (
            OrderedDict()
        )

    # -- in a worker thread --------------------------------------------------------------

    def lookup(self, name: str, rtype: str) -> tuple[Record, ...]:
        """The records of ``rtype`` for ``name`` (and the CNAMEs on the way); empty when
        the name or the type does not exist.  Raises DNSTempError.  Never on the reactor."""
        if threadable.isInIOThread():
            raise RuntimeError("ThreadDNS.lookup would block the reactor thread")
        # A cached answer is read here, without the round trip through the reactor (most of a
        # message's lookups, under load: the benchmark's profile).  One get of the cache is
        # atomic under the GIL; entries are immutable tuples, written on the reactor only.
        cached = self._cache.get((name.rstrip(".").lower(), rtype))
        if cached is not None and cached[0] > self.clock():
            return cached[1]
        return blockingCallFromThread(self.reactor, self.query, name, rtype)

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of ``name``, its strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        key = name.rstrip(".").lower()
        return [b"".join(r.value) for r in self.lookup(key, "TXT")
                if r.type == "TXT" and r.name == key]

    # -- on the reactor ------------------------------------------------------------------

    def query(self, name: str, rtype: str) -> defer.Deferred:
        """A Deferred firing with the Records (cached or asked), or failing with
        DNSTempError after at most ``timeout`` seconds."""
        key = (name.rstrip(".").lower(), rtype)
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self.clock():
                return defer.succeed(cached[1])
            del self._cache[key]
        qtype = _TYPES[rtype]
        what = f"{key[0]}/{rtype}"
        try:
            query = self.resolver.query(
                dns.Query(key[0].encode("ascii"), qtype, dns.IN), timeout=(self.timeout,))
        except (UnicodeEncodeError, ValueError) as e:
            return defer.fail(DNSTempError(f"cannot ask for {name!r}: {e}"))
        d: defer.Deferred = defer.Deferred(lambda _: query.cancel())
        timer = self.reactor.callLater(self.timeout, d.cancel)

        def answered(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if d.called:
                return
            try:
                answers, _authority, _additional = result
                records = _records(answers)
            except Exception as e:  # an answer we cannot read: the waiting thread must wake
                d.errback(DNSTempError(f"{what}: unreadable answer: {e!r}"))
                return
            self._store(key, records, _ttl(answers))
            d.callback(records)

        def failed(failure: Any) -> None:
            if timer.active():
                timer.cancel()
            if d.called:
                return
            if failure.check(error.DNSNameError):  # NXDOMAIN: known not to exist
                self._store(key, (), NEGATIVE_TTL)
                d.callback(())
            elif failure.check(defer.CancelledError):
                d.errback(DNSTempError(f"{what}: no answer within {self.timeout:g} s"))
            else:
                why = failure.getErrorMessage() or failure.type.__name__
                d.errback(DNSTempError(f"{what}: {why}"))

        query.addCallbacks(answered, failed)
        return d

    def _store(self, key: tuple[str, str], records: tuple[Record, ...], ttl: int) -> None:
        if ttl <= 0:
            return
        self._cache[key] = (self.clock() + ttl, records)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_ENTRIES:
            self._cache.popitem(last=False)
