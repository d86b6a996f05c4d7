"""``mailsrv user add|passwd|del|list``: the users file, for the administrator.

Each change replaces the file atomically, and only with a file that passes the server's own
start-up checks; a running server picks the new file up by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mailsrv.accounts import aliasfile, userfile
from mailsrv.accounts.auth import PasswordError, hash_password
from mailsrv.config import Config, ConfigError
from mailsrv.routing.address import fold_local, normalise_domain
from mailsrv.storage import durable
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


def _aliases_replacer(path: Path) -> Callable[[int], None]:
    """``prepare`` for the aliases file's replacement: the old file's owner and mode (aliases
    are no secret: a new file is 0644)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None

    def own(fd: int) -> None:
        if st is not None:
            made = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (made.st_uid, made.st_gid):
                os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else 0o644)

    return own


def _postmaster_alias(config: Config, address: str) -> tuple[Path, str]:
    """The aliases file and its text with ``postmaster@<domain>: address`` added."""
    if config.mailboxes.aliases is None:
        raise Failed("--postmaster needs an aliases file (mailboxes.aliases in "
                     f"{config.source}) to name the postmaster in")
    path = Path(config.mailboxes.aliases)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    domain = address.rpartition("@")[2]
    try:
        return path, aliasfile.add_alias(text, f"postmaster@{domain}", address)
    except aliasfile.AliasFileError as e:
        raise Failed(str(e)) from None


def _directory_problem(config: Config) -> ConfigError | None:
    """What keeps the users and aliases as they are from being valid, or None."""
    from mailsrv.startup import load_directory

    try:
        load_directory(config)
    except ConfigError as e:
        return e
    return None


def _exists(path: Path, address: str) -> bool:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return any(user == address for user, _ in userfile.list_users(text))


def cmd_user(config: Config, args: argparse.Namespace) -> int:
    """Change the users file; the running server picks the new file up by itself.

    A change is refused when it would make the users and aliases invalid (the server would
    refuse them), except that ``add`` and ``passwd`` are allowed on a directory that is not
    valid yet (a fresh install: no postmaster, an alias naming a user still to be added),
    which a new mailbox cannot make worse; what is still missing is then said.
    """
    from mailsrv.startup import build_directory

    if config.mailboxes.users is None:
        raise ConfigError(config.source, "mailboxes.users", "a users file to manage users in")
    path = Path(config.mailboxes.users)
    if args.action == "list":
        for address, has_password in userfile.list_users(path.read_text(encoding="utf-8")):
            print(f"{address}\t{'password' if has_password else 'no password (no login)'}")
        return EXIT_OK
    address = _user_address(config, args.address)
    postmaster = getattr(args, "postmaster", False)
    only_postmaster = postmaster and _exists(path, address)  # add --postmaster, user there
    hashed = None
    if args.action in ("add", "passwd") and not only_postmaster:
        try:
            hashed = hash_password(_read_password(args))
        except PasswordError as e:
            raise Failed(f"unusable password: {e}") from None
    aliases_path = Path(config.mailboxes.aliases) if config.mailboxes.aliases else None
    with contextlib.ExitStack() as locks:
        locks.enter_context(userfile.locked_directory(path))
        if postmaster and aliases_path is not None and aliases_path.parent != path.parent:
            locks.enter_context(userfile.locked_directory(aliases_path))
        tolerated = None if args.action == "del" else _directory_problem(config)
        new_aliases = _postmaster_alias(config, address) if postmaster else None
        candidate_aliases = config.mailboxes.aliases

        def check(candidate: Path) -> None:
            # The new file must pass the server's own start-up checks (every alias target a
            # mailbox, a postmaster for every domain), unless the directory was not valid
            # before the change either (see the docstring): the file itself must be.
            aliases = candidate_aliases
            if aliases is not None and not Path(aliases).exists():
                aliases = None  # none yet: mailsrv user add --postmaster makes the file
            boxes = replace(config.mailboxes, users=candidate, aliases=aliases)
            build_directory(replace(config, mailboxes=boxes))
            problem = _directory_problem(replace(config, mailboxes=boxes))
            if problem is not None and tolerated is None:
                raise problem

        text = path.read_text(encoding="utf-8") if path.exists() else ""
        try:
            if new_aliases is not None:
                aliases_file, aliases_text = new_aliases
                candidate_aliases = aliases_file.with_name(f".{aliases_file.name}.candidate")
                candidate_aliases.write_text(aliases_text, encoding="utf-8")
                locks.callback(candidate_aliases.unlink, missing_ok=True)
            if only_postmaster:
                check(path)
            else:
                if hashed is not None:
                    new = userfile.set_password(text, address, hashed,
                                                create=args.action == "add")
                else:
                    new = userfile.remove_user(text, address)
                userfile.replace_file(path, new, check, _server_group(config))
            if new_aliases is not None:
                durable.replace(new_aliases[0], new_aliases[1].encode("utf-8"),
                                prepare=_aliases_replacer(new_aliases[0]))
        except userfile.UserFileError as e:
            raise Failed(str(e)) from None
        except ConfigError as e:
            raise Failed(f"refused, the users file would not be valid: {e.expected}") from None
        after = replace(config, mailboxes=replace(config.mailboxes, users=path))
        left = _directory_problem(after)
        if aliases_path is not None and not aliases_path.exists():
            after = replace(after, mailboxes=replace(after.mailboxes, aliases=None))
        directory = build_directory(after)
    if only_postmaster:
        print(f"ok: {address} exists already, and is now postmaster@{address.partition('@')[2]}")
    else:
        done = {"add": "added", "passwd": "password changed for", "del": "removed"}[args.action]
        extra = f", postmaster@{address.partition('@')[2]}" if postmaster else ""
        print(f"ok: {done} {address}{extra}")
    _say_what_is_missing(address, directory, left)
    return EXIT_OK


def _say_what_is_missing(address: str, directory: Any, left: ConfigError | None) -> None:
    """After a change to a directory not valid yet: what mailsrv still needs to start."""
    domain = address.partition("@")[2]
    if not directory.has_postmaster(domain):
        print(f"note: {domain} has no postmaster yet, and mailsrv starts only when every local "
              f"domain has one (RFC 5321); to make it {address}:\n"
              f"    mailsrv user add {address} --postmaster")
    if left is not None and left.key != f"postmaster@{domain}":
        print(f"note: mailsrv will not start yet: {left}")
