"""
The ``mailsrv`` admin command: ``mailsrv queue list|show|flush|delete|bounce``,
``mailsrv user add|passwd|del|list``, ``mailsrv dkim keygen|list``, ``mailsrv dns DOMAIN
[--check]``, ``mailsrv doctor [--json]``, ``mailsrv dovecot-config``, ``mailsrv tls-report
[--send-now]``, ``mailsrv check-config``
and ``mailsrv version``;
``--config PATH`` may come anywhere on the line.  It does not run the server (``twistd
mailsrv`` does).

This module reads the command line and runs what it names: ``check-config`` and ``version``
here, ``queue`` in ``mailsrv.tools.cli_queue`` (which the queue lock decides how to run), ``user`` in
``mailsrv.tools.cli_user``, ``dkim`` in ``mailsrv.tools.cli_dkim``, ``dns`` in
``mailsrv.tools.cli_dns``, ``doctor`` in ``mailsrv.tools.doctor``, ``dovecot-config`` in
``mailsrv.tools.cli_dovecot``; ``mailsrv.tools.cli_exit``
has the exit statuses they share.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mailsrv.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from mailsrv.storage import queue
from mailsrv.tools.cli_dkim import add_parser as add_dkim_parser
from mailsrv.tools.cli_dns import add_parser as add_dns_parser
from mailsrv.tools.cli_dovecot import add_parser as add_dovecot_parser
from mailsrv.tools.cli_exit import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Failed
from mailsrv.tools.cli_queue import cmd_change, cmd_list, cmd_show
from mailsrv.tools.cli_tlsrpt import add_parser as add_tls_report_parser
from mailsrv.tools.cli_user import cmd_user
from mailsrv.tools.doctor.command import add_parser as add_doctor_parser

__all__ = ["main"]


def _queue_id(text: str) -> str:
    try:
        queue.check_queue_id(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


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
        if name == "add":
            sub.add_argument("--postmaster", action="store_true",
                             help="also make it its domain's postmaster (an alias "
                             "postmaster@DOMAIN in the aliases file); for a user already "
                             "there, only that")
        sub.set_defaults(run=cmd_user)
    user_actions.add_parser(
        "list", help="every user, and whether it can log in", parents=[config]
    ).set_defaults(run=cmd_user)
    add_dkim_parser(commands, config)
    add_dns_parser(commands, config)
    add_doctor_parser(commands, config)
    add_dovecot_parser(commands, config)
    add_tls_report_parser(commands, config)
    _add_admin_commands(commands)
    return parser


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every start-up check, nothing created or locked (safe while the server runs)."""
    from mailsrv.tools.checkconfig import check_config

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
