"""The daily report (mailsrv.report, mailsrv.outbound.daily): a day of known traffic through
real in-process sessions, the report checked figure by figure; the next day counting from
the first; when it is sent; the warnings."""

from __future__ import annotations

import datetime
import email
import email.policy
import re

import pytest

from mailsrv import report
from mailsrv.config import parse_config
from mailsrv.metrics import Metrics, Volume, snapshot
from mailsrv.outbound.daily import DailyReport, doctor_findings
from mailsrv.routing.router import Directory
from support.inprocess import CLIENT, Connection, factory_for, make_runtime

TZ = datetime.timezone(datetime.timedelta(hours=1), "CET")
#: 2026-12-02 06:00 CET: the clock of these tests starts at a report time.
START = datetime.datetime(2026, 12, 2, 6, 0, tzinfo=TZ).timestamp()


def send(runtime, sender: str, recipients: list[str], body: str = "hello",
         ip: str = CLIENT) -> list[str]:
    """One session: EHLO, MAIL, each RCPT, DATA if one was taken; the replies."""
    connection = Connection(factory_for(runtime), ip)
    out = connection.output()
    out += connection.send("EHLO client.test", f"MAIL FROM:<{sender}>")
    taken = 0
    for rcpt in recipients:
        reply = connection.send(f"RCPT TO:<{rcpt}>")
        out += reply
        taken += reply[0].startswith("250")
    if taken:
        out += connection.send("DATA")
        out += connection.send(f"Subject: t\r\n\r\n{body}\r\n.")
    out += connection.send("QUIT")
    connection.lose()
    return out


def line(text: str, label: str) -> str:
    """The figure after ``label`` on its line of the report."""
    found = re.search(rf"^  {re.escape(label)}\s+(.+)$", text, re.M)
    assert found, f"no line {label!r} in:\n{text}"
    return found.group(1).strip()


@pytest.fixture
def runtime(tmp_path):
    runtime = make_runtime(tmp_path)
    runtime.directory = Directory(
        ["example.org"], frozenset({"alice@example.org", "bob@example.org"}),
        {"postmaster@example.org": ("alice@example.org",)})
    return runtime


def a_day_of_traffic(runtime) -> None:
    for _ in range(3):
        assert send(runtime, "news@remote.test", ["alice@example.org"], "x" * 90)[-2] \
            .startswith("250 2.0.0 Ok: queued")
    send(runtime, "friend@remote.test", ["alice@example.org", "bob@example.org"])
    send(runtime, "spam@remote.test", ["nobody@example.org"])  # unknown: refused
    send(runtime, "spam@remote.test", ["someone@elsewhere.test"])  # relaying: refused
    send(runtime, "spam@remote.test", ["nobody@example.org", "alice@example.org"])
    # what the relayer counts (its own counting is tests/e2e/test_metrics_endpoint.py's)
    m = runtime.metrics
    for status in ("sent", "sent", "deferred", "bounced"):
        m.relay_result(status, "mx")
    m.dsn("failure")
    for result in ("success", "failure", "failure", "lockout", "locked_out"):
        m.auth(result)


def test_a_day_of_known_traffic_figure_by_figure(runtime):
    daily = DailyReport(runtime, now=lambda: START)
    a_day_of_traffic(runtime)
    daily.now = lambda: START + 86400
    text = daily.text()
    assert text.startswith(f"mailsrv on mx.example.org: the day from "
                           f"{datetime.datetime.fromtimestamp(START).astimezone():%Y-%m-%d %H:%M}")
    assert "the figures cover the time since the start" in text  # the first report
    received = line(text, "received (accepted)")
    assert received.split()[0] == "5"
    assert line(text, "delivered to mailboxes") == "6"  # 3 + 2 + 1 copies
    assert line(text, "relayed") == "2"
    assert line(text, "deferred (attempts)") == "1"
    assert line(text, "bounced") == "1"
    assert line(text, "expired in the queue") == "0"
    assert line(text, "DSNs sent") == "1"
    assert line(text, "connections") == "7"
    assert line(text, "rcpt local_recipient") == "2"
    assert line(text, "rcpt relay_access") == "1"
    assert line(text, "<news@remote.test>") == "3 message(s), 309 bytes"  # "Subject: t\n\n" + body + "\n"
    assert line(text, "<friend@remote.test>") == "1 message(s), 18 bytes"
    assert line(text, "<spam@remote.test>") == "1 message(s), 18 bytes"
    top_senders = text.split("Top senders")[1].split("Top recipients")[0]
    assert top_senders.index("<news@") < top_senders.index("<friend@")  # most messages first
    assert line(text, "<alice@example.org>") == "5 message(s), 345 bytes"
    assert line(text, "<bob@example.org>") == "1 message(s), 18 bytes"
    assert line(text, "successes") == "1"
    assert line(text, "failures") == "2"
    assert line(text, "lockouts") == "1"
    assert line(text, "refused while locked out") == "1"
    assert "Queue now\n  not loaded yet" in text  # no relayer in this runtime
    assert "Warnings\n  none" in text


