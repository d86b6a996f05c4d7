"""
The network half of MTA-STS: the ``_mta-sts`` TXT record and the HTTPS fetch of the policy.

The policy host ``mta-sts.<domain>`` is resolved with the relayer's resolver (the one
``relay.dns_servers`` names), then fetched with Twisted's HTTP client over TLS verified for
that name (RFC 8461 §3.3): only a ``200`` with ``text/plain``, no redirects followed (Agent
follows none), at most 64 KiB, within ``FETCH_TIMEOUT``.  Every failure is a FetchError
whose ``result_type`` is TLS-RPT's name for it (RFC 8460 §4.3).
"""

from __future__ import annotations

import time
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.names import dns, error
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailsrv.outbound.mtasts.policy import PolicyError, parse_policy, pick_txt
from mailsrv.outbound.mx import DestinationError, resolve_host

__all__ = ["FETCH_ERROR", "POLICY_INVALID", "WEBPKI_INVALID", "MAX_POLICY_SIZE", "FETCH_TIMEOUT",
           "FetchError", "lookup_id", "fetch_policy"]

FETCH_ERROR, POLICY_INVALID, WEBPKI_INVALID = (
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")
#: RFC 8461 §3.3: senders may limit the policy's size; 64 KiB is the RFC's example.
MAX_POLICY_SIZE = 64 * 1024
#: Seconds for the whole fetch (the RFC suggests about a minute).
FETCH_TIMEOUT = 60.0
WELL_KNOWN = "/.well-known/mta-sts.txt"


class FetchError(Exception):
    """No policy could be had: ``result_type`` names why (RFC 8460 §4.3)."""

    def __init__(self, result_type: str, text: str) -> None:
        super().__init__(text)
        self.result_type = result_type


@defer.inlineCallbacks
def lookup_id(resolver: Any, domain: str, timeout: tuple[int, ...]) -> Any:
    """The ``id`` of ``_mta-sts.<domain>``: None when the domain has no such record;
    FetchError when the lookup failed (temporary) or the record is malformed."""
    name = f"_mta-sts.{domain}"
    try:
        answers, _, _ = yield resolver.lookupText(name, timeout=timeout)
    except error.DNSNameError:
        return None
    except Exception as e:
        raise FetchError(FETCH_ERROR, f"TXT lookup of {name} failed: {type(e).__name__}")
    records = [a.payload.data for a in answers if a.type == dns.TXT]
    try:
        return pick_txt(records)
    except PolicyError as e:
        raise FetchError(POLICY_INVALID, f"{name}: {e}")


@implementer(IAgentEndpointFactory)
class _OneAddress:
    """The Agent's endpoints: the address we resolved, TLS verified for the policy host."""

    def __init__(self, reactor: Any, address: str, port: int, host: str, trust_root: Any,
                 timeout: float) -> None:
        self.reactor, self.address, self.port = reactor, address, port
        self.host, self.trust_root, self.timeout = host, trust_root, timeout

    def endpointForURI(self, uri: Any) -> Any:
        kind = endpoints.TCP6ClientEndpoint if ":" in self.address else endpoints.TCP4ClientEndpoint
        tcp = kind(self.reactor, self.address, self.port, timeout=self.timeout)
        options = ssl.optionsForClientTLS(self.host, trustRoot=self.trust_root)
        return endpoints.wrapClientTLS(options, tcp)


class _Body(protocol.Protocol):
    """Collects a response body up to ``limit`` octets; more is an error."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(FetchError(FETCH_ERROR, f"the policy is over {self.limit} octets"))
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(FetchError(FETCH_ERROR, f"body: {reason.getErrorMessage()}"))


def _discard(response: Any) -> None:
    """Read no body: the connection is closed (the pool keeps none)."""
    body = _Body(0)
    body.done.addErrback(lambda failure: None)
    response.deliverBody(body)


def _quiet_pool(reactor: Any) -> HTTPConnectionPool:
    """A pool that keeps no connection and logs no "Starting factory" line per fetch."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    factory = getattr(pool, "_factory", None)
    if isinstance(factory, type):
        pool._factory = type("QuietHTTP11ClientFactory", (factory,), {"noisy": False})
    return pool


def _classify(failure: Any) -> FetchError:
    """TLS-RPT's name for a failed request: a certificate refused is ``sts-webpki-invalid``."""
    if failure.check(FetchError):
        return failure.value
    reasons = [failure] + list(getattr(failure.value, "reasons", []) or [])
    for reason in reasons:
        if reason.check(SSL.Error):
            return FetchError(WEBPKI_INVALID, f"TLS: {reason.getErrorMessage()}")
    if failure.check(defer.CancelledError, defer.TimeoutError):
        return FetchError(FETCH_ERROR, "timed out")
    return FetchError(FETCH_ERROR, failure.getErrorMessage() or type(failure.value).__name__)


@defer.inlineCallbacks
def fetch_policy(
    reactor: Any,
    resolver: Any,
    domain: str,
    *,
    policy_id: str,
    trust_root: Any,
    port: int = 443,
    timeout: float = FETCH_TIMEOUT,
    dns_timeout: tuple[int, ...] = (2, 5),
    clock: Any = time.time,
) -> Any:
    """The policy of ``domain`` from ``https://mta-sts.<domain>/.well-known/mta-sts.txt``."""
    host = f"mta-sts.{domain}"
    try:
        where = yield resolve_host(resolver, host, timeout=dns_timeout)
    except DestinationError as e:
        raise FetchError(FETCH_ERROR, str(e))
    last: FetchError = FetchError(FETCH_ERROR, f"{host} has no address")
    for address in where.addresses:
        pool = _quiet_pool(reactor)
        agent = Agent.usingEndpointFactory(
            reactor, _OneAddress(reactor, address, port, host, trust_root, timeout), pool=pool)
        url = f"https://{host}{'' if port == 443 else f':{port}'}{WELL_KNOWN}"
        try:
            text = yield _get(reactor, agent, url, timeout)
        except FetchError as e:
            last = e
            if e.result_type != FETCH_ERROR:
                raise  # a bad certificate or policy is no better at another address
            continue
        try:
            return parse_policy(text, id=policy_id, fetched=clock())
        except PolicyError as e:
            raise FetchError(POLICY_INVALID, f"{url}: {e}")
    raise last


@defer.inlineCallbacks
def _get(reactor: Any, agent: Any, url: str, timeout: float) -> Any:
    d = agent.request(b"GET", url.encode("ascii"), Headers({b"User-Agent": [b"mailsrv"]}))
    d.addTimeout(timeout, reactor)
    try:
        response = yield d
    except Exception:
        raise _classify(Failure())
    if response.code != 200:
        _discard(response)
        raise FetchError(FETCH_ERROR, f"{url}: HTTP {response.code}")
    kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    if kind.split(b";")[0].strip().lower() != b"text/plain":
        _discard(response)
        raise FetchError(POLICY_INVALID, f"{url}: Content-Type {kind.decode('latin-1')!r}")
    body = _Body(MAX_POLICY_SIZE)
    response.deliverBody(body)
    body.done.addTimeout(timeout, reactor)
    try:
        data = yield body.done
    except Exception:
        raise _classify(Failure())
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError(POLICY_INVALID, f"{url}: not UTF-8")

