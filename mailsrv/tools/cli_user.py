"""``mailsrv user add|passwd|del|list``: the users file, for the administrator.

Each change replaces the file atomically, and only with a file that passes the server's own
start-up checks; a running server picks the new file up by itself.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from dataclasses import replace
from pathlib import Path

from mailsrv.accounts import userfile
from mailsrv.accounts.auth import PasswordError, hash_password
from mailsrv.config import Config, ConfigError
from mailsrv.routing.address import fold_local, normalise_domain
from mailsrv.tools.cli_exit import EXIT_OK, Failed

__all__ = ["cmd_user"]


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
    # Lower case and NFC (jörg typed with a combining diaeresis is the same user), as the
    # server compares local parts; UTF-8 names go into the file as UTF-8 (SMTPUTF8).
    return f"{fold_local(local)}@{domain}"


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
    from mailsrv.startup import load_directory

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
