"""TLS-RPT (RFC 8460): the session outcomes classified, a day of mixed outcomes counted,
written and read back, reported (gzip + JSON, checked against the RFC's schema), mailed and
the reporter's schedule."""

from __future__ import annotations

import dataclasses
import datetime
import email
import email.policy
import gzip
import json
import os
import re
import stat

import pytest
from twisted.internet import defer, task
from twisted.names import dns, error

from mailsrv.config.schema import TlsReportsConfig
from mailsrv.outbound.smtpclient import SessionOutcome
from mailsrv.outbound.tlsrpt import counts as counts_module
from mailsrv.outbound.tlsrpt import document, results
from mailsrv.outbound.tlsrpt.counts import TLSCounts
from mailsrv.outbound.tlsrpt.reporter import TLSReporter
from support.queue_runtime import queue_runtime

# --- the RFC 8460 §4.4 schema, as a JSON-schema subset checked below ----------------------

DATE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
FAILURE_DETAIL = {
    "type": "object",
    "required": ["result-type", "failed-session-count"],
    "properties": {
        "result-type": {"type": "string", "enum": list(results.RESULT_TYPES)},
        "sending-mta-ip": {"type": "string"},
        "receiving-mx-hostname": {"type": "string"},
        "receiving-mx-helo": {"type": "string"},
        "receiving-ip": {"type": "string"},
        "failed-session-count": {"type": "integer", "minimum": 1},
        "additional-information": {"type": "string"},
        "failure-reason-code": {"type": "string"},
    },
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string"},
        "date-range": {
            "type": "object", "required": ["start-datetime", "end-datetime"],
            "properties": {"start-datetime": {"type": "string", "format": "date-time"},
                           "end-datetime": {"type": "string", "format": "date-time"}},
            "additionalProperties": False,
        },
        "contact-info": {"type": "string"},
        "report-id": {"type": "string"},
        "policies": {"type": "array", "items": {
            "type": "object", "required": ["policy", "summary"],
            "properties": {
                "policy": {
                    "type": "object", "required": ["policy-type", "policy-domain"],
                    "properties": {
                        "policy-type": {"type": "string",
                                        "enum": ["tlsa", "sts", "no-policy-found"]},
                        "policy-string": {"type": "array", "items": {"type": "string"}},
                        "policy-domain": {"type": "string"},
                        "mx-host": {"type": "array", "items": {"type": "string"}},
                    },
                    "additionalProperties": False,
                },
                "summary": {
                    "type": "object",
                    "required": ["total-successful-session-count", "total-failure-session-count"],
                    "properties": {
                        "total-successful-session-count": {"type": "integer", "minimum": 0},
                        "total-failure-session-count": {"type": "integer", "minimum": 0},
                    },
                    "additionalProperties": False,
                },
                "failure-details": {"type": "array", "items": FAILURE_DETAIL},
            },
            "additionalProperties": False,
        }},
    },
    "additionalProperties": False,
}
TYPES = {"object": dict, "array": list, "string": str}


def validate(value, schema, where="$") -> None:
    """The subset of JSON Schema SCHEMA uses (python3-jsonschema is not in the test venvs)."""
    kind = schema["type"]
    if kind == "integer":
        assert type(value) is int, f"{where}: {value!r} is not an integer"
        assert value >= schema.get("minimum", value), f"{where}: {value} < minimum"
        return
    assert isinstance(value, TYPES[kind]), f"{where}: {value!r} is not a {kind}"
    if kind == "string":
        if "enum" in schema:
            assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
        if schema.get("format") == "date-time":
            assert DATE_TIME.fullmatch(value), f"{where}: {value!r} is not an RFC 3339 date-time"
    elif kind == "array":
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{i}]")
    elif kind == "object":
        for key in schema.get("required", ()):
            assert key in value, f"{where}: {key} missing"
        for key, item in value.items():
            assert key in schema["properties"] or schema.get("additionalProperties", True), \
                f"{where}: unknown member {key}"
            validate(item, schema["properties"][key], f"{where}.{key}")


