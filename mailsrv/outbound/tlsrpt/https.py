"""
Posting a gzipped TLS-RPT report to an ``https:`` rua (RFC 8460 §5.4): one POST with
``Content-Type: application/tlsrpt+gzip``, the server's certificate verified (against
``relay.tls_ca_file``, else the system's CAs), a time limit, no redirects followed; a 2xx
answer is success, anything else a failure (the report is not retried: §5.4 leaves that to
the sender, and tomorrow brings the next one).
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet import defer, protocol
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer
from twisted.web.http_headers import Headers

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


@defer.inlineCallbacks
def post_report(reactor: Any, url: str, data: bytes, trust_root: Any,
                timeout: float = TIMEOUT) -> Any:
    """POST ``data`` to ``url``; fires with the HTTP status, or fails with PostFailed."""
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust_root),
                  connectTimeout=timeout)
    headers = Headers({b"Content-Type": [MEDIA_TYPE.encode("ascii")],
                       b"User-Agent": [b"mailsrv TLS-RPT"]})
    d = agent.request(b"POST", url.encode("ascii"), headers, FileBodyProducer(io.BytesIO(data)))
    d.addTimeout(timeout, reactor)
    try:
        response = yield d
    except Exception as e:
        raise PostFailed(f"{url}: {type(e).__name__}: {e}") from None
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
