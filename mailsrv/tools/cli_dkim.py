"""``mailsrv dkim keygen|list``: the DKIM signing keys, for the administrator.

``keygen`` makes a key under ``[dkim] keys`` (``<keys>/<domain>/<selector>.key``, directory
0700, file 0600, both the server's user's when run as root) and prints the TXT record to
publish; it never replaces an existing selector's key, so rotating is adding a selector,
publishing it, and later removing the old file.  The server signs with a new key after a
reload (SIGHUP) or a restart.  ``list`` shows the keys the server would load, checked as it
checks them, and with ``--records`` their TXT records again.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from mailsrv.config import Config
from mailsrv.message import dkimkeys
from mailsrv.routing.address import normalise_domain
from mailsrv.tools.cli_exit import EXIT_OK, Failed

__all__ = ["add_parser", "cmd_dkim", "default_selector"]


def default_selector(algorithm: str, today: datetime.date | None = None) -> str:
    """``YYYYMM-rsa`` / ``YYYYMM-ed25519``: says when the key was made and what it is, and a
    month's rotation gets a new name."""
    today = today or datetime.date.today()
    return f"{today:%Y%m}-{algorithm}"


def _server_owner(config: Config) -> tuple[int, int] | None:
    """The server's user and group when we are root: those of the queue directory, which the
    server creates as itself (``mailsrv`` in the Debian package); None otherwise."""
    if os.geteuid() != 0:
        return None  # the files are ours: run this as the server's user
    try:
        st = os.stat(config.queue.path)
    except OSError:
        return None
    return st.st_uid, st.st_gid


def _record(key_path: str, domain: str, selector: str) -> str:
    with open(key_path, "rb") as handle:
        algorithm, public = dkimkeys.public_key(handle.read())
    return dkimkeys.txt_record(domain, selector, algorithm, public)


def _keygen(config: Config, args: argparse.Namespace) -> int:
    try:
        domain = normalise_domain(args.domain)
    except ValueError as e:
        raise Failed(f"{args.domain!r} is not a domain name: {e}") from None
    selector = args.selector or default_selector(args.algorithm)
    try:
        dkimkeys.check_selector(selector)
    except ValueError as e:
        raise Failed(str(e)) from None
    directory = config.dkim.directory
    path = dkimkeys.key_path(directory, domain, selector)
    if path.exists():
        raise Failed(f"{path} exists: a selector's key is never replaced; choose another "
                     "with --selector")
    pem = dkimkeys.generate(args.algorithm)
    owner = _server_owner(config)
    try:
        dkimkeys.write_key(directory, domain, selector, pem, owner)
    except FileExistsError:
        raise Failed(f"{path} exists: a selector's key is never replaced") from None
    algorithm, public = dkimkeys.public_key(pem)
    print(f"; {args.algorithm} key for {domain} written to {path}")
    if domain not in config.domains.local and domain not in (
        config.hostname, config.hostname.partition(".")[2]
    ):
        print(f"; note: {domain} is not a local domain: only mail from trusted networks "
              "uses it")
    if os.geteuid() == 0 and owner is None:
        print(f"; warning: {config.queue.path} does not exist, so the key belongs to root: "
              "give it to the server's user (chown -R) before it starts", file=sys.stderr)
    print("; publish this record, then reload the server (systemctl reload mailsrv):")
    print(dkimkeys.txt_record(domain, selector, algorithm, public))
    return EXIT_OK


def _list(config: Config, args: argparse.Namespace) -> int:
    directory = config.dkim.directory
    keys = dkimkeys.load_keys(directory, config.source, required=config.dkim.keys is not None)
    if not len(keys):
        print(f"no DKIM keys in {directory}: nothing is signed")
        return EXIT_OK
    for key in keys.all():
        print(f"{key.domain}\t{key.selector}\t{key.algorithm}\t{key.path}")
        if args.records:
            print(_record(str(key.path), key.domain, key.selector))
    return EXIT_OK


def cmd_dkim(config: Config, args: argparse.Namespace) -> int:
    """Run ``mailsrv dkim ACTION``."""
    if args.action == "keygen":
        return _keygen(config, args)
    return _list(config, args)


def add_parser(commands: argparse._SubParsersAction, config: argparse.ArgumentParser) -> None:
    """``mailsrv dkim`` and its actions, on the admin command's parser."""
    parser = commands.add_parser(
        "dkim", help="make and list DKIM signing keys", parents=[config],
        description="Make and list the DKIM signing keys in the directory [dkim] keys names "
        "(default /etc/mailsrv/dkim).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    keygen = actions.add_parser(
        "keygen", help="make a key for a domain and print its TXT record", parents=[config],
        description="Make a signing key for DOMAIN (RSA-2048, or Ed25519 after RFC 8463) in "
        "<keys>/DOMAIN/SELECTOR.key and print the TXT record to publish. An existing "
        "selector is never replaced. The server signs with every key of a domain, after a "
        "reload (SIGHUP) or a restart.",
    )
    keygen.add_argument("domain", help="the From: domain to sign for, e.g. example.org")
    keygen.add_argument("--selector", help="the selector (default: YYYYMM-ALGORITHM)")
    keygen.add_argument("--algorithm", choices=dkimkeys.ALGORITHMS, default="rsa",
                        help="rsa (2048 bits, the default) or ed25519")
    keygen.set_defaults(run=cmd_dkim)
    listing = actions.add_parser(
        "list", help="the keys the server signs with", parents=[config],
        description="Every key the server would load, checked as at start-up.",
    )
    listing.add_argument("--records", action="store_true",
                         help="print each key's TXT record too")
    listing.set_defaults(run=cmd_dkim)