def test_the_next_day_counts_from_the_last_report(runtime):
    daily = DailyReport(runtime, now=lambda: START)
    a_day_of_traffic(runtime)
    daily.text()
    send(runtime, "late@remote.test", ["bob@example.org"])
    daily.now = lambda: START + 2 * 86400
    text = daily.text()
    assert "since the start" not in text
    assert line(text, "received (accepted)").split()[0] == "1"
    assert line(text, "delivered to mailboxes") == "1"
    assert line(text, "relayed") == "0"
    assert line(text, "failures") == "0"
    assert "Top refusal reasons (stage, reason)\n  none" in text
    assert line(text, "<late@remote.test>") == "1 message(s), 18 bytes"
    assert "<news@remote.test>" not in text  # the volumes started again


def test_sent_to_the_postmaster_at_the_hour(runtime, tmp_path):
    clock = runtime.reactor
    clock.advance(START - clock.seconds() - 3600)  # 05:00
    daily = DailyReport(runtime)
    daily.startService()
    send(runtime, "news@remote.test", ["alice@example.org"])
    inbox = tmp_path / "mail" / "example.org" / "alice" / "new"
    before = len(list(inbox.iterdir()))
    clock.advance(3599)
    assert len(list(inbox.iterdir())) == before
    clock.advance(1)  # 06:00 (in the machine's time zone: the hour of the local clock)
    hour = datetime.datetime.fromtimestamp(clock.seconds()).astimezone().hour
    if hour != runtime.config.report.hour:
        clock.advance((runtime.config.report.hour - hour) % 24 * 3600)
    files = sorted(inbox.iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(files) == before + 1
    parsed = email.message_from_bytes(files[-1].read_bytes(), policy=email.policy.default)
    assert parsed["To"] == "postmaster@example.org"
    assert parsed["Subject"].startswith("mailsrv daily report for mx.example.org: ")
    assert parsed["Auto-Submitted"] == "auto-generated"
    text = parsed.get_content()
    assert line(text, "received (accepted)").split()[0] == "1"
    assert daily._call is not None and daily._call.active()  # tomorrow's
    assert daily._call.getTime() - clock.seconds() == pytest.approx(86400, abs=3600)
    daily.stopService()
    assert not daily._call


# --------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("now, hour, expected", [
    (datetime.datetime(2026, 12, 2, 5, 59, tzinfo=TZ), 6, datetime.datetime(2026, 12, 2, 6, 0)),
    (datetime.datetime(2026, 12, 2, 6, 0, tzinfo=TZ), 6, datetime.datetime(2026, 12, 3, 6, 0)),
    (datetime.datetime(2026, 12, 2, 23, 30, tzinfo=TZ), 0, datetime.datetime(2026, 12, 3, 0, 0)),
    (datetime.datetime(2026, 12, 31, 7, 0, tzinfo=TZ), 6, datetime.datetime(2027, 1, 1, 6, 0)),
])
def test_next_run(now, hour, expected):
    assert report.next_run(now, hour) == expected.replace(tzinfo=TZ)


def test_difference_takes_a_restarted_counter_whole():
    before = {("a_total", ()): 10.0, ("b_total", ()): 5.0}
    now = {("a_total", ()): 12.0, ("b_total", ()): 2.0, ("c_total", ()): 1.0}
    assert report.difference(now, before) == {
        ("a_total", ()): 2.0, ("b_total", ()): 2.0, ("c_total", ()): 1.0}


