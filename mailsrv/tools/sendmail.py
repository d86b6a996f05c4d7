"""
The ``sendmail`` command every Unix program expects (cron, PHP's ``mail()``, ``mail(1)``, web
applications): ``sendmail [-t] [-i|-oi] [-f sender] [-F name] [recipient ...]`` reads one message
on standard input and hands it to the local mailsrv over SMTP.

Why SMTP on a loopback listener rather than writing into the queue: the queue belongs to the
``mailsrv`` user and is locked by the running server; going through the server gives every local
program the same checks, trace headers, fsync guarantee and log line as any other client, and
needs no set-uid helper.  The price is that nothing is queued while the server is down: the
command then fails with ``EX_TEMPFAIL`` (75) and says so, and the calling program (cron logs it)
knows the message was not sent.

Command-line flags follow sendmail's ``getopt`` string, as Postfix and Exim do, so that every
caller's habits work: harmless ones (``-odi``, ``-oem``, ``-bm``, ``-B8BITMIME``, ``-N``, ``-v``
...) are accepted; modes mailsrv does not have (``-bs``, ``-bd``, ``-bv``, queue intervals) are
refused with ``EX_USAGE`` rather than silently doing something else.  Invoked as ``mailq`` (or
with ``-bp``) it lists the queue, with ``-q`` it flushes it (``mailsrv queue list|flush``).

Exit statuses are those of ``sysexits.h``, which callers of sendmail interpret.

This module runs the command; its parts are the flags (``mailsrv.tools.sendmail_args``), the message
(``mailsrv.tools.sendmail_message``) and the submission with its exit statuses
(``mailsrv.tools.sendmail_submit``).
"""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path
from typing import BinaryIO

from mailsrv.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from mailsrv.tools.sendmail_args import Invocation, UsageError, parse_args, parse_recipients
from mailsrv.tools.sendmail_message import (
    add_missing_headers,
    header_recipients,
    normalise_line_ends,
    read_message,
    remove_bcc,
    split_header,
)
from mailsrv.tools.sendmail_submit import (
    EX_CONFIG,
    EX_NOINPUT,
    EX_OK,
    EX_USAGE,
    SendError,
    choose_listener,
    refusal,
    submit,
)

__all__ = ["default_domain", "main"]


def default_domain(config: Config) -> str:
    """The domain of unqualified addresses: the hostname if it is local, else the first local domain.

    It must be a local domain so that replies and bounces to ``user@domain`` come back here.
    """
    if config.hostname in config.domains.local:
        return config.hostname
    return config.domains.local[0]


def _login() -> tuple[str, str]:
    """The invoking user's login and full name (the first GECOS field)."""
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return str(os.getuid()), ""
    return entry.pw_name, entry.pw_gecos.split(",", 1)[0]


def _deliver(inv: Invocation, config: Config, stdin: BinaryIO) -> int:
    domain = default_domain(config)
    login, gecos = _login()
    sender = f"{login}@{domain}" if inv.sender is None else inv.sender
    recipients = parse_recipients(inv.recipients, domain)
    try:
        data = normalise_line_ends(read_message(stdin, inv.ignore_dots))
    except OSError as exc:
        raise SendError(EX_NOINPUT, f"cannot read the message from standard input: {exc}")
    fields, body = split_header(data)
    if inv.from_headers:
        recipients = list(dict.fromkeys(recipients + header_recipients(fields, domain)))
    if not recipients:
        raise UsageError("no recipients: name them as arguments, or use -t with To:, Cc: or Bcc:")
    fields = add_missing_headers(remove_bcc(fields), sender or f"{login}@{domain}",
                                 inv.full_name if inv.full_name is not None else gecos)
    message = b"".join(fields) + b"\r\n" + body
    host, port = choose_listener(config.smtp.listen)
    refused = submit((host, port), sender, recipients, message, config.smtp.max_recipients,
                     inv.verbose)
    if refused:
        raise refusal(refused, "the message was sent, except to")
    return EX_OK


def main(argv: list[str] | None = None, stdin: BinaryIO | None = None) -> int:
    """Run as ``sendmail`` or ``mailq`` (by the name in ``argv[0]``); returns a sysexits status."""
    argv = sys.argv if argv is None else argv
    program = Path(argv[0]).name if argv else "sendmail"
    try:
        inv = parse_args(argv[1:], program)
        config_path = inv.config or str(DEFAULT_CONFIG_PATH)
        if inv.mode != "deliver":
            from mailsrv.tools import cli

            command = {"list-queue": ["queue", "--config", config_path, "list"],
                       "flush-queue": ["queue", "--config", config_path, "flush"],
                       "check-aliases": ["check-config", "--config", config_path]}[inv.mode]
            status = cli.main(command)
            if inv.mode == "check-aliases" and status == EX_OK:
                print(f"{program}: mailsrv has no alias database to build; it reads the aliases "
                      "file at start-up and on reload (systemctl reload mailsrv)")
            return status
        config = load_config(config_path)
        return _deliver(inv, config, stdin if stdin is not None else sys.stdin.buffer)
    except UsageError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        print(f"usage: {program} [-t] [-i] [-f sender] [-F name] [-C config] [recipient ...]",
              file=sys.stderr)
        return EX_USAGE
    except ConfigError as exc:
        print(f"{program}: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except SendError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    raise SystemExit(main())
