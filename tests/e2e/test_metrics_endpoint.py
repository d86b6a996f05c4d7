"""
The Prometheus endpoint end to end (issue 17): a real server with ``[metrics] listen``,
scraped over HTTP with urllib while messages flow, each counter moved by exactly the events
a test makes, the text read by prometheus_client's own parser.

One server for the module (the counters are cumulative: each test compares a scrape before
with one after); a DNS server and a remote MX (the SMTPSink) on loopback; TLS, AUTH on the
submission port.
"""

from __future__ import annotations

import datetime
import signal
import smtplib
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from support.certs import make_ca
from support.harness import REPO, DNSServer, MailServer, SMTPSink, _env, free_port, wait_for
from support.mail import connect, send_mail
from support.sasl import plain

sys.path.insert(0, str(REPO))
from mailsrv.accounts.auth import hash_password  # noqa: E402  (the checkout's code)

PASSWORD = "alice pw"
ZONE = {
    "records": {
        "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
        "client.test": [["A", "127.0.0.1"]],
        "remote.test": [["MX", 10, "mx.remote.test"]],
        "mx.remote.test": [["A", "127.0.0.2"]],
    }
}
SINK_RULES = {"rcpt": [["^bad@", "550 5.1.1 <bad@remote.test>: user unknown"],
                       ["^later@", "451 4.3.0 try again later"]]}

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("metrics")
    dns = DNSServer(work, ZONE)
    sink_port = free_port(["127.0.0.2"])
    sink = SMTPSink(work / "sink", "127.0.0.2", hostname="mx.remote.test", port=sink_port,
                    rules=SINK_RULES)
    ca = make_ca(work)
    cert, key = ca.issue(["mx.example.org"], work, ips=("127.0.0.1",))
    (work / "server").mkdir()
    server = MailServer(
        work / "server", dns.port,
        users=[f"alice@example.org:{hash_password(PASSWORD, cost=4)}", "bob@example.org"],
        aliases=["postmaster: alice@example.org"],
        overrides={
            "tls": {"cert": str(cert), "key": str(key)},
            "submission": {"listen": ["tcp:0:interface=127.0.0.1"]},
            "auth": {"max_failures": 2, "failure_delay": 0.01, "lockout": 3600},
            "relay": {"port": sink_port},
            # deferred recipients stay in the queue for the test's life
            "queue": {"retry_schedule": [3600]},
            "metrics": {"listen": "tcp:0:interface=127.0.0.1"},
            "smtp": {"max_message_size": 100_000},
        },
    ).start()
    yield {"server": server, "sink": sink, "ca": ca, "cert": cert}
    server.stop()
    sink.stop()
    dns.stop()


@pytest.fixture
def server(env) -> MailServer:
    return env["server"]


def scrape_text(server: MailServer) -> str:
    port = server.port_of("metrics")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return answer.read().decode()


def scrape(server: MailServer) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(scrape_text(server)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples) -> dict[tuple[str, frozenset], float]:
    """Every sample that changed, by how much (the gauges and the histogram's sums too)."""
    return {key: after.get(key, 0.0) - before.get(key, 0.0)
            for key in set(before) | set(after) if after.get(key, 0.0) != before.get(key, 0.0)}


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return (name, frozenset(labels.items()))


def settled(server: MailServer, name: str, want: float, **labels: str) -> Samples:
    """Scrape until ``name{labels}`` reaches ``want`` (what the relayer does comes later)."""
    return wait_for(lambda: (lambda s: s if value(s, name, **labels) >= want else None)(
        scrape(server)), 20, f"{name}{labels} >= {want}")


def test_every_family_is_there_and_parses(server):
    text = scrape_text(server)
    names = {family.name for family in text_string_to_metric_families(text)}
    for name in ("mailsrv_connections", "mailsrv_connections_refused", "mailsrv_connections_open",
                 "mailsrv_messages_accepted", "mailsrv_refused", "mailsrv_received_bytes",
                 "mailsrv_deliveries", "mailsrv_queued_recipients", "mailsrv_relay_attempts",
                 "mailsrv_dsn_sent", "mailsrv_auth", "mailsrv_tls_sessions",
                 "mailsrv_delivery_latency_seconds", "mailsrv_reloads",
                 "mailsrv_check_decisions", "mailsrv_queue_messages",
                 "mailsrv_queue_recipients", "mailsrv_queue_oldest_message_age_seconds",
                 "mailsrv_tls_certificate_expiry_timestamp_seconds"):
        assert name in names, name
    # Nothing of prometheus_client's global registry (the process collector and the rest):
    # the runtime's own registry only.
    assert not any(name.startswith(("process_", "python_")) for name in names)


