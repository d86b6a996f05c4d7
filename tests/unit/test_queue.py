"""Tests for mailsrv.storage.queue: the durable enqueue (real files under tmp_path)."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path

import pytest

from mailsrv.storage import queue, queue_control, queue_scan
from mailsrv.storage.durable import DeliveryError
from mailsrv.storage.queue import enqueue, queue_dirs, read_message
from support.procfs import fd_path


def read_envelope(path: Path) -> dict:
    """The envelope as stored (checked by the real decoder first)."""
    read_message(path)
    return json.loads(Path(path).read_text("utf-8"))

PREFIX = b"Return-Path: <a@example.org>\nReceived: from x (unknown [192.0.2.7])\n"
BODY = b"Subject: hello\n\nHello Bob.\n"
CREATED = 1795381621.25


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    queue_dirs(path)
    return path


@pytest.fixture
def body(qdir: Path) -> Path:
    path = qdir / "incoming" / "ID1"
    path.write_bytes(BODY)
    return path


def do_enqueue(qdir: Path, body: Path, **overrides: object) -> Path:
    args: dict[str, object] = dict(
        sender="a@example.org",
        recipients=["bob@other.example", "carol@third.example"],
        prefix=PREFIX,
        body_path=body,
        created=CREATED,
        received_from="client.example[192.0.2.7]",
    )
    args.update(overrides)
    message = enqueue(qdir, "ID1", **args)  # type: ignore[arg-type]
    assert message.id == "ID1"
    return qdir / "messages" / "ID1.json"


def test_queue_dirs(tmp_path: Path) -> None:
    qdir = tmp_path / "var" / "spool" / "mailsrv"
    queue_dirs(qdir)
    queue_dirs(qdir)  # idempotent
    for d in (qdir / "incoming", qdir / "messages", qdir / "corrupt", qdir / "control",
              qdir, qdir.parent):
        assert d.is_dir() and mode(d) == 0o700, d


def test_queue_dirs_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DeliveryError):
        queue_dirs(tmp_path / "file")


def test_round_trip(qdir: Path, body: Path) -> None:
    path = do_enqueue(qdir, body)
    assert path == qdir / "messages" / "ID1.json"
    envelope = read_envelope(path)
    assert envelope == {
        "version": 1,
        "id": "ID1",
        "created": CREATED,
        "sender": "a@example.org",
        "received_from": "client.example[192.0.2.7]",
        "prefix": PREFIX.decode("ascii"),
        "warned": False,
        "recipients": [
            {
                "address": "bob@other.example",
                "status": "queued",
                "attempts": 0,
                "last_error": None,
                "next_attempt": CREATED,
                "last_attempt": None,
                "remote_mta": None,
            },
            {
                "address": "carol@third.example",
                "status": "queued",
                "attempts": 0,
                "last_error": None,
                "next_attempt": CREATED,
                "last_attempt": None,
                "remote_mta": None,
            },
        ],
    }
    assert (qdir / "messages" / "ID1.body").read_bytes() == BODY


def test_json_is_human_readable(qdir: Path, body: Path) -> None:
    text = do_enqueue(qdir, body).read_text("utf-8")
    assert text.startswith('{\n "version": 1,\n "id": "ID1",')
    assert text == json.dumps(json.loads(text), indent=1, ensure_ascii=False) + "\n"


def test_null_sender(qdir: Path, body: Path) -> None:
    assert read_envelope(do_enqueue(qdir, body, sender=None))["sender"] == ""
    body2 = qdir / "incoming" / "ID2"
    body2.write_bytes(BODY)
    message = enqueue(
        qdir, "ID2", sender="", recipients=["x@y.example"], prefix=b"", body_path=body2,
        created=1.0, received_from="r",
    )
    assert message.sender == ""
    assert read_envelope(qdir / "messages" / "ID2.json")["sender"] == ""


def test_body_moved_not_copied(qdir: Path, body: Path) -> None:
    before = body.stat()
    do_enqueue(qdir, body)
    assert not body.exists()
    after = (qdir / "messages" / "ID1.body").stat()
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert after.st_nlink == 1


def test_modes_and_no_tmp_left(qdir: Path, body: Path) -> None:
    body.chmod(0o644)
    path = do_enqueue(qdir, body)
    assert mode(path) == 0o600
    assert mode(qdir / "messages" / "ID1.body") == 0o600
    assert mode(qdir / "messages") == mode(qdir / "incoming") == 0o700
    assert sorted(p.name for p in (qdir / "messages").iterdir()) == ["ID1.body", "ID1.json"]
    assert list((qdir / "incoming").iterdir()) == []


def test_enqueue_creates_missing_dirs(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    (qdir / "incoming").mkdir(parents=True)
    body = qdir / "incoming" / "ID1"
    body.write_bytes(BODY)
    path = do_enqueue(qdir, body)
    assert path.exists() and mode(qdir / "messages") == 0o700


@pytest.mark.parametrize(
    "fail_on",
    ["fsync-json", "write-json", "rename-json", "fsync-final", "rename-body", "open-json",
     "fsync-body"],
)
def test_failure_leaves_nothing_committed(
    qdir: Path, body: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str
) -> None:
    real_fsync, real_write, real_rename, real_open = os.fsync, os.write, os.rename, os.open

    def boom() -> OSError:
        return OSError(errno.EIO, "Input/output error")

    def fsync(fd: int) -> None:
        # Each file is fsync'd under its name in messages/ (after the renames), or under its
        # first name where it cannot be written out before (the fsynced-first tests).
        if fail_on == "fsync-json" and fd_path(fd).endswith((".json", ".json.tmp")):
            raise boom()
        if fail_on == "fsync-body" and fd_path(fd) in (str(body), str(qdir / "messages" / "ID1.body")):
            raise boom()
        # The one fsync of messages/, after both renames (the rollback's is queue.fsync_dir).
        if fail_on == "fsync-final" and fd_path(fd).endswith("/messages"):
            raise boom()
        real_fsync(fd)

    def write(fd: int, data: bytes) -> int:
        if fail_on == "write-json":
            raise boom()
        return real_write(fd, data)

    def rename(src: object, dst: object) -> None:
        if fail_on == "rename-json" and str(dst).endswith(".json"):
            raise boom()
        if fail_on == "rename-body" and str(dst).endswith(".body"):
            raise boom()
        real_rename(src, dst)  # type: ignore[arg-type]

    def open_(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if fail_on == "open-json" and str(path).endswith(".json.tmp"):
            raise boom()
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(DeliveryError) as info:
        do_enqueue(qdir, body)
    assert not info.value.disk_full
    assert "Input/output error" in str(info.value)
    assert list((qdir / "messages").iterdir()) == []
    assert body.read_bytes() == BODY


@pytest.mark.parametrize("fail_on", ["fsync-json", "fsync-body"])
def test_a_failed_fsync_before_the_names_leaves_nothing_committed(
    qdir: Path, body: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str
) -> None:
    """Where the contents cannot be written out first, they are fsync'd before the renames;
    a failure there leaves the queue as it was."""
    real_fsync = os.fsync
    monkeypatch.setattr(queue, "write_out", lambda fd: False)

    def fsync(fd: int) -> None:
        path = fd_path(fd)
        if (fail_on == "fsync-json" and path.endswith(".json.tmp")) or (
                fail_on == "fsync-body" and path == str(body)):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DeliveryError, match="Input/output error"):
        do_enqueue(qdir, body)
    assert list((qdir / "messages").iterdir()) == []
    assert body.read_bytes() == BODY


def test_disk_full(qdir: Path, body: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def write(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(DeliveryError) as info:
        do_enqueue(qdir, body)
    assert info.value.disk_full
    assert "ID1.json.tmp" in str(info.value)
    assert list((qdir / "messages").iterdir()) == []
    assert body.read_bytes() == BODY


def test_missing_body(qdir: Path) -> None:
    with pytest.raises(DeliveryError):
        do_enqueue(qdir, qdir / "incoming" / "ID1")
    assert list((qdir / "messages").iterdir()) == []


def test_queue_id_in_use_is_not_overwritten(qdir: Path, body: Path) -> None:
    do_enqueue(qdir, body)
    body.write_bytes(b"another message\n")
    with pytest.raises(DeliveryError):
        do_enqueue(qdir, body, recipients=["z@z.example"])
    assert (qdir / "messages" / "ID1.body").read_bytes() == BODY
    assert read_envelope(qdir / "messages" / "ID1.json")["recipients"][0]["address"] == (
        "bob@other.example"
    )
    assert body.read_bytes() == b"another message\n"


@pytest.mark.parametrize(
    "overrides",
    [
        {"prefix": "Received: caf\u00e9\n".encode()},
        {"recipients": []},
        {"recipients": "bob@other.example"},
    ],
)
def test_invalid_arguments_touch_nothing(qdir: Path, body: Path, overrides: dict) -> None:
    with pytest.raises(ValueError):
        do_enqueue(qdir, body, **overrides)
    assert list((qdir / "messages").iterdir()) == []
    assert body.read_bytes() == BODY


@pytest.mark.parametrize("queue_id", ["", "../x", ".hidden", "a/b", "a b", "x" * 65])
def test_invalid_queue_id(qdir: Path, body: Path, queue_id: str) -> None:
    with pytest.raises(ValueError):
        enqueue(
            qdir, queue_id, sender=None, recipients=["x@y.example"], prefix=b"",
            body_path=body, created=1.0, received_from="r",
        )
    assert body.exists()


def test_non_ascii_recipient_stored_readably(qdir: Path, body: Path) -> None:
    path = do_enqueue(qdir, body, recipients=["j\u00f6rg@b\u00fccher.example"])
    assert "j\u00f6rg@b\u00fccher.example" in path.read_text("utf-8")
    assert read_envelope(path)["recipients"][0]["address"] == "j\u00f6rg@b\u00fccher.example"


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'{"version": 2}', b'{"version": 1}',
     b'{"version": 1, "id": "x", "created": 1, "sender": "", "prefix": "", "recipients": [1]}'],
)
def test_read_envelope_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "X.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_envelope(path)
    assert str(path) in str(info.value)


def test_read_envelope_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_envelope(tmp_path / "nope.json")


def test_new_queue_id() -> None:
    ids = {queue.new_queue_id() for _ in range(10000)}
    assert len(ids) == 10000
    for queue_id in list(ids)[:100]:
        assert re.fullmatch(r"[0-9A-Za-z]{14}", queue_id)
        queue.check_queue_id(queue_id)


# --------------------------------------------------------------------------- state changes

from dataclasses import replace  # noqa: E402

from mailsrv.storage.envelope import SENT, decode, encode  # noqa: E402


def test_double_bounce_mark_round_trips(qdir: Path, body: Path) -> None:
    """The postmaster's notice of a failed bounce keeps its mark across a restart."""
    path = do_enqueue(qdir, body, sender=None, double_bounce=True)
    assert read_envelope(path)["double_bounce"] is True
    assert read_message(path).double_bounce is True
    plain = json.loads(encode(replace(read_message(path), double_bounce=False)))
    assert "double_bounce" not in plain and decode(json.dumps(plain).encode()).double_bounce is False


