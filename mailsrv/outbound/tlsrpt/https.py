"""
Posting a gzipped TLS-RPT report to an ``https:`` rua (RFC 8460 §5.4): one POST with
``Content-Type: application/tlsrpt+gzip``, the host looked up through the server's resolver
(``relay.dns_servers``, as every other lookup), its certificate verified for its name
(against ``relay.tls_ca_file``, else the system's CAs), a time limit, no redirects followed;
a 2xx
answer is success, anything else a failure (the report is not retried: §5.4 leaves that to
the sender, and tomorrow brings the next one).
"""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, endpoints, protocol, ssl
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailsrv.outbound.mx import resolve_host
from mailsrv.outbound.tlsrpt.document import MEDIA_TYPE

__all__ = ["PostFailed", "post_report"]

#: Seconds for the whole POST (connection, TLS, upload, answer).
TIMEOUT = 60.0


class PostFailed(Exception):
    """The report server refused the report or could not be reached."""


class _Discard(protocol.Protocol):
    """Reads the answer's body and drops it (only the status matters)."""

    def __init__(self, done: defer.Deferred) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


@implementer(IAgentEndpointFactory)
class _Resolved:
    """The Agent's endpoint: TLS (verified for ``name``) to an address looked up already."""

    def __init__(self, reactor: Any, name: str, address: str, port: int, trust_root: Any,
                 timeout: float) -> None:
        options = ssl.optionsForClientTLS(name, trustRoot=trust_root)
        tcp = (endpoints.TCP6ClientEndpoint if ":" in address else endpoints.TCP4ClientEndpoint)(
            reactor, address, port, timeout=timeout)
        self.endpoint = endpoints.wrapClientTLS(options, tcp)

    def endpointForURI(self, uri: Any) -> Any:
        return self.endpoint


@defer.inlineCallbacks
def post_report(reactor: Any, resolver: Any, url: str, data: bytes, trust_root: Any,
                timeout: float = TIMEOUT) -> Any:
    """POST ``data`` to ``url`` (``https:``); fires with the HTTP status, or fails with
    PostFailed."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise PostFailed(f"{url}: not an https: URL")
    try:
        host = yield resolve_host(resolver, parts.hostname, timeout=(2, 5))
        port = parts.port or 443
    except Exception as e:
        raise PostFailed(f"{url}: {e}") from None
    agent = Agent.usingEndpointFactory(reactor, _Resolved(
        reactor, parts.hostname, host.addresses[0], port, trust_root, timeout))
    headers = Headers({b"Content-Type": [MEDIA_TYPE.encode("ascii")],
                       b"User-Agent": [b"mailsrv TLS-RPT"]})
    d = agent.request(b"POST", url.encode("ascii"), headers, FileBodyProducer(io.BytesIO(data)))
    d.addTimeout(timeout, reactor)
    try:
        response = yield d
    except Exception as e:
        # ResponseNeverReceived and the like carry their causes as Failures.
        causes = [r.getErrorMessage() for r in getattr(e, "reasons", ())] or [str(e)]
        raise PostFailed(f"{url}: {type(e).__name__}: {'; '.join(causes)}") from None
    body: defer.Deferred = defer.Deferred()
    response.deliverBody(_Discard(body))
    body.addTimeout(timeout, reactor)
    try:
        yield body
    except defer.TimeoutError:
        pass
    if not 200 <= response.code <= 299:
        raise PostFailed(f"{url}: HTTP {response.code} {response.phrase.decode('latin-1')}")
    return response.code
