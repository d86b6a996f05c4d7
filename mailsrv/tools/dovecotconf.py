"""The text of the Dovecot configuration ``mailsrv dovecot-config`` prints (pure: no I/O).

Dovecot serves IMAP from the Maildirs mailsrv writes, with the users file as its passdb.
The userdb is ``static`` (the server's uid and gid, home ``<root>/<domain>/<user>/home``) and
checks through the passdb that the user exists: Dovecot's ``userdb passwd-file`` refuses the
lines ``mailsrv user`` writes (``address:hash``, or a bare address for a mailbox without
login) with "missing userdb info" even with ``default_fields``, since it wants at least the
uid field.  Dovecot's extra fields on a line (``userdb_quota_rule=*:storage=1G``) still
reach the userdb through the passdb; a line's own uid, gid and home do not, since the mail
must be read as the server's user, who owns the Maildirs (mailsrv creates them ``0700``).
Home is a directory inside the Maildir, not the Maildir itself: Dovecot keeps dot-files in
home (``.dovecot.lda-dupes``, Sieve's binaries) that in a Maildir++ root read as folders, and an
IMAP listing racing LMTP's write of one logged "stat(.dovecot.lda-dupes/tmp) failed: Not a
directory"; a name without a dot is never a Maildir++ folder.
Dovecot's auth process reads the users file through the file's group (``service auth {
extra_groups }``), the file staying ``0640``.

The same text works as a whole ``dovecot.conf`` (``dovecot -c FILE``) and as a file in
Debian's ``/etc/dovecot/conf.d/``, read last, whose settings win over the ones before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DovecotSettings", "UnusablePath", "render", "FIRST_VALID_UID"]

#: Dovecot's default first_valid_uid: mail access for a lower uid (a system user such as
#: Debian's ``mailsrv``) is refused unless the configuration lowers it.
FIRST_VALID_UID = 500
FIRST_VALID_GID = 1
#: Dovecot's LMTP socket with its default base_dir (Debian's /run/dovecot).
DOVECOT_LMTP_SOCKET = Path("/run/dovecot/lmtp")


class UnusablePath(ValueError):
    """A path Dovecot's configuration cannot hold as it is (white space, quotes, newline)."""


@dataclass(frozen=True)
class DovecotSettings:
    """What the configuration is made of, read from mailsrv's configuration and the system."""

    source: Path | None  # mailsrv's configuration file, named in the header comment
    mail_root: Path  # [mailboxes] root: <root>/<domain>/<user> is a Maildir
    users_file: Path  # [mailboxes] users: passdb and userdb
    mail_user: str  # the server's user (name, or the uid as digits)
    mail_group: str  # its group
    uid: int
    gid: int
    users_group: str  # the users file's group, which Dovecot's auth process joins
    tls_cert: Path | None = None
    tls_key: Path | None = None
    recipient_delimiter: str = "+"
    #: With ``[mailboxes] delivery = "lmtp:..."``: Dovecot's LMTP listener, Sieve and quotas.
    lmtp_path: Path | None = None  # a Unix socket, or
    lmtp_host: str = ""  # a TCP address and port
    lmtp_port: int = 0
    postmaster: str = ""  # postmaster_address, for Sieve's replies and refusals
    submission_host: str = ""  # where Sieve's replies (vacation) are sent: mailsrv's SMTP

    @property
    def lmtp(self) -> bool:
        return self.lmtp_path is not None or bool(self.lmtp_host)


def _path(path: Path) -> str:
    """``path`` as a Dovecot value: '%' doubled (Dovecot expands %-variables)."""
    text = str(path)
    if any(c.isspace() or c in "\"'\\#" for c in text):
        raise UnusablePath(f"{text!r}: Dovecot's configuration takes no white space, quotes, "
                           f"backslashes or '#' in a path")
    return text.replace("%", "%%")


def _header(settings: DovecotSettings) -> list[str]:
    made_for = settings.source if settings.source is not None else "the built-in demo"
    return [
        f"# Dovecot configuration for mailsrv ({made_for}), printed by `mailsrv dovecot-config`.",
        "# It works as a whole dovecot.conf (dovecot -c FILE) and as the last file of",
        "# /etc/dovecot/conf.d/ (Debian's package installs it as 99-mailsrv.conf when that file",
        "# is absent, and never overwrites it).  Run `mailsrv dovecot-config` again after a",
        "# change of [mailboxes] or [tls] in mailsrv's configuration.",
        "",
    ]


def _mail(settings: DovecotSettings, root: str) -> list[str]:
    lines = [
        "protocols = imap lmtp" if settings.lmtp else "protocols = imap",
        "",
        "# The Maildirs mailsrv writes: <root>/<domain>/<user>, owned by the server's user.",
        f"mail_location = maildir:{root}/%d/%n",
        f"mail_uid = {settings.mail_user}",
        f"mail_gid = {settings.mail_group}",
    ]
    if settings.uid < FIRST_VALID_UID:
        lines.append(f"first_valid_uid = {settings.uid}  # the server's user is a system user")
    if settings.gid < FIRST_VALID_GID:
        lines.append(f"first_valid_gid = {settings.gid}")
    lines += [
        "",
        "namespace inbox {",
        "  inbox = yes",
        "  mailbox Drafts {",
        "    special_use = \\Drafts",
        "  }",
        "  mailbox Junk {",
        "    special_use = \\Junk",
        "  }",
        "  mailbox Sent {",
        "    special_use = \\Sent",
        "  }",
        "  mailbox Trash {",
        "    special_use = \\Trash",
        "  }",
        "}",
        "",
    ]
    return lines


