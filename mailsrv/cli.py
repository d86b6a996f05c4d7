"""
The ``mailsrv`` admin command: ``mailsrv queue list|show|flush|delete|bounce``,
``mailsrv user add|passwd|del|list``, ``mailsrv check-config`` and ``mailsrv version``;
``--config PATH`` may come anywhere on the line.  It does not run the server (``twistd
mailsrv`` does).

The queue lock decides how it works.  When a server runs (it holds the lock), changes are
requests the server carries out, because its in-memory state would otherwise overwrite ours;
when none runs, the command takes the lock itself (so none starts meanwhile) and changes the
files directly.  Reading (``list``, ``show``) never needs the server.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mailsrv import queue, queue_control, userfile
from mailsrv.address import normalise_domain
from mailsrv.auth import PasswordError, hash_password
from mailsrv.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from mailsrv.envelope import QueuedMessage

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Failed(Exception):
    """An operational failure: the message goes to stderr, the exit status is 1."""


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _messages(qdir: Path) -> list[QueuedMessage]:
    """Every readable envelope, oldest first; unreadable ones are reported, not fatal."""
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
    messages = _messages(qdir)
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
        targets = [_find(qdir, queue_id)] if queue_id else _messages(qdir)
        for m in targets:
            queue.save(qdir, m.update({r.address: replace(r, next_attempt=now) for r in m.pending}))
        return (f"ok: {len(targets)} message(s) due now; no server is running, so they are "
                "delivered when it starts")
    assert queue_id is not None
    message = _find(qdir, queue_id)
    if action == "delete":
        queue.remove(qdir, queue_id)
        return f"ok: deleted {queue_id}"
    from mailsrv.bounce import bounce_pending
    from mailsrv.service import load_directory

    after, _ = bounce_pending(
        config, load_directory(config), message, "returned to the sender by the administrator"
    )
    if after.done:
        queue.remove(qdir, queue_id)
    else:
        queue.save(qdir, after)
    return f"ok: bounced {queue_id}" + ("" if message.sender else " (from <>: no DSN sent)")


def _ask_server(qdir: Path, action: str, queue_id: str | None, wait: float) -> str:
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
        text = _ask_server(qdir, args.action, queue_id, args.wait)
    else:
        try:
            text = _offline(config, args.action, queue_id)
        finally:
            lock.close()
    print(text)
    return EXIT_OK if text.startswith("ok") else EXIT_FAILED


def _queue_id(text: str) -> str:
    try:
        queue.check_queue_id(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _user_address(config: Config, text: str) -> str:
    local, at, domain = text.strip().rpartition("@")
    try:
        domain = normalise_domain(domain) if at else ""
    except ValueError as e:
        raise Failed(f"{text!r} is not an address: {e}") from None
    if not local or domain not in config.domains.local:
        raise Failed(
            f"{text!r} is not an address in a local domain ({', '.join(config.domains.local)})"
        )
    return f"{local.lower()}@{domain}"


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat it: ") != password:
            raise Failed("the passwords differ; nothing changed")
    if not password:
        raise Failed("empty password; nothing changed")
    return password


def _server_group(config: Config) -> int | None:
    """The server's group: that of the directories it creates as its own user (the queue,
    else the mailbox root; ``mailsrv`` in the Debian package), or None before they exist."""
    for directory in (config.queue.path, config.mailboxes.root):
        try:
            return os.stat(directory).st_gid
        except OSError:
            pass
    return None


def cmd_user(config: Config, args: argparse.Namespace) -> int:
    """Change the users file; the running server picks the new file up by itself."""
    from mailsrv.service import load_directory

    if config.mailboxes.users is None:
        raise ConfigError(config.source, "mailboxes.users", "a users file to manage users in")
    path = Path(config.mailboxes.users)
    if args.action == "list":
        for address, has_password in userfile.list_users(path.read_text(encoding="utf-8")):
            print(f"{address}\t{'password' if has_password else 'no password (no login)'}")
        return EXIT_OK
    address = _user_address(config, args.address)
    hashed = None
    if args.action in ("add", "passwd"):
        try:
            hashed = hash_password(_read_password(args))
        except PasswordError as e:
            raise Failed(f"unusable password: {e}") from None

    def check(candidate: Path) -> None:
        # The new file must pass the server's own start-up checks (every alias target a
        # mailbox, a postmaster for every domain): the server would refuse it otherwise.
        boxes = replace(config.mailboxes, users=candidate)
        load_directory(replace(config, mailboxes=boxes))

    with userfile.locked_directory(path):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        try:
            if hashed is not None:
                new = userfile.set_password(text, address, hashed, create=args.action == "add")
            else:
                new = userfile.remove_user(text, address)
            userfile.replace_file(path, new, check, _server_group(config))
        except userfile.UserFileError as e:
            raise Failed(str(e)) from None
        except ConfigError as e:
            raise Failed(f"refused, the users file would not be valid: {e.expected}") from None
    done = {"add": "added", "passwd": "password changed for", "del": "removed"}[args.action]
    print(f"ok: {done} {address}")
    return EXIT_OK


def _config_option(text: str = "the server's configuration") -> argparse.ArgumentParser:
    """``--config``, for every parser of the command line: it may come before or after the
    subcommand and its action (``mailsrv user add alice@x --config F``).  SUPPRESS as the
    default, so that a parser where it is not given does not reset what another one read."""
    option = argparse.ArgumentParser(add_help=False)
    option.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="PATH",
        help=f"{text} (default {DEFAULT_CONFIG_PATH})",
    )
    return option


def _parser() -> argparse.ArgumentParser:
    config = _config_option()
    parser = argparse.ArgumentParser(
        prog="mailsrv", description="Administer a mailsrv server.", parents=[config]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    queue_parser = commands.add_parser(
        "queue", help="list and manage the outbound queue", parents=[config],
        description="List and manage the outbound queue of the server configured by --config.",
    )
    actions = queue_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", help="every queued message and its recipients", parents=[config]
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=cmd_list)
    show = actions.add_parser(
        "show", help="one message: envelope, state and headers", parents=[config]
    )
    show.add_argument("id", type=_queue_id)
    show.add_argument("--body", action="store_true", help="print the whole message")
    show.set_defaults(run=cmd_show)
    for name, text, needs_id in (
        ("flush", "retry now (one message, or all)", False),
        ("delete", "remove a message without notice to its sender", True),
        ("bounce", "give up now and return the message to its sender", True),
    ):
        sub = actions.add_parser(name, help=text, parents=[config])
        sub.add_argument("id", type=_queue_id, nargs=None if needs_id else "?")
        sub.add_argument("--wait", type=float, default=30.0,
                         help="seconds to wait for a running server's answer (default 30)")
        sub.set_defaults(run=cmd_change)

    user_parser = commands.add_parser(
        "user", help="add and remove users, set passwords", parents=[config],
        description="Manage the users file named by the configuration's mailboxes.users. "
        "Changes replace the file atomically; a running server picks them up within a second.",
    )
    user_actions = user_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("add", "add a user with a password (prompted for, or read from stdin)"),
        ("passwd", "set a user's password"),
        ("del", "remove a user (its Maildir stays on disk)"),
    ):
        sub = user_actions.add_parser(name, help=text, description=text, parents=[config])
        sub.add_argument("address", help="the full address, e.g. alice@example.org")
        if name != "del":
            sub.add_argument("--password-stdin", action="store_true",
                             help="read the password from the first line of standard input")
        sub.set_defaults(run=cmd_user)
    user_actions.add_parser(
        "list", help="every user, and whether it can log in", parents=[config]
    ).set_defaults(run=cmd_user)
    _add_admin_commands(commands)
    return parser


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every start-up check, nothing created or locked (safe while the server runs)."""
    from mailsrv.checkconfig import check_config

    print(check_config(getattr(args, "config", None) or DEFAULT_CONFIG_PATH).summary())
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    """The versions a bug report needs: mailsrv's, Twisted's and Python's."""
    import platform

    import twisted

    from mailsrv import __version__

    print(f"mailsrv {__version__} (Twisted {twisted.__version__}, "
          f"Python {platform.python_version()})")
    return EXIT_OK