def test_not_found_beside_metrics(server):
    port = server.port_of("metrics")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert caught.value.code == 404


def test_certificate_expiry_is_the_certificates(env, server):
    cert = x509.load_pem_x509_certificate(Path(env["cert"]).read_bytes())
    not_after = cert.not_valid_after_utc if hasattr(cert, "not_valid_after_utc") else \
        cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    got = value(scrape(server), "mailsrv_tls_certificate_expiry_timestamp_seconds")
    assert got == not_after.timestamp()


def test_a_local_message_accepted(server):
    before = scrape(server)
    message = b"Subject: local\r\n\r\n" + b"x" * 998 + b"\r\n"
    assert send_mail(server.port, "bob@example.org", ["alice@example.org"], message) == {}
    after = scrape(server)
    delta = moved(before, after)
    assert delta[key("mailsrv_connections_total", listener="smtp")] == 1
    assert delta[key("mailsrv_messages_accepted_total", listener="smtp")] == 1
    assert delta[key("mailsrv_deliveries_total", result="delivered")] == 1
    assert delta[key("mailsrv_delivery_latency_seconds_count")] == 1
    assert 0 < delta[key("mailsrv_delivery_latency_seconds_sum")] < 5
    # LF line ends as spooled: the header, the blank line, the body line
    assert delta[key("mailsrv_received_bytes_total")] == len(message) - 3
    assert delta[key("mailsrv_check_decisions_total", check="local_recipient", stage="rcpt",
                     decision="accept")] == 1
    assert key("mailsrv_refused_total", stage="rcpt", reason="local_recipient") not in delta
    assert key("mailsrv_queued_recipients_total") not in delta
    # The close reaches the gauge just after the client's QUIT (from a receiving process,
    # over its channel, with [server] processes > 1): waited for, not raced.
    wait_for(lambda: value(scrape(server), "mailsrv_connections_open")
             == value(before, "mailsrv_connections_open"), 10, "the connection counted closed")


def test_a_recipient_refused_at_rcpt(server):
    before = scrape(server)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send_mail(server.port, "bob@example.org", ["nobody@example.org"])
    delta = moved(before, scrape(server))
    assert delta[key("mailsrv_refused_total", stage="rcpt", reason="local_recipient")] == 1
    assert delta[key("mailsrv_check_decisions_total", check="local_recipient", stage="rcpt",
                     decision="reject")] == 1
    assert key("mailsrv_messages_accepted_total", listener="smtp") not in delta
    assert key("mailsrv_deliveries_total", result="delivered") not in delta