def test_the_validator_can_fail():
    report = {"organization-name": "x", "date-range": {"start-datetime": "yesterday",
                                                       "end-datetime": "2026-12-03T00:00:00Z"},
              "contact-info": "a@b", "report-id": "1", "policies": []}
    with pytest.raises(AssertionError, match="date-time"):
        validate(report, SCHEMA)
    del report["contact-info"]
    with pytest.raises(AssertionError, match="contact-info missing"):
        validate(report, SCHEMA)


# --- classification ------------------------------------------------------------------------


def test_outcomes_classified():
    assert results.classify(SessionOutcome(greeted=True, tls="TLSv1.3 X",
                                           starttls_offered=True)) == (None, "")
    assert results.classify(SessionOutcome(greeted=True, starttls_offered=False)) == \
        ("starttls-not-supported", "STARTTLS not offered")
    refused = SessionOutcome(greeted=True, starttls_offered=True,
                             tls_failure=("starttls-not-supported", "STARTTLS refused: 454"))
    assert results.classify(refused) == ("starttls-not-supported", "STARTTLS refused: 454")
    # Never reached EHLO (refused connection, timeout): nothing to say about TLS.
    assert results.classify(SessionOutcome(reason="Connection refused")) is None
    assert results.classify(SessionOutcome(greeted=True)) is None


@pytest.mark.parametrize("code, kind, text, expected", [
    (10, "Error", "certificate verify failed", "certificate-expired"),
    (9, "Error", "certificate verify failed", "certificate-expired"),
    (20, "Error", "certificate verify failed", "certificate-not-trusted"),
    (18, "Error", "certificate verify failed", "certificate-not-trusted"),
    (0, "Error", "[('SSL routines', '', 'certificate verify failed')]", "certificate-not-trusted"),
    (0, "VerificationError", "VerificationError(errors=[DNSMismatch(...)])",
     "certificate-host-mismatch"),
    (62, "Error", "certificate verify failed", "certificate-host-mismatch"),
    (0, "Error", "[('SSL routines', '', 'unsupported protocol')]", "validation-failure"),
])
def test_handshake_failures_classified(code, kind, text, expected):
    assert results.classify_handshake(code, kind, text) == expected


def test_handshake_failure_ignores_a_loss_after_tls_was_up():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    class Up:
        class protocol:
            _handshakeDone = True

    class Handshaking:
        class protocol:
            _handshakeDone = False

    lost = Failure(ConnectionDone())
    assert results.handshake_failure(Up(), lost) is None
    result_type, detail = results.handshake_failure(Handshaking(), lost)
    assert result_type == "validation-failure" and "closed cleanly" in detail


def test_starttls_refused_or_missing_over_the_wire(tmp_path):
    """The client fills in the outcome's TLS fields (StringTransport, scripted server)."""
    from twisted.internet import ssl
    from twisted.internet.testing import StringTransport

    from mailsrv.outbound.smtpclient import RelayClient

    def session(extensions, require):
        outcome = SessionOutcome()
        client = RelayClient([], identity="mx.example.org", own_names=(), outcome=outcome,
                             prepare=lambda t, ok: defer.succeed(None),
                             tls_context=ssl.CertificateOptions(verify=False),
                             require_tls=require)
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(b"220 peer.test ESMTP\r\n")
        ehlo = [b"peer.test"] + extensions
        client.dataReceived(b"".join((b"250 " if i == len(ehlo) - 1 else b"250-") + e + b"\r\n"
                                     for i, e in enumerate(ehlo)))
        return client, outcome, transport

    client, outcome, transport = session([b"PIPELINING"], False)
    assert outcome.starttls_offered is False
    assert results.classify(outcome) == ("starttls-not-supported", "STARTTLS not offered")
    client, outcome, transport = session([b"STARTTLS"], False)
    assert transport.value().endswith(b"STARTTLS\r\n")
    client.dataReceived(b"454 4.7.0 TLS not available\r\n")
    assert results.classify(outcome) == ("starttls-not-supported", "STARTTLS refused: 454")
    client, outcome, transport = session([b"SIZE 1000"], True)  # verify: no clear text
    assert outcome.error is not None and results.classify(outcome)[0] == "starttls-not-supported"


# --- a day of mixed outcomes ---------------------------------------------------------------

