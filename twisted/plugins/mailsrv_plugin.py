"""
The twistd plugin: ``twistd -n mailsrv [--config PATH]``.

This directory must not have an __init__.py: Twisted merges every ``twisted/plugins`` directory
on sys.path into its own plugin package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the mailsrv mail server. Without --config it reads /etc/mailsrv/mailsrv.toml, "
        "or, when that does not exist, runs a safe demo on 127.0.0.1 port 2525 that delivers "
        "mail for @localhost into ./demo-mail/."
    )
    optParameters = [["config", "c", None, "Path to mailsrv.toml."]]

    def postOptions(self) -> None:
        # Everything is checked here, before anything starts: a configuration error ends the
        # start with the file, the key and the expectation, and exit status 2.
        from mailsrv.config import DEFAULT_CONFIG_PATH, ConfigError, demo_config, load_config
        from mailsrv.privileges import effective_user
        from mailsrv.service import lock_queue
        from mailsrv.startup import prepare

        try:
            if self["config"] is not None:
                config = load_config(self["config"])
            elif DEFAULT_CONFIG_PATH.exists():
                config = load_config(DEFAULT_CONFIG_PATH)
            else:
                config = demo_config(Path(os.getcwd()))
            # As the user twistd --uid/--gid switches to, so that what is created belongs to it.
            parent = getattr(self, "parent", None) or {}
            with effective_user(parent.get("uid"), parent.get("gid")):
                self["directory"] = prepare(config)
                # One server per queue: a second one would deliver the same queue twice.
                self["queue_lock"] = lock_queue(config)
        except ConfigError as e:
            # One line an administrator can act on, not twistd's usage text around it.
            sys.stderr.write(f"mailsrv: configuration error: {e}\n")
            raise SystemExit(2)
        self["parsed_config"] = config


@implementer(IServiceMaker, IPlugin)
class MailsrvServiceMaker:
    tapname = "mailsrv"
    description = "mailsrv: a mail server for small organizations (SMTP into Maildirs)."
    options = Options

    def makeService(self, options: Options):
        from mailsrv.procs.childlog import logs_to_stdout
        from mailsrv.service import ListenError, listen_all, make_service

        top = make_service(
            options["parsed_config"], directory=options["directory"],
            queue_lock=options["queue_lock"],
            straight_logs=logs_to_stdout(getattr(options, "parent", None) or {}),
        )
        # Listen here, still as root (port 25) and before twistd daemonizes: a port in use is
        # then one line from the command that was run, with exit status 2, as a
        # configuration error is, rather than a traceback or a daemon's truncated message.
        try:
            listen_all(top)
        except ListenError as e:
            sys.stderr.write(f"mailsrv: {e}\n")
            raise SystemExit(2)
        return top


serviceMaker = MailsrvServiceMaker()