def test_a_message_too_big_is_refused_at_data(server):
    before = scrape(server)
    server_limit = 100_000  # smtp.max_message_size
    with connect(server.port) as client:
        client.ehlo()
        client.mail("bob@example.org")
        client.rcpt("alice@example.org")
        code, _ = client.data((b"x" * 98 + b"\r\n") * (server_limit // 100 + 1))
    assert code == 552
    delta = moved(before, scrape(server))
    assert delta[key("mailsrv_refused_total", stage="data", reason="message_too_big")] == 1
    assert key("mailsrv_messages_accepted_total", listener="smtp") not in delta


def submission(env, server) -> smtplib.SMTP:
    client = connect(server.port_of("submission"))
    client.starttls(context=env["ca"].client_context())
    client.ehlo()
    return client


def login(client: smtplib.SMTP, password: str) -> int:
    """One AUTH PLAIN (smtplib's login() tries every mechanism in turn: two failures)."""
    code, _ = client.docmd("AUTH", "PLAIN " + plain("alice@example.org", password))
    return code


def test_auth_success_failure_and_lockout(env, server):
    before = scrape(server)
    with submission(env, server) as client:
        assert login(client, PASSWORD) == 235
    with submission(env, server) as client:
        assert login(client, "wrong") == 535
    delta = moved(before, scrape(server))
    assert delta[key("mailsrv_auth_total", result="success")] == 1
    assert delta[key("mailsrv_auth_total", result="failure")] == 1
    assert key("mailsrv_auth_total", result="lockout") not in delta
    assert delta[key("mailsrv_connections_total", listener="submission")] == 2
    assert delta[key("mailsrv_tls_sessions_total", direction="inbound", version="TLSv1.3")] == 2

    # max_failures = 2: the second failure locks the address out, the next try is refused
    before = scrape(server)
    with submission(env, server) as client:
        assert login(client, "wrong again") == 535
    with submission(env, server) as client:
        assert login(client, PASSWORD) == 454
    delta = moved(before, scrape(server))
    assert delta[key("mailsrv_auth_total", result="failure")] == 1
    assert delta[key("mailsrv_auth_total", result="lockout")] == 1
    assert delta[key("mailsrv_auth_total", result="locked_out")] == 1
    assert key("mailsrv_auth_total", result="success") not in delta


def test_relayed_to_the_sink(env, server):
    before_sink = len(env["sink"].messages())
    before = scrape(server)
    assert send_mail(server.port, "alice@example.org", ["someone@remote.test"]) == {}
    env["sink"].wait_for_messages(before_sink + 1)
    wanted = value(before, "mailsrv_relay_attempts_total", result="sent", destination="mx") + 1
    after = settled(server, "mailsrv_relay_attempts_total", wanted, result="sent",
                    destination="mx")
    delta = moved(before, after)
    assert delta[key("mailsrv_relay_attempts_total", result="sent", destination="mx")] == 1
    assert delta[key("mailsrv_deliveries_total", result="relayed")] == 1
    assert delta[key("mailsrv_queued_recipients_total")] == 1
    assert delta[key("mailsrv_messages_accepted_total", listener="smtp")] == 1
    assert key("mailsrv_deliveries_total", result="delivered") not in delta
    assert key("mailsrv_dsn_sent_total", kind="failure") not in delta


def test_bounced_by_the_sink_makes_a_dsn(server):
    before = scrape(server)
    assert send_mail(server.port, "alice@example.org", ["bad@remote.test"]) == {}
    wanted = value(before, "mailsrv_dsn_sent_total", kind="failure") + 1
    after = settled(server, "mailsrv_dsn_sent_total", wanted, kind="failure")
    delta = moved(before, after)
    assert delta[key("mailsrv_relay_attempts_total", result="bounced", destination="mx")] == 1
    assert delta[key("mailsrv_deliveries_total", result="bounced")] == 1
    assert delta[key("mailsrv_dsn_sent_total", kind="failure")] == 1
    assert key("mailsrv_deliveries_total", result="relayed") not in delta


def test_a_deferred_message_is_in_the_queue_gauges(server):
    before = scrape(server)
    assert value(before, "mailsrv_queue_messages") == 0
    assert value(before, "mailsrv_queue_oldest_message_age_seconds") == 0
    assert send_mail(server.port, "alice@example.org", ["later@remote.test"]) == {}
    wanted = value(before, "mailsrv_relay_attempts_total", result="deferred", destination="mx") + 1
    settled(server, "mailsrv_relay_attempts_total", wanted, result="deferred", destination="mx")
    after = wait_for(lambda: (lambda s: s if value(
        s, "mailsrv_queue_oldest_message_age_seconds") > 0.2 else None)(scrape(server)),
        10, "the queued message to age")
    assert value(after, "mailsrv_queue_messages") == 1
    assert value(after, "mailsrv_queue_recipients") == 1
    assert value(after, "mailsrv_queue_oldest_message_age_seconds") < 60
    delta = moved(before, after)
    assert key("mailsrv_deliveries_total", result="relayed") not in delta
    assert key("mailsrv_dsn_sent_total", kind="failure") not in delta


def test_sighup_reloads_are_counted(server):
    before = scrape(server)
    server.process.send_signal(signal.SIGHUP)
    after = settled(server, "mailsrv_reloads_total",
                    value(before, "mailsrv_reloads_total", what="dkim", result="ok") + 1,
                    what="dkim", result="ok")
    after = settled(server, "mailsrv_reloads_total",
                    value(before, "mailsrv_reloads_total", what="users", result="ok") + 1,
                    what="users", result="ok")
    delta = moved(before, after)
    assert delta[key("mailsrv_reloads_total", what="tls", result="ok")] == 1
    assert delta[key("mailsrv_reloads_total", what="users", result="ok")] == 1
    assert delta[key("mailsrv_reloads_total", what="dkim", result="ok")] == 1
    assert not any(k[0] == "mailsrv_reloads_total" and ("result", "failed") in k[1]
                   for k in delta)


def test_metrics_port_in_use_is_named_at_start_up(env, tmp_path):
    """Like a mail listener's: one line naming metrics.listen, exit status 2, no traceback."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        endpoint = f"tcp:{held.getsockname()[1]}:interface=127.0.0.1"
        server = MailServer(tmp_path, 1, aliases=["postmaster: alice@example.org"],
                            overrides={"metrics": {"listen": endpoint}})
        result = subprocess.run(server.command(), cwd=tmp_path, env=_env(),
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.decode() == f"mailsrv: metrics.listen {endpoint}: address already in use\n"