def _add_admin_commands(commands: Any) -> None:
    """Subcommands that need no loaded Config: they set ``standalone`` instead of ``run``."""
    check = commands.add_parser(
        "check-config", help="check the configuration as the server would at start-up",
        parents=[_config_option("the file to check")],
        description="Check the configuration file, the users and aliases files, the "
        "directories and the listeners' key files as the server does at start-up, without "
        "creating or locking anything (safe while the server runs). Exit status 0 and a "
        "summary when everything is right; 2 and the file, the key and what was expected "
        "when something is not.",
    )
    check.set_defaults(standalone=cmd_check_config)
    version = commands.add_parser(
        "version", help="print the versions of mailsrv, Twisted and Python",
        description="Print the versions of mailsrv, Twisted and Python.",
    )
    version.set_defaults(standalone=cmd_version)


def _load(path: str | None) -> Config:
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            raise ConfigError(DEFAULT_CONFIG_PATH, "(file)", "a configuration file; give --config")
        path = str(DEFAULT_CONFIG_PATH)
    return load_config(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "standalone", None) is not None:
            return args.standalone(args)
        config = _load(getattr(args, "config", None))
        return args.run(config, args)
    except ConfigError as e:
        print(f"mailsrv: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Failed as e:
        print(f"mailsrv: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"mailsrv: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