DAY = datetime.datetime(2026, 12, 2, tzinfo=datetime.timezone.utc).timestamp()


def a_day(counts: TLSCounts) -> None:
    """example.net: 40 good sessions at two MX hosts, 3 without STARTTLS at the backup;
    other.test: an untrusted and an expired certificate, twice and once; sts.test: an
    MTA-STS policy (as the mtasts helper reports it) with one host mismatch."""
    for i in range(40):
        counts.record("example.net", "no-policy-found", (), (), f"mx{i % 2}.example.net",
                      f"192.0.2.{i % 2 + 1}", None)
    for _ in range(3):
        counts.record("Example.NET.", "no-policy-found", (), (), "backup.example.net.",
                      "192.0.2.9", "starttls-not-supported", "STARTTLS not offered")
    for _ in range(2):
        counts.record("other.test", "no-policy-found", (), (), "mx.other.test", "2001:db8::1",
                      "certificate-not-trusted", "certificate verify failed")
    counts.record("other.test", "no-policy-found", (), (), "mx.other.test", "2001:db8::1",
                  "certificate-expired", "certificate verify failed")
    sts = ("version: STSv1", "mode: enforce", "mx: *.sts.test", "max_age: 86400")
    counts.record("sts.test", "sts", sts, ("*.sts.test",), "mx.sts.test", "198.51.100.1", None)
    counts.record("sts.test", "sts", sts, ("*.sts.test",), "mx.sts.test", "198.51.100.1",
                  "certificate-host-mismatch", "the name is not in the certificate")


def test_a_day_of_mixed_outcomes_reported_per_domain():
    clock = task.Clock()
    clock.advance(DAY)
    counts = TLSCounts(clock)
    a_day(counts)
    clock.advance(86400)
    period = counts.take()
    assert (period.since, period.until) == (DAY, DAY + 86400)
    assert counts.tallies == {} and counts.since == DAY + 86400
    domains = period.by_domain()
    assert sorted(domains) == ["example.net", "other.test", "sts.test"]
    reports = {}
    for domain, tallies in domains.items():
        body = document.build_report(
            organization="Example Org", contact="postmaster@mx.example.org",
            report_id=f"r-{domain}", since=period.since, until=period.until, tallies=tallies)
        reports[domain] = json.loads(gzip.decompress(document.gzipped(body)))
        validate(reports[domain], SCHEMA)
    net = reports["example.net"]
    assert net["date-range"] == {"start-datetime": "2026-12-02T00:00:00Z",
                                 "end-datetime": "2026-12-03T00:00:00Z"}
    assert net["organization-name"] == "Example Org" and net["report-id"] == "r-example.net"
    [policy] = net["policies"]
    assert policy["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.net"}
    assert policy["summary"] == {"total-successful-session-count": 40,
                                 "total-failure-session-count": 3}
    assert policy["failure-details"] == [{
        "result-type": "starttls-not-supported", "receiving-mx-hostname": "backup.example.net",
        "receiving-ip": "192.0.2.9", "failed-session-count": 3,
        "failure-reason-code": "STARTTLS not offered"}]
    [other] = reports["other.test"]["policies"]
    assert other["summary"] == {"total-successful-session-count": 0,
                                "total-failure-session-count": 3}
    assert {(d["result-type"], d["failed-session-count"]) for d in other["failure-details"]} == \
        {("certificate-not-trusted", 2), ("certificate-expired", 1)}
    [sts] = reports["sts.test"]["policies"]
    assert sts["policy"]["policy-string"][1] == "mode: enforce"
    assert sts["policy"]["mx-host"] == ["*.sts.test"]
    assert sts["summary"]["total-successful-session-count"] == 1
    assert sts["failure-details"][0]["result-type"] == "certificate-host-mismatch"


