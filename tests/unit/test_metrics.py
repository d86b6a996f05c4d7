"""mailsrv.metrics in-process: the mapping of events to counters, the state collector, the
pipeline's observer, the connection limits' counts, and the ``[metrics]`` key."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from zope.interface import implementer

from mailsrv.checks.pipeline import (
    ACCEPT,
    AddHeaders,
    Client,
    Facts,
    Pipeline,
    Reject,
    Stage,
)
from mailsrv.config import ConfigError, parse_config
from mailsrv.inbound.listener import ConnectionCounter
from mailsrv.interfaces import ICheck
from mailsrv.metrics import Metrics, StateCollector, destination_class, tls_version
from mailsrv.replies import Reply
from mailsrv.routing.router import Directory
from support.inprocess import CLIENT, Connection, factory_for, make_runtime


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """The registry as Prometheus reads it: rendered, then parsed by prometheus_client."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("address, smarthost, expected", [
    ("bob@remote.test", False, "mx"),
    ("bob@[192.0.2.1]", False, "literal"),
    ("bob@[IPv6:2001:db8::1]", False, "literal"),
    ("bob@remote.test", True, "smarthost"),
    ("bob@[192.0.2.1]", True, "smarthost"),
])
def test_destination_class(address, smarthost, expected):
    assert destination_class(address, smarthost) == expected


def test_tls_version_is_the_first_word():
    assert tls_version("TLSv1.3 TLS_AES_256_GCM_SHA384") == "TLSv1.3"
    assert tls_version("TLS") == "TLS"
    assert tls_version(None) == tls_version("") == "none"


def test_two_instances_count_apart():
    one, two = Metrics(), Metrics()
    one.auth("failure")
    assert value(one, "mailsrv_auth_total", result="failure") == 1
    assert value(two, "mailsrv_auth_total", result="failure") == 0


def test_accepted_counts_message_bytes_copies_and_latency():
    m = Metrics()
    m.accepted("smtp", 1234, local=2, queued=3, started=time.monotonic() - 0.02)
    m.accepted("submission", 10, local=0, queued=1)
    s = samples(m)
    assert s[("mailsrv_messages_accepted_total", frozenset({("listener", "smtp")}))] == 1
    assert s[("mailsrv_messages_accepted_total", frozenset({("listener", "submission")}))] == 1
    assert s[("mailsrv_received_bytes_total", frozenset())] == 1244
    assert s[("mailsrv_deliveries_total", frozenset({("result", "delivered")}))] == 2
    assert s[("mailsrv_queued_recipients_total", frozenset())] == 4
    assert s[("mailsrv_delivery_latency_seconds_count", frozenset())] == 1  # one was timed
    assert 0.02 <= s[("mailsrv_delivery_latency_seconds_sum", frozenset())] < 1
    assert s[("mailsrv_delivery_latency_seconds_bucket", frozenset({("le", "0.01")}))] == 0
    assert s[("mailsrv_delivery_latency_seconds_bucket", frozenset({("le", "0.025")}))] == 1


@pytest.mark.parametrize("status, delivery", [
    ("sent", "relayed"), ("bounced", "bounced"), ("expired", "expired"), ("deferred", None),
])
def test_relay_results_and_the_deliveries_they_end(status, delivery):
    m = Metrics()
    m.relay_result(status, "mx")
    assert value(m, "mailsrv_relay_attempts_total", result=status, destination="mx") == 1
    for result in ("relayed", "bounced", "expired"):
        assert value(m, "mailsrv_deliveries_total", result=result) == (result == delivery)


def test_connections_open_goes_up_and_down():
    m = Metrics()
    m.connection_opened("smtp")
    m.connection_opened("submission")
    m.connection_closed()
    assert value(m, "mailsrv_connections_open") == 1
    assert value(m, "mailsrv_connections_total", listener="smtp") == 1
    assert value(m, "mailsrv_connections_total", listener="submission") == 1


