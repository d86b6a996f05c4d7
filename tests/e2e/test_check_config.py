"""``mailsrv check-config``: every start-up check, with nothing created or locked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mailsrv.tools import cli
from support.harness import MailServer, _env
from support.mail import send_mail


@pytest.fixture
def configured(tmp_path):
    """A valid configuration (the harness's), never started; its directories do not exist."""
    return MailServer(tmp_path, dns_port=53)


def check(server: MailServer) -> int:
    return cli.main(["check-config", "--config", str(server.config_path)])


def test_good_configuration_summary_creates_nothing(configured, capsys):
    assert check(configured) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{configured.config_path}: ok\n")
    assert "  hostname: mx.example.org\n" in out
    assert "  local domains: example.org, example.net\n" in out
    assert "  mailboxes: 3 under" in out and "aliases: 4" in out
    assert "note: mailboxes.root:" in out and "note: queue.path:" in out
    # The server creates these at start-up, as its own user; check-config must not.
    assert not configured.root.exists() and not configured.queue.exists()


@pytest.mark.parametrize("table, key, value, named, expected", [
    ("smtp", "max_recipients", "ten", "smtp.max_recipients", "expected an integer >= 1"),
    ("smtp", "listen", ["tcp:25:interface=nowhere"], "smtp.listen[0]", "interface must be"),
    ("smtp", "max_recipents", 5, "smtp.max_recipents", "unknown key"),
    (None, "hostname", "bad_host!", "hostname", "expected a domain name"),
    ("domains", "local", [], "domains.local", "a non-empty list of domain names"),
    ("relay", "trusted_networks", ["10.0.0.1/8"], "relay.trusted_networks[0]", "no host bits"),
    ("relay", "smarthost_user", "u", "relay.smarthost_password_file", "together"),
])
def test_broken_keys_are_named(configured, capsys, table, key, value, named, expected):
    configured.set_config(table, key, value)
    assert check(configured) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mailsrv: configuration error: {configured.config_path}: {named}: ")
    assert expected in err


def test_missing_postmaster_and_bad_alias(configured, capsys):
    (configured.workdir / "aliases").write_text("sales@example.org: alice@example.org\n")
    assert check(configured) == 2
    assert "postmaster@example.org: a mailbox or alias for the postmaster" in capsys.readouterr().err
    (configured.workdir / "aliases").write_text(
        "postmaster: alice@example.org\nteam@example.org: nobody@example.org\n")
    assert check(configured) == 2
    err = capsys.readouterr().err
    assert f"{configured.workdir / 'aliases'}: team@example.org: " in err


def test_unreadable_files_and_unusable_directories(configured, capsys):
    (configured.workdir / "users").unlink()
    assert check(configured) == 2
    assert f"{configured.workdir / 'users'}: file: a readable file" in capsys.readouterr().err
    (configured.workdir / "users").write_text("alice@example.org\nbob@example.org\ncarol@example.net\n")
    configured.root.write_text("a file where the mailbox root should be")
    assert check(configured) == 2
    assert (f": mailboxes.root: a directory mailsrv can write: {configured.root} exists and is "
            "not a directory") in capsys.readouterr().err
    configured.root.unlink()
    blocker = configured.workdir / "blocker"
    blocker.write_text("a file in the way of the queue path")
    configured.set_config("queue", "path", str(blocker / "x" / "queue"))
    assert check(configured) == 2
    assert (f": queue.path: a directory mailsrv can write: {blocker / 'x' / 'queue'} does not "
            f"exist and {blocker} is not a writable directory") in capsys.readouterr().err


def test_a_user_outside_the_local_domains_is_refused(configured, capsys):
    users = configured.workdir / "users"
    users.write_text("alice@example.org\nbob@example.org\ncarol@example.net\ndave@other.net\n")
    assert check(configured) == 2
    assert capsys.readouterr().err == (
        f"mailsrv: configuration error: {users}: line 4 (dave@other.net): expected an address "
        "in a local domain (example.org, example.net); other.net is not in [domains] local\n"
    )
    configured.set_config("domains", "local", ["example.org", "example.net", "other.net"])
    assert check(configured) == 0


def test_password_hashes_readable_by_others_are_refused(configured, capsys):
    from mailsrv.accounts.auth import hash_password

    users = configured.workdir / "users"
    users.write_text(f"alice@example.org:{hash_password('pw', cost=4)}\nbob@example.org\n"
                     "carol@example.net\n")
    users.chmod(0o644)
    assert check(configured) == 2
    assert capsys.readouterr().err == (
        f"mailsrv: configuration error: {users}: mode 0644: expected a file with password "
        "hashes that others cannot read: chmod 0640 (readable by the server's group)\n"
    )
    users.chmod(0o640)
    assert check(configured) == 0
    capsys.readouterr()
    users.write_text("alice@example.org\nbob@example.org\ncarol@example.net\n")  # no hashes
    users.chmod(0o644)
    assert check(configured) == 0


@pytest.mark.parametrize("which", ["cert", "key"])
def test_tls_files_must_load(configured, capsys, which):
    from support.certs import self_signed

    cert, key = self_signed(["mx.example.org"], configured.workdir)
    files = {"cert": str(cert), "key": str(key)}
    files[which] = str(configured.workdir / f"missing.{which}")
    configured.set_config(None, "tls", files)
    configured.set_config("submission", "listen", ["tcp:5870", "ssl:4650"])
    assert check(configured) == 2
    err = capsys.readouterr().err
    assert f": tls.{which}: expected a readable PEM file: " in err and f"missing.{which}" in err


def test_tls_summary(configured, capsys):
    from support.certs import self_signed

    cert, key = self_signed(["mx.example.org"], configured.workdir)
    configured.set_config(None, "tls", {"cert": str(cert), "key": str(key)})
    configured.set_config("submission", "listen", ["tcp:5870", "ssl:4650"])
    assert check(configured) == 0
    out = capsys.readouterr().out
    assert "; submission: tcp:5870, ssl:4650\n" in out
    assert f"  tls: {cert}\n" in out


def test_smarthost_password_file_is_read(configured, capsys):
    configured.set_config("relay", "smarthost", "smtp.remote.test:587")
    configured.set_config("relay", "smarthost_user", "u")
    configured.set_config("relay", "smarthost_password_file", str(configured.workdir / "pw"))
    assert check(configured) == 2
    assert ": relay.smarthost_password_file: a readable password file" in capsys.readouterr().err
    (configured.workdir / "pw").write_text("secret\n")
    assert check(configured) == 0
    assert "relay: smarthost smtp.remote.test:587" in capsys.readouterr().out


def test_running_server_is_not_disturbed(make_server):
    """check-config next to a running server: exit 0, the server keeps its lock and serves."""
    server = make_server().start()
    before = sorted(os.listdir(server.queue))
    result = subprocess.run(
        [sys.executable, "-m", "mailsrv.tools.cli", "check-config", "--config", str(server.config_path)],
        capture_output=True, env=_env(), timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert b": ok\n" in result.stdout and b"note:" not in result.stdout
    assert sorted(os.listdir(server.queue)) == before
    send_mail(server.port, "x@client.test", ["alice@example.org"], b"Subject: still here\r\n\r\nx\r\n")
    assert server.process.poll() is None


def test_default_path_and_version(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert cli.main(["check-config"]) == 2
    assert f"{tmp_path / 'absent.toml'}: (file): a readable TOML file" in capsys.readouterr().err
    assert cli.main(["version"]) == 0
    from mailsrv import __version__
    assert capsys.readouterr().out.startswith(f"mailsrv {__version__} (Twisted ")


@pytest.mark.parametrize("command", [[], ["queue"], ["queue", "list"], ["check-config"],
                                     ["version"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: mailsrv")


def test_postmaster_relayed_off_the_machine_is_a_warning(configured, capsys):
    """The package's aliases say ``postmaster: root@<installation domain>``; after [domains]
    local is changed and the aliases file is not, postmaster mail would go to the old name."""
    users = configured.workdir / "users"
    aliases = configured.workdir / "aliases"
    users.write_text("root@example.org\nroot@example.net\n")
    aliases.write_text("postmaster: root@vm\nabuse: root@vm\n")
    assert check(configured) == 0
    out = capsys.readouterr().out
    for domain in ("example.org", "example.net"):
        assert (f"  warning: postmaster@{domain} goes to root@vm, not to a mailbox here: mail "
                f"for the postmaster leaves this machine (name a local mailbox in the aliases "
                f"file {aliases})\n") in out, out
    # One domain's postmaster a mailbox here, the other's forwarded elsewhere as well.
    aliases.write_text("postmaster@example.net: root@example.net, admin@remote.test\n")
    users.write_text("root@example.org\nroot@example.net\npostmaster@example.org\n")
    assert check(configured) == 0
    out = capsys.readouterr().out
    assert out.count("warning:") == 1
    assert "warning: postmaster@example.net goes to admin@remote.test, not" in out
    # Local postmasters: no warning.
    aliases.write_text("postmaster: root@example.org\n")
    assert check(configured) == 0
    assert "warning" not in capsys.readouterr().out