def test_counts_written_behind_and_read_back(tmp_path):
    clock = task.Clock()
    clock.advance(DAY)
    path = tmp_path / "tlsrpt.json"
    counts = TLSCounts(clock, path, interval=60)
    counts.start()
    a_day(counts)
    assert not path.exists()  # nothing on the reactor's turn: the timer writes
    clock.advance(60)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = TLSCounts(clock, path)  # a restart (or a crash after the write)
    assert again.since == DAY and again.tallies == counts.tallies
    counts.record("late.test", "no-policy-found", (), (), "mx.late.test", "192.0.2.50", None)
    assert "late.test" not in path.read_text()
    counts.stop()  # a clean stop writes at once
    assert "late.test" in path.read_text()
    counts.take()
    assert TLSCounts(clock, path).tallies == {}


def test_an_unreadable_file_starts_the_counts_again(tmp_path):
    path = tmp_path / "tlsrpt.json"
    path.write_text("{not json")
    clock = task.Clock()
    assert TLSCounts(clock, path).tallies == {}


def test_failure_details_bounded_one_past(monkeypatch):
    monkeypatch.setattr(counts_module, "MAX_DETAILS", 3)
    counts = TLSCounts(task.Clock())
    for i in range(4):
        counts.record("d.test", "no-policy-found", (), (), "mx.d.test", f"192.0.2.{i}",
                      "validation-failure", "x")
    counts.record("d.test", "no-policy-found", (), (), "mx.d.test", "192.0.2.0",
                  "validation-failure", "x")  # a known detail still counts
    [tally] = counts.tallies.values()
    assert tally.failures == 5 and len(tally.details) == 3
    assert tally.details[("validation-failure", "mx.d.test", "192.0.2.0", "x")] == 2


def test_policies_bounded_one_past():
    counts = TLSCounts(task.Clock())
    for i in range(counts_module.MAX_POLICIES + 1):
        counts.record(f"d{i}.test", "no-policy-found", (), (), "mx", "192.0.2.1", None)
    assert len(counts.tallies) == counts_module.MAX_POLICIES and counts.dropped == 1
    counts.record("d0.test", "no-policy-found", (), (), "mx", "192.0.2.1", None)
    assert counts.tallies[next(iter(counts.tallies))].successes == 2


def test_reasons_are_cut_and_made_printable():
    counts = TLSCounts(task.Clock())
    counts.record("d.test", "no-policy-found", (), (), "mx", "192.0.2.1", "validation-failure",
                  "bad\r\nline" + "x" * 500)
    [(detail, _)] = next(iter(counts.tallies.values())).details.items()
    assert detail[3].startswith("bad??line") and len(detail[3]) == counts_module.MAX_REASON


# --- the _smtp._tls record and the mail -----------------------------------------------------


