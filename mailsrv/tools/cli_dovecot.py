"""``mailsrv dovecot-config``: print the Dovecot configuration that serves this server's
Maildirs over IMAP, with its users file as Dovecot's passdb and userdb.

The text is made by mailsrv.tools.dovecotconf; this module finds what it needs on the
system: the server's user and group (the owner of the Maildirs' root, else of the queue,
else Debian's ``mailsrv`` user; ``--user`` overrides) and the users file's group.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import sys
from pathlib import Path
from typing import Any

from mailsrv.config import Config, ConfigError
from mailsrv.tools import dovecotconf
from mailsrv.tools.cli_exit import EXIT_OK, Failed
from mailsrv.tools.sendmail_submit import SendError, choose_listener

__all__ = ["add_parser", "cmd_dovecot_config", "settings_for"]

#: The Debian package's system user, when the server has made no directory yet.
PACKAGE_USER = "mailsrv"


def add_parser(commands: Any, config_option: argparse.ArgumentParser) -> None:
    text = "print a Dovecot configuration for IMAP on this server's Maildirs and users file"
    sub = commands.add_parser(
        "dovecot-config", help=text, parents=[config_option],
        description=text + " (a whole dovecot.conf, or a file for /etc/dovecot/conf.d/).",
    )
    sub.add_argument("--user", metavar="NAME",
                     help="the user mailsrv runs as (default: the owner of the mailbox root, "
                     f"else of the queue, else {PACKAGE_USER})")
    sub.set_defaults(run=cmd_dovecot_config)


def _name(uid_or_gid: int, lookup: Any) -> str:
    try:
        return str(lookup(uid_or_gid)[0])
    except KeyError:
        return str(uid_or_gid)


def _server_ids(config: Config, user: str | None) -> tuple[int, int]:
    """(uid, gid) mail is read as: the user mailsrv runs as, who owns the Maildirs."""
    if user is None:
        for directory in (config.mailboxes.root, config.queue.path):
            try:
                st = os.stat(directory)
            except OSError:
                continue
            return st.st_uid, st.st_gid
        user = PACKAGE_USER
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise Failed(f"no user {user!r} on this system: give the user mailsrv runs as "
                     f"with --user") from None
    return entry.pw_uid, entry.pw_gid


def settings_for(config: Config, user: str | None = None) -> dovecotconf.DovecotSettings:
    """What the configuration needs, from ``config`` and the system."""
    boxes = config.mailboxes
    if boxes.users is None:
        raise ConfigError(config.source, "mailboxes.users",
                          "expected a users file, which Dovecot reads as its passdb")
    uid, gid = _server_ids(config, user)
    if uid == 0:
        raise Failed(f"the Maildirs under {boxes.root} belong to root, and Dovecot never reads "
                     f"mail as root: run mailsrv as its own user (twistd --uid, as the Debian "
                     f"package does), or name that user with --user")
    try:
        users_gid = os.stat(boxes.users).st_gid
    except OSError:
        users_gid = gid  # mailsrv user add creates it with the server's group
    lmtp = boxes.delivery
    submission = ""
    if lmtp is not None:
        try:
            host, port = choose_listener(config.smtp.listen)
            submission = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        except SendError:
            submission = ""  # Dovecot's default: /usr/sbin/sendmail, which is mailsrv's
    return dovecotconf.DovecotSettings(
        source=config.source,
        mail_root=Path(boxes.root).absolute(),
        users_file=Path(boxes.users).absolute(),
        mail_user=_name(uid, pwd.getpwuid),
        mail_group=_name(gid, grp.getgrgid),
        uid=uid,
        gid=gid,
        users_group=_name(users_gid, grp.getgrgid),
        tls_cert=None if config.tls.cert is None else Path(config.tls.cert).absolute(),
        tls_key=None if config.tls.key is None else Path(config.tls.key).absolute(),
        recipient_delimiter=boxes.recipient_delimiter,
        lmtp_path=None if lmtp is None else lmtp.path,
        lmtp_host="" if lmtp is None else lmtp.host,
        lmtp_port=0 if lmtp is None else lmtp.port,
        postmaster=f"postmaster@{config.domains.local[0]}",
        submission_host=submission,
    )


def cmd_dovecot_config(config: Config, args: argparse.Namespace) -> int:
    try:
        text = dovecotconf.render(settings_for(config, args.user))
    except dovecotconf.UnusablePath as e:
        raise Failed(str(e)) from None
    sys.stdout.write(text)
    return EXIT_OK