def test_refused_without_a_reason_is_unknown_and_reloads_ok_or_failed():
    m = Metrics()
    m.refused("rcpt", None)
    m.reload("tls", False)
    m.reload("users", True)
    assert value(m, "mailsrv_refused_total", stage="rcpt", reason="unknown") == 1
    assert value(m, "mailsrv_reloads_total", what="tls", result="failed") == 1
    assert value(m, "mailsrv_reloads_total", what="users", result="ok") == 1


# --------------------------------------------------------------------------- the state


@dataclass(frozen=True)
class FakeMessage:
    created: float
    pending: tuple = ()


@dataclass
class FakeRelayer:
    messages: dict = field(default_factory=dict)
    loaded: bool = True


@dataclass
class FakeTLS:
    expires: float | None = None


@dataclass
class FakeRuntime:
    relayer: object = None
    tls: object = None


def collected(collector: StateCollector) -> dict[str, float]:
    return {family.name: family.samples[0].value for family in collector.collect()}


def test_queue_state_at_scrape_time():
    relayer = FakeRelayer()
    runtime = FakeRuntime(relayer=relayer, tls=FakeTLS(expires=1_900_000_000.0))
    collector = StateCollector(runtime, clock=lambda: 1000.0)
    assert collected(collector) == {
        "mailsrv_queue_messages": 0, "mailsrv_queue_recipients": 0,
        "mailsrv_queue_oldest_message_age_seconds": 0.0,
        "mailsrv_tls_certificate_expiry_timestamp_seconds": 1_900_000_000.0,
    }
    relayer.messages["a"] = FakeMessage(900.0, ("x", "y"))
    relayer.messages["b"] = FakeMessage(400.0, ("z",))
    got = collected(collector)  # read again: nothing kept from the last scrape
    assert got["mailsrv_queue_messages"] == 2
    assert got["mailsrv_queue_recipients"] == 3
    assert got["mailsrv_queue_oldest_message_age_seconds"] == 600.0


def test_no_queue_figures_before_the_queue_is_loaded_nor_a_certificate_without_tls():
    runtime = FakeRuntime(relayer=FakeRelayer(loaded=False), tls=None)
    assert collected(StateCollector(runtime)) == {}
    assert collected(StateCollector(FakeRuntime())) == {}


def test_a_clock_behind_a_message_gives_age_zero_not_negative():
    relayer = FakeRelayer({"a": FakeMessage(2000.0)})
    got = collected(StateCollector(FakeRuntime(relayer=relayer), clock=lambda: 1000.0))
    assert got["mailsrv_queue_oldest_message_age_seconds"] == 0.0


def test_the_runtime_registers_its_state(tmp_path):
    runtime = make_runtime(tmp_path)
    names = {family.name for family in text_string_to_metric_families(
        generate_latest(runtime.metrics.registry).decode())}
    assert "mailsrv_messages_accepted" in names
    assert "mailsrv_queue_messages" not in names  # no relayer in this runtime


# --------------------------------------------------------------------------- the pipeline


@implementer(ICheck)
@dataclass
class Check:
    name: str
    stage: Stage
    verdict: object

    def check(self, facts):
        return self.verdict


REFUSED = Reply(550, "5.7.1", "no")


def test_the_pipeline_tells_every_verdict_until_the_refusal():
    pipeline = Pipeline([
        Check("first", Stage.RCPT, ACCEPT),
        Check("adds", Stage.RCPT, AddHeaders((b"X-A: 1\n",))),
        Check("refuses", Stage.RCPT, Reject(REFUSED)),
        Check("never", Stage.RCPT, ACCEPT),
    ])
    told = []
    pipeline.observe = lambda *decision: told.append(decision)
    facts = Facts(Stage.RCPT, Client(ip=CLIENT, name=f"unknown[{CLIENT}]"),
                  Directory(["example.org"], frozenset(), {}))
    pipeline.run(facts)
    assert told == [("first", "rcpt", "accept"), ("adds", "rcpt", "add_headers"),
                    ("refuses", "rcpt", "reject")]


