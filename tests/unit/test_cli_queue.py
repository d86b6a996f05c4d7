"""``mailsrv queue`` on a real queue with no server running (the command holds the lock)."""

from __future__ import annotations

import email
import email.policy
import io
import json
import time
from dataclasses import replace

import pytest

from mailsrv.storage import queue, queue_control
from mailsrv.storage.envelope import SENT
from mailsrv.tools import cli
from support.harness import MailServer


@pytest.fixture
def offline(tmp_path):
    """A configured (not started) server whose queue holds two messages."""
    server = MailServer(tmp_path, dns_port=53)  # never started: no DNS is asked
    qdir = server.queue
    queue.queue_dirs(qdir)
    for queue_id, sender in (("AAAAAAAAAAAAA1", "alice@example.org"), ("AAAAAAAAAAAAA2", "")):
        body = qdir / "incoming" / queue_id
        body.write_bytes(b"Subject: queued " + queue_id.encode() + b"\n\nbody\n")
        queue.enqueue(qdir, queue_id, sender=sender or None,
                      recipients=["bob@remote.test", "carl@remote.test"],
                      prefix=b"Received: by mx.example.org (mailsrv) id " + queue_id.encode() + b"\n",
                      body_path=body, created=time.time() - 7200, received_from="client.test[127.0.0.1]")
    return server


def run(offline: MailServer, *args: str) -> int:
    return cli.main(["queue", "--config", str(offline.config_path), *args])


def test_list(offline, capsys):
    message = queue.read_message(offline.queue / "messages" / "AAAAAAAAAAAAA1.json")
    queue.save(offline.queue, message.update({"bob@remote.test": replace(
        message.recipients[0], status=SENT, attempts=1)}))
    assert run(offline, "list") == 0
    out = capsys.readouterr().out
    assert "AAAAAAAAAAAAA1    2h" in out and "<alice@example.org>" in out and "<>" in out
    assert "<bob@remote.test>  sent  tries=1" in out
    assert "2 message(s), 3 recipient(s) waiting" in out


def test_list_json_and_empty(offline, capsys):
    assert run(offline, "list", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in data] == ["AAAAAAAAAAAAA1", "AAAAAAAAAAAAA2"]
    assert data[0]["recipients"][0]["address"] == "bob@remote.test" and data[0]["size"] > 0
    for queue_id in ("AAAAAAAAAAAAA1", "AAAAAAAAAAAAA2"):
        queue.remove(offline.queue, queue_id)
    assert run(offline, "list") == 0
    assert capsys.readouterr().out == "Mail queue is empty\n"


def test_show(offline, capsys):
    assert run(offline, "show", "AAAAAAAAAAAAA1") == 0
    out = capsys.readouterr().out
    assert "sender: <alice@example.org>" in out and "recipient <carl@remote.test>: queued" in out
    assert "Subject: queued AAAAAAAAAAAAA1" in out and "\nbody" not in out
    assert run(offline, "show", "NOSUCHMESSAGE1") == 1
    assert "no message NOSUCHMESSAGE1" in capsys.readouterr().err


def test_invalid_id_is_a_usage_error(offline, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(offline, "show", "../etc")
    assert exit_info.value.code == 2


def test_flush_offline(offline, capsys):
    qdir = offline.queue
    message = queue.read_message(qdir / "messages" / "AAAAAAAAAAAAA1.json")
    queue.save(qdir, message.update({r.address: replace(r, next_attempt=time.time() + 9999)
                                     for r in message.recipients}))
    assert run(offline, "flush", "AAAAAAAAAAAAA1") == 0
    assert "no server is running" in capsys.readouterr().out
    after = queue.read_message(qdir / "messages" / "AAAAAAAAAAAAA1.json")
    assert all(r.next_attempt <= time.time() for r in after.recipients)


def test_delete_offline(offline, capsys):
    assert run(offline, "delete", "AAAAAAAAAAAAA1") == 0
    assert sorted(p.name for p in (offline.queue / "messages").iterdir()) == [
        "AAAAAAAAAAAAA2.body", "AAAAAAAAAAAAA2.json"]
    assert run(offline, "delete", "AAAAAAAAAAAAA1") == 1


def test_bounce_offline_sends_a_dsn(offline, capsys):
    assert run(offline, "bounce", "AAAAAAAAAAAAA1") == 0
    [dsn] = offline.messages("alice@example.org")
    parsed = email.message_from_bytes(dsn.as_bytes(), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    text = parsed.as_string()
    assert "bob@remote.test" in text and "carl@remote.test" in text
    assert "administrator" in text and "Subject: queued AAAAAAAAAAAAA1" in text
    assert not (offline.queue / "messages" / "AAAAAAAAAAAAA1.json").exists()
    # A message from <> is never bounced: removed, nothing sent.
    assert run(offline, "bounce", "AAAAAAAAAAAAA2") == 0
    assert "no DSN sent" in capsys.readouterr().out
    assert list((offline.queue / "messages").iterdir()) == []
    assert len(offline.messages("alice@example.org")) == 1


def test_server_running_but_not_answering(offline, capsys):
    held = queue_control.lock_queue(offline.queue)  # plays a server that never answers
    try:
        assert run(offline, "flush", "--wait", "0.3") == 1
    finally:
        held.close()
    assert "did not answer" in capsys.readouterr().err
    assert list((offline.queue / "control").iterdir()) == []


def test_configuration_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("hostname = 5\n")
    assert cli.main(["queue", "--config", str(bad), "list"]) == 2
    assert "configuration error" in capsys.readouterr().err
    assert cli.main(["queue", "--config", str(tmp_path / "missing.toml"), "list"]) == 2


@pytest.mark.parametrize("where", ["first", "after the command", "last"])
@pytest.mark.parametrize("command", [
    ["queue", "list", "--json"],
    ["queue", "show", "AAAAAAAAAAAAA1"],
    ["queue", "flush", "AAAAAAAAAAAAA1"],
    ["user", "list"],
    ["user", "add", "dora@example.org", "--password-stdin"],
    ["user", "passwd", "alice@example.org", "--password-stdin"],
    ["user", "del", "erin@example.org"],
    ["check-config"],
], ids=lambda c: "-".join(c[:2]))
def test_config_option_anywhere(offline, capsys, monkeypatch, where, command):
    """``mailsrv user add alice@x --config F`` as well as ``mailsrv user --config F add ...``."""
    monkeypatch.setattr("sys.stdin", io.StringIO("a good password\n"))
    with open(offline.workdir / "users", "a") as users:
        users.write("erin@example.org\n")  # for "user del": in no alias
    option = ["--config", str(offline.config_path)]
    argv = {"first": option + command,
            "after the command": command[:1] + option + command[1:],
            "last": command + option}[where]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert str(offline.config_path) in capsys.readouterr().out or command[0] != "check-config"


def test_config_option_given_twice_the_last_one_counts(offline, tmp_path, capsys):
    missing = tmp_path / "missing.toml"
    assert cli.main(["queue", "--config", str(missing), "list", "--config",
                     str(offline.config_path)]) == 0
    assert cli.main(["queue", "--config", str(offline.config_path), "list", "--config",
                     str(missing)]) == 2
    assert f"{missing}: (file)" in capsys.readouterr().err
