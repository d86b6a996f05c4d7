"""The Dovecot configuration ``mailsrv dovecot-config`` prints (the text; Dovecot itself reads
it in tests/e2e/test_dovecot_imap.py)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from mailsrv.config import load_config
from mailsrv.tools import cli
from mailsrv.tools.cli_dovecot import settings_for
from mailsrv.tools.dovecotconf import DovecotSettings, UnusablePath, render
from support.harness import MailServer

SETTINGS = DovecotSettings(
    source=Path("/etc/mailsrv/mailsrv.toml"), mail_root=Path("/var/mail/mailsrv"),
    users_file=Path("/etc/mailsrv/users"), mail_user="mailsrv", mail_group="mailsrv",
    uid=104, gid=110, users_group="mailsrv",
    tls_cert=Path("/etc/letsencrypt/live/mx/fullchain.pem"),
    tls_key=Path("/etc/letsencrypt/live/mx/privkey.pem"),
)


def test_the_debian_package_configuration():
    text = render(SETTINGS)
    for line in (
        "protocols = imap",
        "mail_location = maildir:/var/mail/mailsrv/%d/%n",
        "mail_uid = mailsrv", "mail_gid = mailsrv",
        "first_valid_uid = 104  # the server's user is a system user",
        "auth_username_format = %Lu",
        "  driver = passwd-file", "  args = /etc/mailsrv/users",
        "  driver = static",
        "  args = uid=mailsrv gid=mailsrv home=/var/mail/mailsrv/%d/%n/home",
        "  extra_groups = mailsrv",
        "ssl = yes",
        "ssl_cert = </etc/letsencrypt/live/mx/fullchain.pem",
        "ssl_key = </etc/letsencrypt/live/mx/privkey.pem",
        "    port = 143", "    port = 993",
    ):
        assert f"\n{line}\n" in text, line
    assert "first_valid_gid" not in text
    assert text.count("{") == text.count("}")
    assert "/etc/mailsrv/mailsrv.toml" in text.splitlines()[0]


def test_without_tls_no_imaps_and_no_ssl():
    text = render(replace(SETTINGS, tls_cert=None, tls_key=None))
    assert "\nssl = no\n" in text and "ssl_cert" not in text
    assert "    port = 0\n" in text and "993" not in text


def test_a_user_with_a_high_uid_keeps_dovecots_lower_bound():
    text = render(replace(SETTINGS, uid=1001, gid=0))
    assert "first_valid_uid" not in text and "\nfirst_valid_gid = 0\n" in text


def test_paths_dovecot_cannot_hold():
    assert "maildir:/srv/100%%/%d/%n" in render(replace(SETTINGS, mail_root=Path("/srv/100%")))
    for path in ("/srv/my mail", "/srv/a#b", '/srv/"x"'):
        with pytest.raises(UnusablePath, match="no white space"):
            render(replace(SETTINGS, mail_root=Path(path)))


def test_the_server_and_its_files_found(tmp_path, capsys):
    server = MailServer(tmp_path, dns_port=53)
    config = load_config(str(server.config_path))
    owner = os.stat(tmp_path)
    server.root.mkdir()
    settings = settings_for(config, None if owner.st_uid != 0 else "mail")
    if owner.st_uid != 0:
        assert (settings.uid, settings.gid) == (owner.st_uid, owner.st_gid)
    assert settings.mail_root == server.root and settings.users_file == tmp_path / "users"
    if owner.st_uid == 0:
        # Dovecot never reads mail as root: refused, with the way out.
        assert cli.main(["dovecot-config", "--config", str(server.config_path)]) == 1
        assert "run mailsrv as its own user" in capsys.readouterr().err
        assert cli.main(["dovecot-config", "--config", str(server.config_path),
                         "--user", "mail"]) == 0
        assert "\nmail_uid = mail\n" in capsys.readouterr().out
    else:
        assert cli.main(["dovecot-config", "--config", str(server.config_path)]) == 0
        assert f"\nmail_location = maildir:{server.root}/%d/%n\n" in capsys.readouterr().out
    assert cli.main(["dovecot-config", "--config", str(server.config_path),
                     "--user", "no-such-user-here"]) == 1
    assert "no user 'no-such-user-here'" in capsys.readouterr().err


def test_catch_all_mode_has_no_users_for_dovecot(tmp_path, capsys):
    server = MailServer(tmp_path, dns_port=53)
    server.config["mailboxes"].pop("users")
    server.write_config()
    assert cli.main(["dovecot-config", "--config", str(server.config_path)]) == 2
    err = capsys.readouterr().err
    assert "mailboxes.users: expected a users file, which Dovecot reads as its passdb" in err