def _auth(settings: DovecotSettings, root: str) -> list[str]:
    users = _path(settings.users_file)
    return [
        "# Users log in with their full address, as with mailsrv's AUTH; mailsrv lower-cases",
        "# the addresses of the users file and the Maildirs' names.",
        "auth_username_format = %Lu",
        "auth_mechanisms = plain login",
        "",
        "# The users file (`mailsrv user add|passwd|del`) is the passdb, and through it the",
        "# userdb: a static one (every user's mail is read as the server's user, who owns the",
        "# Maildirs) that asks the passdb whether the user exists.  Lines may carry Dovecot's",
        "# extra fields (address:hash::::::userdb_quota_rule=*:storage=1G): they apply.",
        "passdb {",
        "  driver = passwd-file",
        f"  args = {users}",
        "}",
        "userdb {",
        "  driver = static",
        f"  args = uid={settings.mail_user} gid={settings.mail_group} home={root}/%d/%n/home",
        "}",
        "",
        f"# The users file is 0640, group {settings.users_group}: the auth process joins that group.",
        "service auth {",
        f"  extra_groups = {settings.users_group}",
        "}",
        "",
    ]


def _tls(settings: DovecotSettings) -> list[str]:
    if settings.tls_cert is None or settings.tls_key is None:
        return [
            "# mailsrv has no [tls] certificate: IMAP without TLS, on port 143 only.  Passwords",
            "# are accepted in clear only from this machine (disable_plaintext_auth).  Set",
            "# [tls] cert and key in mailsrv's configuration and print this file again.",
            "ssl = no",
            "disable_plaintext_auth = yes",
            "service imap-login {",
            "  inet_listener imap {",
            "    port = 143",
            "  }",
            "  inet_listener imaps {",
            "    port = 0",
            "  }",
            "}",
            "",
        ]
    return [
        "# mailsrv's [tls] certificate: IMAP with STARTTLS on 143, implicit TLS on 993.",
        "# Passwords only over TLS (or from this machine).  After a renewal: systemctl reload dovecot.",
        "ssl = yes",
        f"ssl_cert = <{_path(settings.tls_cert)}",
        f"ssl_key = <{_path(settings.tls_key)}",
        "disable_plaintext_auth = yes",
        "service imap-login {",
        "  inet_listener imap {",
        "    port = 143",
        "  }",
        "  inet_listener imaps {",
        "    port = 993",
        "    ssl = yes",
        "  }",
        "}",
        "",
    ]


def _lmtp(settings: DovecotSettings) -> list[str]:
    """mailsrv hands local mail to Dovecot's LMTP: Sieve runs, quotas apply."""
    if not settings.lmtp:
        return []
    if settings.lmtp_path is not None:
        # Dovecot's own LMTP socket (base_dir/lmtp, /run/dovecot/lmtp) by its own name, so
        # that this changes Debian's 10-master.conf listener rather than adding a second one
        # on the same path.
        name = "lmtp" if settings.lmtp_path == DOVECOT_LMTP_SOCKET else _path(settings.lmtp_path)
        listener = [
            f"  unix_listener {name} {{",
            f"    user = {settings.mail_user}",
            f"    group = {settings.mail_group}",
            "    mode = 0600",
            "  }",
        ]
    else:
        listener = [
            "  inet_listener lmtp {",
            f"    address = {settings.lmtp_host}",
            f"    port = {settings.lmtp_port}",
            "  }",
        ]
    delimiter = settings.recipient_delimiter
    return [
        "# [mailboxes] delivery = \"lmtp:...\": mailsrv hands local mail to Dovecot's LMTP,",
        "# which runs the users' Sieve scripts (~/sieve/, the active one linked as",
        "# ~/active.sieve; home is <Maildir>/home, Dovecot's own files kept out of the",
        "# Maildir++ root) and enforces their quotas (userdb_quota_rule=*:storage=1G on a line",
        "# of the users file; over quota, RCPT gets 552 5.2.2).",
        "service lmtp {",
        *listener,
        "}",
        f"postmaster_address = {settings.postmaster}",
        *([f"submission_host = {settings.submission_host}"] if settings.submission_host else []),
        *([f"recipient_delimiter = {delimiter}"] if delimiter else []),
        "lmtp_save_to_detail_mailbox = no",
        "lmtp_rcpt_check_quota = yes",
        "lda_mailbox_autocreate = yes",
        "lda_mailbox_autosubscribe = yes",
        "mail_plugins = $mail_plugins quota",
        "protocol lmtp {",
        "  mail_plugins = $mail_plugins sieve",
        "}",
        "protocol imap {",
        "  mail_plugins = $mail_plugins imap_quota",
        "}",
        "plugin {",
        "  sieve = file:~/sieve;active=~/active.sieve",
        "  quota = count:User quota",
        "  quota_vsizes = yes",
        "}",
        "",
    ]


def render(settings: DovecotSettings) -> str:
    """The whole configuration (UnusablePath for a path it cannot hold)."""
    root = _path(settings.mail_root)
    lines = (_header(settings) + _mail(settings, root) + _auth(settings, root) + _tls(settings)
             + _lmtp(settings))
    return "\n".join(lines).rstrip("\n") + "\n"