def test_save_replaces_atomically_and_round_trips(qdir: Path, body: Path) -> None:
    do_enqueue(qdir, body)
    message = read_message(qdir / "messages" / "ID1.json")
    first = message.recipients[0]
    updated = message.update({first.address: replace(
        first, status=SENT, attempts=1, last_attempt=CREATED + 5, remote_mta="mx.other.example",
    )})
    queue.save(qdir, updated)
    assert read_message(qdir / "messages" / "ID1.json") == updated
    assert [r.status for r in updated.recipients] == ["sent", "queued"]
    assert sorted(p.name for p in (qdir / "messages").iterdir()) == ["ID1.body", "ID1.json"]
    assert mode(qdir / "messages" / "ID1.json") == 0o600


def test_save_failure_keeps_the_old_state(qdir: Path, body: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    do_enqueue(qdir, body)
    before = (qdir / "messages" / "ID1.json").read_bytes()
    message = read_message(qdir / "messages" / "ID1.json")

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DeliveryError):
        queue.save(qdir, replace(message, warned=True))
    monkeypatch.undo()
    assert (qdir / "messages" / "ID1.json").read_bytes() == before
    assert sorted(p.name for p in (qdir / "messages").iterdir()) == ["ID1.body", "ID1.json"]


def test_remove(qdir: Path, body: Path) -> None:
    do_enqueue(qdir, body)
    assert queue.remove(qdir, "ID1") is True
    assert list((qdir / "messages").iterdir()) == []
    assert queue.remove(qdir, "ID1") is False


