"""
The reports RFC 3461's NOTIFY and RET ask for, as the sender gets them: every combination
through the relayer (failure, relayed success, delay) and local delivery, each report parsed
back with the ``email`` module.  In-process: the relayer on a task.Clock, its "threads" run at
once, a scripted next hop; the session on a StringTransport.
"""

from __future__ import annotations

import email
import itertools
import json
import time
from dataclasses import replace
from email.message import Message
from ipaddress import ip_network

import pytest
from twisted.internet import defer

from mailsrv.outbound.relayer import Relayer
from mailsrv.replies import Reply
from mailsrv.routing.dsn_params import MailDSN, RecipientDSN
from mailsrv.storage import queue
from support.inprocess import CLIENT, Connection
from support.queue_runtime import SyncWorkers, maildir_of, queue_runtime

WHERE = "mx1.remote.test[192.0.2.25]:25"
OK = Reply(250, "2.0.0", "Ok: queued as R1")
LATER = Reply(451, "4.3.0", "try again later")
NO_USER = Reply(550, "5.1.1", "no such user")
FAIL, GOOD, SLOW = "fail@remote.test", "good@remote.test", "slow@remote.test"
SCRIPT = {FAIL: NO_USER, GOOD: OK, SLOW: LATER}
BODY = b"Subject: hello\nMessage-ID: <m1@example.org>\n\nthe secret body\n"

NOTIFIES = [None, ("NEVER",)] + [
    combo for n in (1, 2, 3) for combo in itertools.combinations(("SUCCESS", "FAILURE", "DELAY"), n)]
RETS = [None, "FULL", "HDRS"]


def reports_of(tmp_path) -> list[Message]:
    """The reports in alice's Maildir, parsed with the email module."""
    if not (tmp_path / "mail" / "example.org" / "alice").exists():
        return []
    box = maildir_of(tmp_path)
    return [email.message_from_bytes(box.get_bytes(key)) for key in sorted(box.keys())]


