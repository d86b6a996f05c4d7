"""
Early talkers end to end (postscreen's pregreet test): a real server whose banner waits for a
blocklist lookup that a DNS server never answers (a bound UDP socket that reads nothing), so
the banner comes after [dnsbl] timeout; a client that sends before it is refused with 554
5.5.1 and the connection closed, one that waits is served.
"""

from __future__ import annotations

import socket
import time

import pytest

from support.harness import MailServer, RawClient, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a DNS server that never answers
    silent.bind(("127.0.0.1", 0))
    work = tmp_path_factory.mktemp("pregreet")
    s = MailServer(work, silent.getsockname()[1], overrides={
        "relay": {"trusted_networks": ["10.0.0.0/8"]},
        "checks": {"spf": False, "dkim_verify": False, "dmarc": False,
                   "protect_local_domains": False},
        "dnsbl": {"zones": {"bl.test": 1}, "timeout": 1},
    }).start()
    yield s
    s.stop()
    silent.close()


def test_a_client_that_talks_first_is_refused(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"EHLO early.test\r\n")  # at once, not waiting for the banner
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break  # the server closed the connection
            data += chunk
    assert data == b"554 5.5.1 Error: protocol error: talked before the greeting\r\n"
    wait_for(lambda: 'reason="talked before the greeting: 17 octets"' in server.log_text(), 10,
             "the log line")


def test_a_client_that_waits_for_the_banner_is_served(server) -> None:
    started = time.monotonic()
    # Another address: the first one's (failed) lookup is cached, its banner would not wait.
    client = RawClient(server.port, source="127.0.0.20")
    assert client.greeting[0] == 220
    assert time.monotonic() - started >= 0.9  # the banner waited for the blocklist's timeout
    assert client.command("EHLO patient.test")[0] == 250
    assert client.command("MAIL FROM:<someone@sender.test>")[0] == 250
    client.close()