def test_remove_many_one_fsync_and_a_result_for_each(
        qdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("A1", "A2", "A3"):
        source = qdir / "incoming" / name
        source.write_bytes(BODY)
        enqueue(qdir, name, sender="a@example.org", recipients=["b@other.example"],
                prefix=PREFIX, body_path=source, created=CREATED, received_from="r")
    real_rename, fsyncs = os.rename, []

    def rename(src, dst):
        if str(src).endswith("A2.json"):
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(queue.os, "rename", rename)
    monkeypatch.setattr(queue, "_sync_messages", lambda fd: fsyncs.append(fd))
    results = queue.remove_many(qdir, ["A1", "A2", "A3", "GONE"])
    assert results[0] is True and results[2] is True and results[3] is False
    assert isinstance(results[1], DeliveryError) and "A2.json" in str(results[1])
    assert len(fsyncs) == 1
    assert sorted(p.name for p in (qdir / "messages").iterdir()) == ["A2.body", "A2.json"]
    monkeypatch.undo()  # rename again; now the directory's fsync fails
    monkeypatch.setattr(queue, "_sync_messages", lambda fd: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    [result] = queue.remove_many(qdir, ["A2"])
    assert isinstance(result, DeliveryError) and "fsync directory" in str(result)


def test_load_recognises_crash_leftovers(qdir: Path, body: Path) -> None:
    do_enqueue(qdir, body)
    messages = qdir / "messages"
    (messages / "ORPHAN.body").write_bytes(b"never committed\n")
    (messages / ".ID1.json.1234abcd.tmp").write_bytes(b'{"half')
    (messages / "BAD.json").write_bytes(b"{not json")
    (messages / "BAD.body").write_bytes(b"x\n")
    (messages / "NOBODY.json").write_bytes((messages / "ID1.json").read_bytes().replace(
        b'"id": "ID1"', b'"id": "NOBODY"'))
    (messages / "stray.txt").write_bytes(b"?")
    report = queue_scan.load(qdir)
    assert [m.id for m in report.messages] == ["ID1"]
    # An envelope without its body: its enqueue never reached the fsync of messages/ (the
    # renames may reach the disk in either order), so it never got 250: removed.
    assert sorted(report.unfinished) == [".ID1.json.1234abcd.tmp", "NOBODY.json", "ORPHAN.body"]
    assert sorted(name for name, _ in report.corrupt) == ["BAD.json", "stray.txt"]
    assert sorted(p.name for p in messages.iterdir()) == ["ID1.body", "ID1.json"]
    assert sorted(p.name for p in (qdir / "corrupt").iterdir()) == [
        "BAD.body", "BAD.json", "stray.txt"]


def test_envelope_whose_id_differs_from_its_name_is_corrupt(qdir: Path, body: Path) -> None:
    do_enqueue(qdir, body)
    os.rename(qdir / "messages" / "ID1.json", qdir / "messages" / "OTHER.json")
    with pytest.raises(ValueError, match="holds id 'ID1'"):
        read_message(qdir / "messages" / "OTHER.json")


@pytest.mark.parametrize("mutate", [
    lambda e: e["recipients"][0].update(status="lost"),
    lambda e: e["recipients"][0].update(attempts="1"),
    lambda e: e["recipients"][0].update(attempts=True),
    lambda e: e["recipients"][0].update(next_attempt=None),
    lambda e: e["recipients"][0].update(last_attempt="yesterday"),
    lambda e: e.update(recipients=[]),
    lambda e: e.update(created="now"),
    lambda e: e.update(prefix="Received: caf\u00e9\n"),
])
def test_decode_refuses_bad_fields(qdir: Path, body: Path, mutate) -> None:
    data = json.loads(do_enqueue(qdir, body).read_text())
    mutate(data)
    with pytest.raises(ValueError, match="corrupt"):
        decode(json.dumps(data).encode())


def test_encode_decode_round_trip(qdir: Path, body: Path) -> None:
    message = read_message(do_enqueue(qdir, body))
    assert decode(encode(message)) == message


def test_the_envelope_on_one_ascii_line_decodes_as_the_file(qdir: Path, body: Path) -> None:
    """What a receiving process sends the parent with its notice (mailsrv.procs.channel)."""
    from mailsrv.routing.dsn_params import MailDSN, RecipientDSN
    from mailsrv.storage.envelope import encode_line

    rcpts = ["j\u00f6rg@b\u00fccher.example", "carol@third.example"]
    message = read_message(do_enqueue(
        qdir, body, recipients=rcpts, smtputf8=True, tls_required="no", double_bounce=True,
        no_bounce="spf", dsn=MailDSN("HDRS", "env id+1"),
        recipient_dsn={rcpts[1]: RecipientDSN(("SUCCESS", "DELAY"), "rfc822;c@x.example")}))
    line = encode_line(message)
    assert line.isascii() and "\n" not in line and "\r" not in line
    assert decode(line) == message == decode(line.encode("ascii"))
    assert decode(line).recipients[1].notify == ("SUCCESS", "DELAY")


def test_queue_lock_is_exclusive(qdir: Path) -> None:
    held = queue_control.lock_queue(qdir)
    try:
        with pytest.raises(queue_control.QueueLocked):
            queue_control.lock_queue(qdir)
    finally:
        held.close()
    queue_control.lock_queue(qdir).close()  # free again once the holder is gone


def test_control_request_and_answer(qdir: Path) -> None:
    answer = queue_control.control_request(qdir, "flush", None)
    answer2 = queue_control.control_request(qdir, "delete", "ID1")
    requests = queue_control.control_requests(qdir)
    assert [(r.action, r.queue_id) for r in requests] in (
        [("delete", "ID1"), ("flush", None)], [("flush", None), ("delete", "ID1")])
    for request in requests:
        queue_control.control_answer(qdir, request, f"ok: {request.action}\n")
    assert answer.read_text() == "ok: flush\n" and answer2.read_text() == "ok: delete\n"
    assert queue_control.control_requests(qdir) == []
    with pytest.raises(ValueError):
        queue_control.control_request(qdir, "explode", None)
    with pytest.raises(ValueError):
        queue_control.control_request(qdir, "delete", "../x")


def test_no_bounce_mark_round_trips_and_is_checked(qdir: Path, body: Path) -> None:
    """Why a forwarded message's failures are only logged survives a restart; a mark that is
    not text is a corrupt envelope."""
    path = do_enqueue(qdir, body, no_bounce="spf=fail dmarc=fail for sender.test")
    assert read_envelope(path)["no_bounce"] == "spf=fail dmarc=fail for sender.test"
    assert read_message(path).no_bounce == "spf=fail dmarc=fail for sender.test"
    plain = json.loads(encode(replace(read_message(path), no_bounce=None)))
    assert "no_bounce" not in plain and decode(json.dumps(plain).encode()).no_bounce is None
    plain["no_bounce"] = True
    with pytest.raises(ValueError, match="no_bounce"):
        decode(json.dumps(plain).encode())
