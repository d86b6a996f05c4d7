"""``mailsrv queue list|show|flush|delete|bounce``: the outbound queue, for the administrator.

The queue lock decides how a change is made.  When a server runs (it holds the lock), changes
are requests the server carries out, because its in-memory state would otherwise overwrite
ours; when none runs, the command takes the lock itself (so none starts meanwhile) and changes
the files directly.  Reading (``list``, ``show``) never needs the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mailsrv.config import Config, ConfigError
from mailsrv.storage import queue, queue_control
from mailsrv.storage.envelope import QueuedMessage
from mailsrv.tools.cli_exit import EXIT_FAILED, EXIT_OK, Failed

__all__ = ["cmd_change", "cmd_list", "cmd_show", "queued_messages"]


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def queued_messages(qdir: Path) -> list[QueuedMessage]:
    """Every readable envelope, oldest first; unreadable ones are reported, not fatal (also
    what ``mailsrv doctor`` reads)."""
    found = []
    for path in sorted((qdir / "messages").glob("*.json")):
        try:
            found.append(queue.read_message(path))
        except FileNotFoundError:
            continue  # delivered while we looked
        except ValueError as e:
            print(f"mailsrv: skipping {e}", file=sys.stderr)
    return sorted(found, key=lambda m: (m.created, m.id))


def _find(qdir: Path, queue_id: str) -> QueuedMessage:
    try:
        return queue.read_message(qdir / "messages" / f"{queue_id}.json")
    except FileNotFoundError:
        raise Failed(f"no message {queue_id} in the queue") from None


def _size(qdir: Path, message: QueuedMessage) -> int:
    try:
        return queue.body_path(qdir, message.id).stat().st_size + len(message.prefix)
    except OSError:
        return 0


def _next_try(recipient: Any, now: float) -> str:
    if recipient.status != "queued":
        return "-"
    delta = recipient.next_attempt - now
    return "now" if delta <= 0 else f"in {_age(delta)}"


def cmd_list(config: Config, args: argparse.Namespace) -> int:
    qdir = Path(config.queue.path)
    messages = queued_messages(qdir)
    now = time.time()
    if args.json:
        print(json.dumps([dict(asdict(m), size=_size(qdir, m)) for m in messages], indent=1))
        return EXIT_OK
    if not messages:
        print("Mail queue is empty")
        return EXIT_OK
    waiting = 0
    for m in messages:
        print(f"{m.id}  {_age(now - m.created):>4}  {_size(qdir, m):>9}  <{m.sender}>")
        for r in m.recipients:
            waiting += r.status == "queued"
            line = f"    <{r.address}>  {r.status}  tries={r.attempts}  next={_next_try(r, now)}"
            if r.last_error:
                line += f"  last_error={r.last_error}"
            print(line)
    print(f"{len(messages)} message(s), {waiting} recipient(s) waiting")
    return EXIT_OK


def _when(epoch: float | None, now: float) -> str:
    if epoch is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    delta = epoch - now
    return f"{stamp} ({'in ' + _age(delta) if delta > 0 else _age(-delta) + ' ago'})"


def cmd_show(config: Config, args: argparse.Namespace) -> int:
    qdir = Path(config.queue.path)
    m = _find(qdir, args.id)
    now = time.time()
    print(f"id: {m.id}\ncreated: {_when(m.created, now)}\nsender: <{m.sender}>")
    print(f"received from: {m.received_from}\nsize: {_size(qdir, m)}\ndelay warning sent: {m.warned}")
    for r in m.recipients:
        print(f"recipient <{r.address}>: {r.status}, {r.attempts} attempt(s)")
        print(f"    next attempt: {_when(r.next_attempt, now) if r.status == 'queued' else '-'}")
        print(f"    last attempt: {_when(r.last_attempt, now)}  remote: {r.remote_mta or '-'}")
        print(f"    last error: {r.last_error or '-'}")
    print()
    sys.stdout.write(m.prefix)
    try:
        with open(queue.body_path(qdir, m.id), "rb") as body:
            data = body.read() if args.body else body.read(65536).split(b"\n\n", 1)[0] + b"\n"
    except OSError as e:
        raise Failed(f"cannot read the body of {m.id}: {e}") from None
    sys.stdout.write(data.decode("utf-8", "replace"))
    return EXIT_OK


def _offline(config: Config, action: str, queue_id: str | None) -> str:
    """Carry out a change on the files, while holding the queue lock."""
    qdir = Path(config.queue.path)
    if action == "flush":
        now = time.time()
        targets = [_find(qdir, queue_id)] if queue_id else queued_messages(qdir)
        for m in targets:
            queue.save(qdir, m.update({r.address: replace(r, next_attempt=now) for r in m.pending}))
        return (f"ok: {len(targets)} message(s) due now; no server is running, so they are "
                "delivered when it starts")
    assert queue_id is not None
    message = _find(qdir, queue_id)
    if action == "delete":
        queue.remove(qdir, queue_id)
        return f"ok: deleted {queue_id}"
    from mailsrv.outbound.bounce import bounce_pending
    from mailsrv.startup import load_directory, load_dkim

    try:
        dkim = load_dkim(config)  # the DSN is signed as the server would sign it
    except ConfigError as e:
        print(f"mailsrv: warning: the DSN is not DKIM-signed: {e}", file=sys.stderr)
        dkim = None
    after, _ = bounce_pending(
        config, load_directory(config), message, "returned to the sender by the administrator",
        dkim=dkim,
    )
    if after.done:
        queue.remove(qdir, queue_id)
    else:
        queue.save(qdir, after)
    return f"ok: bounced {queue_id}" + ("" if message.sender else " (from <>: no DSN sent)")


def ask_server(qdir: Path, action: str, queue_id: str | None, wait: float) -> str:
    answer = queue_control.control_request(qdir, action, queue_id)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if answer.exists():
            text = answer.read_text("utf-8").strip()
            answer.unlink()
            return text
        time.sleep(0.1)
    request = answer.with_suffix(".req")
    try:
        request.unlink()
    except FileNotFoundError:
        pass
    raise Failed(f"the running server did not answer within {wait:g}s")


def cmd_change(config: Config, args: argparse.Namespace) -> int:
    qdir = Path(config.queue.path)
    queue_id = getattr(args, "id", None)
    try:
        lock = queue_control.lock_queue(qdir)
    except queue_control.QueueLocked:
        text = ask_server(qdir, args.action, queue_id, args.wait)
    else:
        try:
            text = _offline(config, args.action, queue_id)
        finally:
            lock.close()
    print(text)
    return EXIT_OK if text.startswith("ok") else EXIT_FAILED
