"""
A loopback HTTPS server for MTA-STS policies (``/.well-known/mta-sts.txt`` by Host header),
run in a thread of the test process with a certificate from the test CA.

``set(domain, text, status=200, content_type="text/plain")`` decides what
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` answers (unknown hosts: 404);
``requests`` counts the requests per domain.  Written with the standard library's
http.server, so it shares no code with the client under test.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections import Counter
from pathlib import Path


class PolicyServer:
    def __init__(self, cert: tuple[Path, Path], host: str = "127.0.0.1") -> None:
        self.answers: dict[str, tuple[int, str, bytes]] = {}
        self.requests: Counter = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = (self.headers.get("Host") or "").split(":")[0].lower()
                domain = name.removeprefix("mta-sts.")
                server.requests[domain] += 1
                status, kind, body = server.answers.get(domain, (404, "text/plain", b"no"))
                if self.path != "/.well-known/mta-sts.txt":
                    status, kind, body = 404, "text/plain", b"no"
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "https://elsewhere.test/")
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert[0]), str(cert[1]))
        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def set(self, domain: str, text: str | bytes, status: int = 200,
            content_type: str = "text/plain") -> None:
        body = text.encode() if isinstance(text, str) else text
        self.answers[domain] = (status, content_type, body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
