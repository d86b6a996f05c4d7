"""``mailsrv user`` on a fresh install: the first user can be added, what is still missing
(a postmaster) is said, and ``--postmaster`` names one; the users file itself stays strict."""

from __future__ import annotations

import io

import pytest

from mailsrv.config import ConfigError, load_config
from mailsrv.startup import load_directory
from mailsrv.tools import cli
from support.harness import MailServer


@pytest.fixture
def fresh(tmp_path):
    """A configured (not started) server as after installation: no users file, an aliases
    file with comments only."""
    server = MailServer(tmp_path, dns_port=53)
    (tmp_path / "users").unlink()
    (tmp_path / "aliases").write_text("# aliases\n")
    return server


def user(server: MailServer, capsys, monkeypatch, *args: str, password: str = "pw of mine"):
    """``mailsrv user ARGS`` (the password on standard input); (exit status, out, err)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    stdin = ["--password-stdin"] if args[0] != "del" else []
    code = cli.main(["user", *args, *stdin, "--config", str(server.config_path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def directory_problem(server: MailServer) -> str | None:
    try:
        load_directory(load_config(str(server.config_path)))
    except ConfigError as e:
        return str(e)
    return None


def test_the_first_user_on_a_fresh_install(fresh, capsys, monkeypatch):
    code, out, err = user(fresh, capsys, monkeypatch, "add", "alice@example.org")
    assert code == 0, err
    assert out.startswith("ok: added alice@example.org\n")
    assert "note: example.org has no postmaster yet" in out
    assert "    mailsrv user add alice@example.org --postmaster\n" in out
    assert (fresh.workdir / "users").read_text().startswith("alice@example.org:{BLF-CRYPT}$2")
    assert (fresh.workdir / "users").stat().st_mode & 0o777 == 0o640
    assert "postmaster@example.org" in directory_problem(fresh)

    # What the note offers: alice exists, so only the alias is made (no password asked).
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["user", "add", "alice@example.org", "--postmaster",
                     "--config", str(fresh.config_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: alice@example.org exists already, and is now "
                          "postmaster@example.org\n")
    assert "postmaster@example.net" in out  # the other local domain still has none
    assert (fresh.workdir / "aliases").read_text() == (
        "# aliases\npostmaster@example.org: alice@example.org\n")

    code, out, err = user(fresh, capsys, monkeypatch, "add", "carol@example.net", "--postmaster")
    assert code == 0, err
    assert out == "ok: added carol@example.net, postmaster@example.net\n"  # nothing missing
    assert directory_problem(fresh) is None
    assert sorted(p.name for p in fresh.workdir.iterdir() if p.name.startswith(".")) == []


def test_aliases_naming_users_still_to_be_added(fresh, capsys, monkeypatch):
    (fresh.workdir / "aliases").write_text(
        "postmaster: alice@example.org\nsales@example.org: alice@example.org, bob@example.org\n")
    code, out, err = user(fresh, capsys, monkeypatch, "add", "alice@example.org")
    assert code == 0, err
    assert "no postmaster" not in out
    assert "note: mailsrv will not start yet:" in out and "bob@example.org is neither" in out
    code, out, err = user(fresh, capsys, monkeypatch, "add", "bob@example.org")
    assert (code, out) == (0, "ok: added bob@example.org\n"), err
    assert directory_problem(fresh) is None
    # Now valid, a change that would break it is refused again.
    code, out, err = user(fresh, capsys, monkeypatch, "del", "bob@example.org")
    assert code == 1 and "would not be valid" in err


def test_no_aliases_file_yet(fresh, capsys, monkeypatch):
    (fresh.workdir / "aliases").unlink()
    code, out, err = user(fresh, capsys, monkeypatch, "add", "alice@example.org", "--postmaster")
    assert code == 0, err
    assert (fresh.workdir / "aliases").read_text() == "postmaster@example.org: alice@example.org\n"
    assert (fresh.workdir / "aliases").stat().st_mode & 0o777 == 0o644


def test_the_users_file_itself_stays_strict(fresh, capsys, monkeypatch):
    code, out, err = user(fresh, capsys, monkeypatch, "add", "x/y@example.org")
    assert code == 1 and "usable as a directory name" in err
    assert not (fresh.workdir / "users").exists()


def test_postmaster_refusals(fresh, capsys, monkeypatch):
    (fresh.workdir / "aliases").write_text("postmaster@example.org: root@example.org\n")
    code, out, err = user(fresh, capsys, monkeypatch, "add", "alice@example.org", "--postmaster")
    assert code == 1 and "names postmaster@example.org already (line 1" in err
    assert not (fresh.workdir / "users").exists()  # nothing changed
    fresh.config["mailboxes"].pop("aliases")
    fresh.write_config()
    code, out, err = user(fresh, capsys, monkeypatch, "add", "alice@example.org", "--postmaster")
    assert code == 1 and "--postmaster needs an aliases file" in err


def test_passwd_keeps_dovecots_fields(tmp_path, capsys, monkeypatch):
    server = MailServer(tmp_path, dns_port=53, users=[
        "alice@example.org", "bob@example.org:{BLF-CRYPT}old::::::userdb_quota_rule=*:storage=1M",
        "carol@example.net"])
    code, out, err = user(server, capsys, monkeypatch, "passwd", "bob@example.org")
    assert code == 0, err
    line = (tmp_path / "users").read_text().splitlines()[1]
    assert line.startswith("bob@example.org:{BLF-CRYPT}$2")
    assert line.endswith("::::::userdb_quota_rule=*:storage=1M")
    assert directory_problem(server) is None