def parts(report: Message) -> tuple[Message, list[Message], Message]:
    """(the text part, the delivery-status blocks, the returned part) of a report."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    text, status, returned = report.get_payload()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    return text, status.get_payload(), returned


def relay_once(tmp_path, notify, ret, peer_dsn: bool = False, envid: str | None = "env+1"):
    """A message from alice@example.org to FAIL, GOOD, SLOW with ``notify`` and ``ret``,
    queued two hours ago (past delay_warning), given one attempt at a next hop."""
    runtime = queue_runtime(tmp_path, retry_schedule=[60], delay_warning=3600)
    relayer = Relayer(runtime)

    def deliver(key, batch, make_transactions, record):
        for t in make_transactions(batch):
            record(t.queue_id, {a: SCRIPT[a] for a in t.recipients}, WHERE, tls=None,
                   dsn=peer_dsn)
        return defer.succeed(None)

    relayer.destinations.deliver = deliver
    qdir = runtime.config.queue.path
    body = qdir / "incoming" / "Q1"
    body.write_bytes(BODY)
    queue.enqueue(
        qdir, "Q1", sender="alice@example.org", recipients=[FAIL, GOOD, SLOW],
        prefix=b"Received: from client by mx.example.org\n", body_path=body,
        created=time.time() - 7200, received_from="client.test[192.0.2.9]",
        dsn=MailDSN(ret=ret, envid=envid),
        recipient_dsn={a: RecipientDSN(notify, f"rfc822;orig-{a}") for a in SCRIPT})
    relayer.startService()
    runtime.reactor.advance(0)
    relayer.stopService()
    return runtime


@pytest.mark.parametrize("ret", RETS, ids=str)
@pytest.mark.parametrize("notify", NOTIFIES, ids=lambda n: ",".join(n) if n else "none")
def test_every_notify_and_ret_combination(tmp_path, notify, ret) -> None:
    relay_once(tmp_path, notify, ret)
    wants = set(notify) if notify is not None else {"FAILURE", "DELAY"}
    expected = {  # report kind -> the recipient it is about
        "failed": FAIL if "FAILURE" in wants else None,
        "relayed": GOOD if "SUCCESS" in wants else None,
        "delayed": SLOW if "DELAY" in wants else None,
    }
    got = {}
    for report in reports_of(tmp_path):
        assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
        assert report["To"] == "<alice@example.org>"
        text, (about, *recipients), returned = parts(report)
        assert about["Original-Envelope-Id"] == "env+1"  # ENVID decoded
        assert about["Reporting-MTA"] == "dns; mx.example.org"
        (r,) = recipients
        action = r["Action"]
        got[action] = r["Final-Recipient"].removeprefix("rfc822; ")
        assert r["Original-Recipient"] == f"rfc822;orig-{got[action]}"
        assert r["Remote-MTA"] == "dns; mx1.remote.test"
        if action == "failed":
            assert report["Subject"] == "Undelivered Mail Returned to Sender"
            assert r["Status"] == "5.1.1" and "no such user" in r["Diagnostic-Code"]
            if ret == "FULL":  # the whole message comes back
                assert returned.get_content_type() == "message/rfc822"
                (original,) = returned.get_payload()
                assert original["Subject"] == "hello"
                assert original.get_payload() == "the secret body\n"
                assert "Your message is attached below." in text.get_payload()
            else:  # HDRS, or no RET: our default, the headers only
                assert returned.get_content_type() == "text/rfc822-headers"
                assert "Subject: hello" in returned.get_payload()
                assert "secret body" not in report.as_string()
        elif action == "relayed":
            assert report["Subject"] == "Successful Mail Delivery Report"
            assert r["Status"] == "2.0.0" and "Ok: queued as R1" in r["Diagnostic-Code"]
            assert returned.get_content_type() == "text/rfc822-headers"
            assert "secret body" not in report.as_string()  # RET is about failures only
            assert "that offers no delivery notifications" in " ".join(text.get_payload().split())
        else:
            assert action == "delayed"
            assert report["Subject"] == "Delayed Mail (still being retried)"
            assert r["Status"] == "4.3.0" and r["Will-Retry-Until"]
            assert returned.get_content_type() == "text/rfc822-headers"
            assert "secret body" not in report.as_string()
    assert got == {kind: who for kind, who in expected.items() if who}


@pytest.mark.parametrize("notify", [("SUCCESS",), ("SUCCESS", "FAILURE", "DELAY")], ids=str)
def test_a_next_hop_that_offers_dsn_reports_success_itself(tmp_path, notify) -> None:
    relay_once(tmp_path, notify, "HDRS", peer_dsn=True, envid=None)
    reports = [parts(r)[1] for r in reports_of(tmp_path)]
    assert sorted(r[1]["Action"] for r in reports) == (
        ["delayed", "failed"] if len(notify) == 3 else [])
    assert all(r[0]["Original-Envelope-Id"] is None for r in reports)  # no ENVID, none written


def test_ret_full_over_the_limit_returns_the_headers(tmp_path, monkeypatch) -> None:
    from mailsrv.outbound import bounce
    monkeypatch.setattr(bounce, "FULL_RETURN_LIMIT", len(BODY))  # the prefix makes it too big
    relay_once(tmp_path, ("FAILURE",), "FULL")
    (report,) = reports_of(tmp_path)
    assert parts(report)[2].get_content_type() == "text/rfc822-headers"
    assert "secret body" not in report.as_string()


def test_the_administrators_bounce_honours_never(tmp_path) -> None:
    runtime = queue_runtime(tmp_path, retry_schedule=[60])
    relayer = Relayer(runtime)

    def deliver(key, batch, make_transactions, record):
        for t in make_transactions(batch):  # deferred, until the administrator bounces it
            record(t.queue_id, {a: LATER for a in t.recipients}, WHERE)
        return defer.succeed(None)

    relayer.destinations.deliver = deliver
    qdir = runtime.config.queue.path
    for n, notify in enumerate([("NEVER",), None]):
        body = qdir / "incoming" / f"Q{n}"
        body.write_bytes(BODY)
        queue.enqueue(qdir, f"Q{n}", sender="alice@example.org", recipients=[FAIL], prefix=b"",
                      body_path=body, created=time.time(), received_from="local",
                      recipient_dsn={FAIL: RecipientDSN(notify)})
    relayer.startService()
    runtime.reactor.advance(0)
    relayer.bounce("Q0")
    relayer.bounce("Q1")
    (report,) = reports_of(tmp_path)  # Q1's only: Q0 asked for NEVER
    assert parts(report)[1][0]["X-Mailsrv-Queue-ID"] == "Q1"
    relayer.stopService()


# --- local delivery: the "delivered" report ------------------------------------------------


def local_session(tmp_path, *rcpt_lines: str, sender: str = "alice@example.org",
                  trusted: bool = True):
    runtime = queue_runtime(tmp_path, users=("alice@example.org", "bob@example.org"))
    if trusted:
        relay = replace(runtime.config.relay, trusted_networks=(ip_network(f"{CLIENT}/32"),))
        runtime.config = replace(runtime.config, relay=relay)  # the client may relay
    runtime.workers = SyncWorkers()
    session = Connection.to(runtime)
    session.output()
    replies = session.send("EHLO client.test", f"MAIL FROM:<{sender}> RET=FULL ENVID=E+2B1",
                           *rcpt_lines, "DATA", "Subject: local", "", "the secret body", ".")
    return runtime, replies


def test_local_delivery_with_notify_success_reports_delivered(tmp_path) -> None:
    _, replies = local_session(
        tmp_path, "RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+40x",
        "RCPT TO:<alice@example.org>")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    assert "250-DSN" in replies or "250 DSN" in replies
    assert len(list(maildir_of(tmp_path, "bob"))) == 1
    delivered = [m for m in reports_of(tmp_path) if m["Subject"] != "local"]
    (report,) = delivered  # alice's own copy, and one report: bob's (alice gave no NOTIFY)
    assert report["Subject"] == "Successful Mail Delivery Report"
    text, (about, r), returned = parts(report)
    assert about["Original-Envelope-Id"] == "E+1"
    assert (r["Action"], r["Status"]) == ("delivered", "2.0.0")
    assert r["Final-Recipient"] == "rfc822; bob@example.org"
    assert r["Original-Recipient"] == "rfc822;Bob@x"
    assert r["Remote-MTA"] is None
    assert "delivered to mailbox" in text.get_payload()
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: local" in returned.get_payload()
    assert "secret body" not in report.as_string()  # RET=FULL is for failures only


@pytest.mark.parametrize("notify", ["", " NOTIFY=FAILURE,DELAY", " NOTIFY=NEVER"])
def test_local_delivery_without_success_reports_nothing(tmp_path, notify) -> None:
    _, replies = local_session(tmp_path, f"RCPT TO:<bob@example.org>{notify}")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    assert reports_of(tmp_path) == []


def test_a_remote_sender_gets_the_delivered_report_through_the_queue(tmp_path) -> None:
    runtime, replies = local_session(tmp_path, "RCPT TO:<bob@example.org> NOTIFY=SUCCESS",
                                     sender="dave@remote.test")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    (envelope,) = (runtime.config.queue.path / "messages").glob("*.json")
    queued = json.loads(envelope.read_text())
    assert queued["sender"] == "" and [r["address"] for r in queued["recipients"]] == [
        "dave@remote.test"]
    report = email.message_from_bytes(envelope.with_suffix(".body").read_bytes())
    assert parts(report)[1][1]["Action"] == "delivered"


def test_the_dsn_parameters_of_a_relayed_recipient_are_queued(tmp_path) -> None:
    runtime, replies = local_session(
        tmp_path, "RCPT TO:<carol@remote.test> NOTIFY=DELAY ORCPT=rfc822;carol+2Bx@remote.test",
        "RCPT TO:<erin@remote.test>")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    (envelope,) = (runtime.config.queue.path / "messages").glob("*.json")
    queued = json.loads(envelope.read_text())
    assert (queued["ret"], queued["envid"]) == ("FULL", "E+1")
    carol, erin = queued["recipients"]
    assert (carol["notify"], carol["orcpt"]) == (["DELAY"], "rfc822;carol+x@remote.test")
    assert "notify" not in erin and "orcpt" not in erin


@pytest.mark.parametrize("forged", [None, "rspamd add header"])
def test_no_delivered_report_to_a_likely_forged_sender(tmp_path, monkeypatch, forged) -> None:
    from mailsrv.inbound import message_intake
    monkeypatch.setattr(message_intake, "forged_sender", lambda auth, spam: forged)
    runtime, replies = local_session(tmp_path, "RCPT TO:<bob@example.org> NOTIFY=SUCCESS",
                                     sender="dave@remote.test", trusted=False)
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    queued = list((runtime.config.queue.path / "messages").glob("*.json"))
    assert len(queued) == (0 if forged else 1)  # the report to dave, unless he is forged