@pytest.mark.parametrize("texts, expected", [
    (["v=TLSRPTv1; rua=mailto:tls@example.net"], ["mailto:tls@example.net"]),
    (["v=TLSRPTv1;rua=mailto:a@x.test,https://r.x.test/tlsrpt"],
     ["mailto:a@x.test", "https://r.x.test/tlsrpt"]),
    (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@x.test"], ["mailto:a@x.test"]),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], None),  # two
    (["v=TLSRPTv1;"], None),
    (["v=TLSRPTv1; rua=" + ",".join(f"mailto:r{i}@x.test" for i in range(6))],
     [f"mailto:r{i}@x.test" for i in range(5)]),  # MAX_RUA, one past
    (["v=TLSRPTv1; rua=ftp://x.test/"], None),
    (["v=TLSRPTv2; rua=mailto:a@x.test"], None),
    ([], None),
])
def test_record_parsed(texts, expected):
    assert document.parse_record(texts) == expected


def test_report_message_as_rfc_8460_section_5_3():
    data = document.gzipped({"report-id": "x"})
    raw = document.report_message(
        hostname="mx.example.org", to="tls@example.net", domain="example.net",
        report_id="abc.1@mx.example.org", data=data, since=DAY, until=DAY + 86400,
        now=DAY + 86400, message_id="Q1")
    assert b"\r\n" not in raw
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert str(message["Subject"]) == ("Report Domain: example.net Submitter: mx.example.org "
                                       "Report-ID: <abc.1@mx.example.org>")
    assert message["TLS-Report-Domain"] == "example.net"
    assert message["TLS-Report-Submitter"] == "mx.example.org"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    text, part = message.get_payload()
    assert text.get_content_type() == "text/plain"
    assert part.get_content_type() == "application/tlsrpt+gzip"
    assert part.get_filename() == f"mx.example.org!example.net!{int(DAY)}!{int(DAY) + 86400}.json.gz"
    assert part.get_payload(decode=True) == data


# --- the reporter ---------------------------------------------------------------------------


class Zone:
    """A resolver for the reporter's one TXT lookup (the DNS is not what is tested here)."""

    def __init__(self, records: dict[str, list[str]], failing: tuple[str, ...] = ()) -> None:
        self.records, self.failing, self.asked = records, failing, []

    def lookupText(self, name, timeout=None):
        self.asked.append(name)
        if name in self.failing:
            return defer.fail(error.DNSServerError(name))
        if name not in self.records:
            return defer.fail(error.DNSNameError(name))
        return defer.succeed(([dns.RRHeader(name, dns.TXT, payload=dns.Record_TXT(t.encode()))
                               for t in self.records[name]], [], []))


@pytest.fixture
def reporting(tmp_path):
    runtime = queue_runtime(tmp_path)
    runtime.config = dataclasses.replace(runtime.config, tls_reports=TlsReportsConfig(
        enabled=True, hour=0, organization="Example Org"))
    runtime.reactor.advance(DAY + 3600)  # 01:00 UTC
    runtime.resolver = Zone({
        "_smtp._tls.example.net": ["v=TLSRPTv1; rua=mailto:tls@example.net,https://r.test/x"],
        "_smtp._tls.sts.test": ["v=TLSRPTv1; rua=mailto:postmaster@example.org"],
    }, failing=("_smtp._tls.other.test",))
    added = []
    runtime.relayer = type("Relayer", (), {"add": lambda self, entry: added.append(entry)})()
    posted = []

    def post(clock, resolver, url, data, trust_root):
        posted.append((url, data))
        return defer.succeed(200)

    counts = TLSCounts(runtime.reactor)
    reporter = TLSReporter(runtime, counts, post=post)
    reporter._trust_root = object()
    return runtime, counts, reporter, added, posted


def test_reports_sent_at_the_hour_to_each_rua(reporting, tmp_path):
    runtime, counts, reporter, added, posted = reporting
    reporter.startService()
    a_day(counts)
    runtime.reactor.advance(23 * 3600 - 1)
    assert posted == [] and added == []
    runtime.reactor.advance(1)  # midnight UTC
    # example.net: queued mail to tls@example.net and a POST; sts.test: a local postmaster
    # alias (delivered at once); other.test: its lookup failed, logged.
    assert [url for url, _ in posted] == ["https://r.test/x"]
    report = json.loads(gzip.decompress(posted[0][1]))
    validate(report, SCHEMA)
    assert report["contact-info"] == "postmaster@example.org"  # mx.example.org's parent
    assert report["date-range"]["start-datetime"] == "2026-12-02T01:00:00Z"
    assert report["date-range"]["end-datetime"] == "2026-12-03T00:00:00Z"
    [entry] = added
    assert [r.address for r in entry.pending] == ["tls@example.net"]
    assert entry.sender in (None, "")
    assert runtime.resolver.asked == ["_smtp._tls.example.net", "_smtp._tls.other.test",
                                      "_smtp._tls.sts.test"]
    assert counts.tallies == {}
    reporter.stopService()


def test_send_now_answers_what_went(reporting):
    runtime, counts, reporter, added, posted = reporting
    a_day(counts)
    answer = reporter.send_now()
    assert answer.called
    assert answer.result == ("ok: 3 report(s): example.net -> mailto:tls@example.net; "
                             "example.net -> https://r.test/x; sts.test -> "
                             "mailto:postmaster@example.org")
    again = reporter.send_now()
    assert again.result == "ok: no policy domain with a _smtp._tls record"


# --- mailsrv tls-report, and its request to the running server ------------------------------


def test_send_now_request_answered_by_the_reporter(tmp_path):
    from mailsrv.outbound.control import CONTROL_POLL, ControlChannel
    from mailsrv.storage import queue, queue_control

    qdir = tmp_path / "q"
    queue.queue_dirs(qdir)
    clock = task.Clock()
    actions = type("Actions", (), {"messages": {}})()
    control = ControlChannel(qdir, clock, actions, in_thread=lambda f, *a: defer.maybeDeferred(
        f, *a), ready=lambda: True)
    control.start()
    unconfigured = queue_control.control_request(qdir, "tlsreport", None)
    clock.advance(CONTROL_POLL)
    assert unconfigured.read_text().startswith("error: the server does not do tlsreport")
    waiting: defer.Deferred = defer.Deferred()
    control.extra["tlsreport"] = lambda: waiting
    answer = queue_control.control_request(qdir, "tlsreport", None)
    clock.advance(CONTROL_POLL)
    assert not answer.exists()  # answered once the reports went
    waiting.callback("ok: 1 report(s): x.test -> mailto:a@x.test")
    assert answer.read_text() == "ok: 1 report(s): x.test -> mailto:a@x.test\n"
    control.stop()


@pytest.fixture
def configured(tmp_path):
    from support.harness import MailServer

    server = MailServer(tmp_path, dns_port=53, overrides={
        "tls_reports": {"enabled": True, "organization": "Example Org"}})
    (tmp_path / "queue").mkdir()
    return server


def run_cli(server, *args):
    from mailsrv.tools import cli

    return cli.main(["tls-report", "--config", str(server.config_path), *args])


def test_tls_report_prints_the_counts_so_far(configured, capsys):
    assert run_cli(configured) == 0
    assert "no counts yet" in capsys.readouterr().out
    clock = task.Clock()
    clock.advance(DAY)
    counts = TLSCounts(clock, configured.queue / "tlsrpt.json")
    a_day(counts)
    counts.stop()
    assert run_cli(configured) == 0
    reports = json.loads(capsys.readouterr().out)
    assert sorted(reports) == ["example.net", "other.test", "sts.test"]
    for report in reports.values():
        validate(report, SCHEMA)
    assert reports["example.net"]["organization-name"] == "Example Org"
    assert reports["example.net"]["contact-info"] == "postmaster@example.org"
    assert reports["example.net"]["date-range"]["start-datetime"] == "2026-12-02T00:00:00Z"


def test_send_now_needs_a_running_server_and_the_switch(configured, capsys, tmp_path):
    assert run_cli(configured, "--send-now") == 1
    assert "no server is running" in capsys.readouterr().err
    configured.set_config("tls_reports", "enabled", False)
    assert run_cli(configured) == 1
    assert "[tls_reports] enabled is false" in capsys.readouterr().err


def test_contact_info_always_has_a_domain(tmp_path):
    from mailsrv.outbound.tlsrpt.reporter import contact_info
    from mailsrv.routing.router import Directory

    runtime = queue_runtime(tmp_path)
    config = runtime.config
    assert contact_info(config, runtime.directory) == "postmaster@example.org"
    elsewhere = Directory(["other.test"], frozenset(), {})
    assert contact_info(config, elsewhere) == "postmaster@mx.example.org"
    chosen = dataclasses.replace(config, tls_reports=TlsReportsConfig(contact="tls@x.test"))
    assert contact_info(chosen, runtime.directory) == "tls@x.test"


# --- DANE's attempts (mailsrv.outbound.danetls.TLSAttempt) and relay.tls's, side by side -----


def test_dane_attempts_counted_as_tlsa_and_never_twice(tmp_path):
    try:
        from twisted.internet.testing import MemoryReactor
    except ImportError:  # Twisted 22.4
        from twisted.test.proto_helpers import MemoryReactor
    from twisted.internet import error as net_error
    from twisted.python.failure import Failure

    from mailsrv.outbound.dane import TLSA
    from mailsrv.outbound.danelookup import DaneLookupFailed, DanePolicy
    from mailsrv.outbound.destination import DestinationDelivery
    from mailsrv.outbound.mx import MXHost
    from mailsrv.outbound.transaction import OutboundTransaction
    from mailsrv.routing.router import Directory
    from mailsrv.runtime import Runtime
    from support.config import minimal_config

    hosts = [MXHost("mx1.remote.test", 10, ("192.0.2.1",)),
             MXHost("mx2.remote.test", 20, ("192.0.2.2",)),
             MXHost("mx3.remote.test", 30, ("192.0.2.3",))]
    policy = DanePolicy("mx2.remote.test", "mx2.remote.test", (TLSA(3, 1, 1, b"\1" * 32),))
    plan = {"mx1.remote.test": DaneLookupFailed("mx1.remote.test", "dnssec-invalid", "bogus"),
            "mx2.remote.test": policy}  # mx3: no TLSA records, relay.tls as before
    config = minimal_config(tmp_path, relay={"dane": True, "dns_servers": ["127.0.0.1"]})
    counts = TLSCounts(task.Clock())
    runtime = Runtime(config=config, directory=Directory(["example.org"], frozenset(), {}),
                      reactor=MemoryReactor(), tls_counts=counts)
    destinations = DestinationDelivery(runtime, rng=None)
    destinations._dane = type("Plan", (), {"plan": lambda self, d, h: defer.succeed(plan)})()
    destinations.route = lambda key: defer.succeed(hosts)
    results.listen_to_attempts(destinations, counts)
    destinations.deliver("remote.test", [("Q1", ["a@remote.test"])], lambda items: [
        OutboundTransaction(queue_id=q, sender="s@example.org", recipients=list(a), prefix=b"",
                            body_path=None) for q, a in items], lambda *a, **k: None)
    for index in (0, 1):  # mx2 (DANE) then mx3 (opportunistic): greeted, no STARTTLS
        factory = runtime.reactor.tcpClients[index][2]
        factory.outcome.greeted, factory.outcome.starttls_offered = True, False
        factory.clientConnectionLost(None, Failure(net_error.ConnectionDone()))
    # mx1's failed lookup has no records to show: a policy of its own (an empty string)
    tallies = {(t.key.policy_type, t.key.policy_string): t for t in counts.tallies.values()}
    records = ("3 1 1 " + "01" * 32,)
    assert sorted(tallies) == [("no-policy-found", ()), ("tlsa", ()), ("tlsa", records)]
    assert [d[:3] for d in tallies["tlsa", ()].details] == [
        ("dnssec-invalid", "mx1.remote.test", "")]
    assert [d[:3] for d in tallies["tlsa", records].details] == [
        ("starttls-not-supported", "mx2.remote.test", "192.0.2.2")]
    plain = tallies["no-policy-found", ()]  # the DANE session was not counted here too
    assert (plain.failures, list(plain.details)[0][:3]) == (
        1, ("starttls-not-supported", "mx3.remote.test", "192.0.2.3"))
    tlsa = tallies["tlsa", ()]
    body = document.build_report(organization="o", contact="c@x.test", report_id="r",
                                 since=0, until=86400, tallies=[tlsa])
    validate(body, SCHEMA)
    lookup = [d for d in body["policies"][0]["failure-details"]
              if d["result-type"] == "dnssec-invalid"][0]
    assert "receiving-ip" not in lookup  # no connection was made


def test_mta_sts_attempts_reported_with_the_policys_mx_patterns():
    """An attempt under an MTA-STS policy (as mailsrv.outbound.tlsplan makes them) is counted
    under policy-type sts, and the report names the policy's mx patterns as mx-host."""
    from mailsrv.outbound.danetls import TLSAttempt

    counts = TLSCounts(task.Clock())
    lines = ("version: STSv1", "mode: enforce", "mx: *.remote.test", "max_age: 86400")
    for ip, result in (("192.0.2.1", None), ("192.0.2.2", "certificate-host-mismatch")):
        results.record_attempt(counts, TLSAttempt(
            "sts", "remote.test", lines, "mx1.remote.test", ip, result, detail="",
            mx_patterns=("*.remote.test",)))
    [tally] = counts.tallies.values()
    body = document.build_report(organization="o", contact="c@x.test", report_id="r",
                                 since=0, until=86400, tallies=[tally])
    validate(body, SCHEMA)
    [policy] = body["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-string": list(lines),
                                "policy-domain": "remote.test", "mx-host": ["*.remote.test"]}
    assert policy["summary"] == {"total-successful-session-count": 1,
                                 "total-failure-session-count": 1}
    assert [d["result-type"] for d in policy["failure-details"]] == ["certificate-host-mismatch"]