def test_snapshot_reads_counters_and_histogram_counts():
    m = Metrics()
    m.accepted("smtp", 100, 1, 0, started=0.0)
    figures = snapshot(m.registry)
    assert figures[("mailsrv_messages_accepted_total", (("listener", "smtp"),))] == 1
    assert figures[("mailsrv_delivery_latency_seconds_count", ())] == 1
    assert not any(name.endswith("_created") for name, _ in figures)


def test_volume_is_bounded_and_taken():
    volume = Volume(limit=2)
    for address in ("<a@x>", "<b@x>", "<c@x>", "<d@x>", "<a@x>"):
        volume.add(address, 10)
    assert volume.take() == {"<a@x>": (2, 20), "<b@x>": (1, 10), Volume.OTHERS: (2, 20)}
    assert volume.take() == {}


@pytest.mark.parametrize("figures, queue, cert_days, expected", [
    ({}, None, None, []),
    ({}, None, 13.5, ["the TLS certificate expires in 13.5 days: renew it"]),
    ({}, None, 14.5, []),
    ({}, None, -1, ["the TLS certificate has expired"]),
    ({}, report.QueueState(1, 1, 90000.0), None, ["a message has waited 25.0 hours"]),
    ({("mailsrv_reloads_total", (("result", "failed"), ("what", "tls"))): 1.0}, None, None,
     ["1 reload(s) refused"]),
    ({("mailsrv_relay_attempts_total", (("destination", "mx"), ("result", "sent"))): 7.0,
      ("mailsrv_relay_attempts_total", (("destination", "mx"), ("result", "deferred"))): 3.0},
     None, None, ["3 of 10 relay attempts failed"]),
    ({("mailsrv_relay_attempts_total", (("destination", "mx"), ("result", "sent"))): 8.0,
      ("mailsrv_relay_attempts_total", (("destination", "mx"), ("result", "deferred"))): 2.0},
     None, None, []),
])
def test_warnings(figures, queue, cert_days, expected):
    now = 1_800_000_000.0
    expires = None if cert_days is None else now + cert_days * 86400
    got = report.warnings(figures, queue, expires, now)
    assert len(got) == len(expected)
    for warning, start in zip(got, expected):
        assert warning.startswith(start), warning


def test_report_keys():
    base = {"hostname": "mx.example.org", "domains": {"local": ["example.org"]},
            "mailboxes": {"root": "/srv/mail"}, "queue": {"path": "/srv/queue"}}
    config = parse_config(base, None)
    assert (config.report.daily, config.report.hour) == (False, 6)
    config = parse_config({**base, "report": {"daily": True, "hour": 0}}, None)
    assert (config.report.daily, config.report.hour) == (True, 0)
    from mailsrv.config import ConfigError

    for bad in ({"hour": 24}, {"hour": -1}, {"daily": "yes"}, {"when": 6}):
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, "report": bad}, None)
        assert caught.value.key.startswith("report.")



def test_the_doctors_findings_are_in_the_report(runtime):
    """What ``mailsrv doctor`` found wrong is a section of the report ("not run" for the
    built-in configuration, which the doctor has no file of)."""
    seen = []

    def doctor(config):
        seen.append(config)
        return ["problem: dns DKIM example.org: no record; fix: publish it"]

    daily = DailyReport(runtime, now=lambda: START, doctor=doctor)
    daily.send()
    assert seen == [runtime.config]
    inbox = runtime.config.mailboxes.root / "example.org" / "alice" / "new"
    [stored] = list(inbox.iterdir())
    text = email.message_from_bytes(stored.read_bytes(), policy=email.policy.default).get_content()
    assert "\nmailsrv doctor\n  - problem: dns DKIM example.org: no record; fix: publish it\n" in text
    assert "\nmailsrv doctor\n  all ok\n" in DailyReport(runtime, doctor=lambda c: []).text([])
    assert "\nmailsrv doctor\n  not run\n" in DailyReport(runtime).text(
        doctor_findings(runtime.config))