def test_the_runtime_counts_its_pipelines_decisions(tmp_path):
    runtime = make_runtime(tmp_path)
    connection = Connection(factory_for(runtime))
    connection.send("EHLO client.test", "MAIL FROM:<a@client.test>")
    assert connection.send("RCPT TO:<nobody@example.org>")[0].startswith("550")
    m = runtime.metrics
    assert value(m, "mailsrv_refused_total", stage="rcpt", reason="local_recipient") == 1
    assert value(m, "mailsrv_check_decisions_total", check="local_recipient", stage="rcpt",
                 decision="reject") == 1


# --------------------------------------------------------------------------- connections


def test_refused_connections_by_limit_and_open_ones(tmp_path):
    runtime = make_runtime(tmp_path)
    factory = factory_for(runtime, ConnectionCounter(max_connections=2, max_per_ip=1))
    first = Connection(factory)
    Connection(factory)  # one past the per-address limit
    Connection(factory, ip="192.0.2.99")
    Connection(factory, ip="192.0.2.100")  # one past the total
    m = runtime.metrics
    assert value(m, "mailsrv_connections_total", listener="smtp") == 2
    assert value(m, "mailsrv_connections_refused_total", reason="max_connections_per_ip") == 1
    assert value(m, "mailsrv_connections_refused_total", reason="max_connections") == 1
    assert value(m, "mailsrv_connections_open") == 2
    first.lose()
    assert value(m, "mailsrv_connections_open") == 1


# --------------------------------------------------------------------------- configuration


def config_with(metrics: dict):
    return parse_config({
        "hostname": "mx.example.org", "domains": {"local": ["example.org"]},
        "mailboxes": {"root": "/srv/mail"}, "queue": {"path": "/srv/queue"},
        "metrics": metrics,
    }, None)


def test_metrics_are_off_unless_listen_is_set():
    assert config_with({}).metrics.listen is None


@pytest.mark.parametrize("endpoint", [
    "tcp:9125:interface=127.0.0.1", "tcp6:9125:interface=\\:\\:1", "unix:/run/mailsrv/metrics",
])
def test_metrics_listen_takes_an_endpoint(endpoint):
    assert config_with({"listen": endpoint}).metrics.listen == endpoint


@pytest.mark.parametrize("endpoint, why", [
    ("ssl:9125", "ssl: is for the mail listeners"),
    ("tcp:9125:interfce=127.0.0.1", "unknown option 'interfce'"),
    ("tcp:99999", "port must be"),
    (9125, "expected an endpoint"),
    (["tcp:9125"], "expected an endpoint"),
])
def test_metrics_listen_refuses(endpoint, why):
    with pytest.raises(ConfigError) as caught:
        config_with({"listen": endpoint})
    assert caught.value.key == "metrics.listen"
    assert why in str(caught.value)


def test_unknown_metrics_key():
    with pytest.raises(ConfigError) as caught:
        config_with({"port": 9125})
    assert caught.value.key == "metrics.port"


# --------------------------------------------------------------------------- etc/prometheus

ETC = Path(__file__).resolve().parents[2] / "etc" / "prometheus"


def exported_names() -> set[str]:
    """Every sample name the server can export (the runtime's families, with a relayer and a
    certificate for the state ones)."""
    m = Metrics()
    m.registry.register(StateCollector(FakeRuntime(relayer=FakeRelayer(), tls=FakeTLS(1.0))))
    names = set()
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    # a labelled counter has no sample before its first event: its _total name by type
    names.update(f"{n}_total" for n in list(names))
    names.update(f"{n}_bucket" for n in list(names))
    return names


@pytest.mark.parametrize("name", ["grafana-dashboard.json", "mailsrv-alerts.yml"])
def test_the_shipped_dashboard_and_alerts_name_only_metrics_that_exist(name):
    text = (ETC / name).read_text()
    if name.endswith(".json"):
        json.loads(text)
    used = set(re.findall(r"\bmailsrv_[a-z_]+", text))
    assert used, name
    assert used <= exported_names(), used - exported_names()


def test_the_alerts_cover_the_issues_three():
    text = (ETC / "mailsrv-alerts.yml").read_text()
    assert "mailsrv_queue_messages" in text
    assert "mailsrv_tls_certificate_expiry_timestamp_seconds - time() < 14 * 86400" in text
    assert 'mailsrv_relay_attempts_total{result!="sent"}' in text
