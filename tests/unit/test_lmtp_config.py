"""``[mailboxes] delivery``: "maildir" or Dovecot's LMTP, and what dovecot-config makes of it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_dovecotconf import SETTINGS

from mailsrv.config import ConfigError, LmtpDelivery
from mailsrv.config.load import parse_config
from mailsrv.tools.dovecotconf import render

BASE = {"hostname": "mx.example.org", "domains": {"local": ["example.org"]},
        "mailboxes": {"root": "/var/mail/mailsrv"}, "queue": {"path": "/var/spool/mailsrv"},
        "relay": {}}


def delivery(value):
    data = dict(BASE, mailboxes=dict(BASE["mailboxes"], delivery=value))
    return parse_config(data, Path("/etc/mailsrv/mailsrv.toml")).mailboxes.delivery


@pytest.mark.parametrize("value, expected", [
    ("maildir", None),
    ("lmtp:unix:/run/dovecot/lmtp", LmtpDelivery(path=Path("/run/dovecot/lmtp"))),
    ("lmtp:unix:lmtp.sock", LmtpDelivery(path=Path("/etc/mailsrv/lmtp.sock"))),
    ("lmtp:tcp:127.0.0.1:24", LmtpDelivery(host="127.0.0.1", port=24)),
    ("lmtp:tcp:[::1]:65535", LmtpDelivery(host="::1", port=65535)),
])
def test_delivery_values(value, expected):
    assert delivery(value) == expected
    assert parse_config(BASE, None).mailboxes.delivery is None  # the default: maildir


@pytest.mark.parametrize("value", ["lmtp:tcp:127.0.0.1:65536", "lmtp:tcp:127.0.0.1:0",
                                   "lmtp:tcp::24", "lmtp:unix:", "smtp:tcp:x:25", "Maildir", 24])
def test_delivery_refused(value):
    with pytest.raises(ConfigError, match="mailboxes.delivery: expected \"maildir\""):
        delivery(value)


def test_dovecot_config_for_lmtp():
    text = render(replace(SETTINGS, lmtp_path=Path("/run/dovecot/lmtp"),
                          postmaster="postmaster@example.org", submission_host="127.0.0.1:25"))
    for line in ("protocols = imap lmtp", "  unix_listener lmtp {",
                 "    user = mailsrv", "    mode = 0600", "postmaster_address = postmaster@example.org",
                 "submission_host = 127.0.0.1:25", "recipient_delimiter = +",
                 "lmtp_rcpt_check_quota = yes", "  mail_plugins = $mail_plugins sieve",
                 "  sieve = file:~/sieve;active=~/active.sieve", "  quota = count:User quota"):
        assert f"\n{line}\n" in text, line
    elsewhere = render(replace(SETTINGS, lmtp_path=Path("/srv/lmtp.sock")))
    assert "\n  unix_listener /srv/lmtp.sock {\n" in elsewhere
    tcp = render(replace(SETTINGS, lmtp_host="127.0.0.1", lmtp_port=24, recipient_delimiter=""))
    assert "  inet_listener lmtp {\n    address = 127.0.0.1\n    port = 24\n" in tcp
    assert "recipient_delimiter" not in tcp and "submission_host" not in tcp
    assert "lmtp" not in render(SETTINGS).replace("mailsrv", "")
