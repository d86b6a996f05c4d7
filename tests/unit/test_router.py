"""Tests for mailsrv.routing.router (alias resolution, plus-addressing, start-up checks) and the
loaders of mailsrv.accounts.files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsrv.accounts.files import load_aliases, load_users, read_users
from mailsrv.config import ConfigError
from mailsrv.routing.address import Mailbox
from mailsrv.routing.router import (
    MAX_ALIAS_DEPTH,
    Directory,
    LocalTarget,
    RemoteTarget,
    UnknownRecipient,
)

ORG = "example.org"
NET = "example.net"


def L(user: str, domain: str = ORG) -> LocalTarget:
    return LocalTarget(domain, user)


def R(address: str) -> RemoteTarget:
    return RemoteTarget(address)


USERS = frozenset(
    {
        "alice@example.org",
        "bob@example.org",
        "carol@example.net",
        "alice+x@example.org",  # a real mailbox whose name holds the delimiter
    }
)
ALIASES: dict[str, tuple[str, ...]] = {
    "postmaster": ("alice@example.org",),  # bare: in every local domain
    "sales@example.org": ("alice@example.org", "Dave@partner.example"),
    "team@example.org": ("sales@example.org", "bob@example.org", "alice@example.org"),
    "bob@example.org": ("bob@example.org", "bob@partner.example"),  # names itself
    "abuse@example.net": ("postmaster@example.net",),
    "alice+sales@example.org": ("bob@example.org",),
    "info": ("Info@elsewhere.example",),
    "tagged@example.org": ("alice+from-tagged@example.org",),
    "chain1@example.org": ("chain2@example.org",),
    "chain2@example.org": ("chain3@example.org",),
    "chain3@example.org": ("carol@example.net",),
}


@pytest.fixture
def directory() -> Directory:
    return Directory([ORG, NET], USERS, ALIASES)


def resolve(directory: Directory, local: str, domain: str = ORG) -> tuple[object, ...]:
    return directory.resolve(Mailbox(local, domain))


# --------------------------------------------------------------------------- targets


def test_local_target() -> None:
    target = LocalTarget("example.org", "alice")
    assert target.address == "alice@example.org"
    assert target.maildir(Path("/var/mail/mailsrv")) == Path("/var/mail/mailsrv/example.org/alice")
    assert {target, LocalTarget("example.org", "alice")} == {target}


def test_remote_target() -> None:
    assert RemoteTarget("Dave@partner.example").address == "Dave@partner.example"


# --------------------------------------------------------------------------- resolve


def test_is_local_domain(directory: Directory) -> None:
    assert directory.is_local_domain("example.org")
    assert directory.is_local_domain("EXAMPLE.NET")
    assert not directory.is_local_domain("partner.example")
    assert not directory.is_local_domain("")
    assert not directory.is_local_domain("[192.0.2.1]")


def test_local_domains_are_normalised() -> None:
    d = Directory(["Example.ORG.", "bücher.example", "example.org"], None, {})
    assert d.local_domains == ("example.org", "xn--bcher-kva.example")
    assert d.is_local_domain("xn--bcher-kva.example")


@pytest.mark.parametrize(
    "local, domain, expected",
    [
        ("alice", ORG, (L("alice"),)),
        ("ALICE", ORG, (L("alice"),)),
        ("Alice", ORG, (L("alice"),)),
        ("carol", NET, (L("carol", NET),)),
        # alias with a remote target: remote local part kept as written
        ("sales", ORG, (L("alice"), R("Dave@partner.example"))),
        ("SALES", ORG, (L("alice"), R("Dave@partner.example"))),
        # nested alias, de-duplicated with order kept
        ("team", ORG, (L("alice"), R("Dave@partner.example"), L("bob"), R("bob@partner.example"))),
        # alias naming itself: the real mailbox plus the other targets
        ("bob", ORG, (L("bob"), R("bob@partner.example"))),
        # bare-name alias in every local domain
        ("postmaster", ORG, (L("alice"),)),
        ("postmaster", NET, (L("alice"),)),
        ("PostMaster", NET, (L("alice"),)),
        ("info", ORG, (R("Info@elsewhere.example"),)),
        ("info", NET, (R("Info@elsewhere.example"),)),
        # alias to an alias through a bare name
        ("abuse", NET, (L("alice"),)),
        # chain across domains
        ("chain1", ORG, (L("carol", NET),)),
        # plus-addressing
        ("alice+tag", ORG, (L("alice"),)),
        ("ALICE+Tag", ORG, (L("alice"),)),
        ("alice+a+b", ORG, (L("alice"),)),  # delimiter twice: part before the FIRST one
        ("alice+", ORG, (L("alice"),)),
        ("sales+x", ORG, (L("alice"), R("Dave@partner.example"))),  # alias via its base
        ("postmaster+x", NET, (L("alice"),)),  # bare alias via its base
        # exact names win over the base
        ("alice+x", ORG, (L("alice+x"),)),  # a mailbox of that name
        ("alice+sales", ORG, (L("bob"), R("bob@partner.example"))),  # an alias of that name
        # alias target using plus-addressing
        ("tagged", ORG, (L("alice"),)),
    ],
)
def test_resolve(
    directory: Directory, local: str, domain: str, expected: tuple[object, ...]
) -> None:
    assert resolve(directory, local, domain) == expected


@pytest.mark.parametrize(
    "local, domain",
    [
        ("nobody", ORG),
        ("carol", ORG),  # carol is in example.net only
        ("alice", NET),
        ("sales", NET),  # full-address alias is for example.org only
        ("+tag", ORG),  # empty base
        ("nobody+alice", ORG),
        ("alice-tag", ORG),  # not the delimiter
        ("../alice", ORG),  # unsafe
        (".alice", ORG),
        ("a/b", ORG),
        ("", ORG),
        ("alice", "partner.example"),  # not a local domain
        ("alice", "[192.0.2.1]"),
    ],
)
def test_resolve_unknown(directory: Directory, local: str, domain: str) -> None:
    with pytest.raises(UnknownRecipient):
        resolve(directory, local, domain)


def test_postmaster_without_domain_is_first_local_domain() -> None:
    d = Directory([NET, ORG], frozenset({"postmaster@example.net", "postmaster@example.org"}), {})
    assert d.resolve(Mailbox("postmaster", "")) == (L("postmaster", NET),)
    d = Directory([ORG, NET], frozenset({"postmaster@example.net", "postmaster@example.org"}), {})
    assert d.resolve(Mailbox("postmaster", "")) == (L("postmaster", ORG),)


def test_postmaster_without_domain_through_bare_alias(directory: Directory) -> None:
    assert directory.resolve(Mailbox("postmaster", "")) == (L("alice"),)


def test_postmaster_without_local_domains() -> None:
    with pytest.raises(UnknownRecipient):
        Directory([], None, {}).resolve(Mailbox("postmaster", ""))


def test_plus_addressing_custom_and_disabled_delimiter() -> None:
    users = frozenset({"alice@example.org"})
    dash = Directory([ORG], users, {}, recipient_delimiter="-")
    assert dash.resolve(Mailbox("alice-news", ORG)) == (L("alice"),)
    with pytest.raises(UnknownRecipient):
        dash.resolve(Mailbox("alice+news", ORG))
    off = Directory([ORG], users, {}, recipient_delimiter="")
    with pytest.raises(UnknownRecipient):
        off.resolve(Mailbox("alice+news", ORG))
    assert off.resolve(Mailbox("alice", ORG)) == (L("alice"),)


def test_catch_all_mode() -> None:
    d = Directory(["localhost"], None, {"postmaster": ("root@localhost",)})
    assert d.resolve(Mailbox("anyone", "localhost")) == (L("anyone", "localhost"),)
    assert d.resolve(Mailbox("Anyone", "localhost")) == (L("anyone", "localhost"),)
    # a tagged address goes to the base mailbox, as with a users file
    assert d.resolve(Mailbox("anyone+tag", "localhost")) == (L("anyone", "localhost"),)
    # aliases still apply
    assert d.resolve(Mailbox("postmaster", "")) == (L("root", "localhost"),)
    for unsafe in ("../x", ".x", "a/b", "", "a" * 65, "+tag"):
        with pytest.raises(UnknownRecipient):
            d.resolve(Mailbox(unsafe, "localhost"))
    with pytest.raises(UnknownRecipient):
        d.resolve(Mailbox("anyone", "example.org"))


def test_catch_all_without_aliases_postmaster() -> None:
    d = Directory(["localhost"], None, {})
    assert d.resolve(Mailbox("postmaster", "")) == (L("postmaster", "localhost"),)


def test_resolve_terminates_on_loops_not_checked() -> None:
    # check() refuses these at start-up; resolve must still terminate.
    aliases = {
        "a@example.org": ("b@example.org",),
        "b@example.org": ("a@example.org", "carol@example.org"),
        "x@example.org": ("y@example.org",),
        "y@example.org": ("x@example.org",),
    }
    d = Directory([ORG], frozenset({"a@example.org", "carol@example.org"}), aliases)
    # a -> b -> a: a is already being expanded, so its real mailbox receives.
    assert d.resolve(Mailbox("a", ORG)) == (L("a"), L("carol"))
    assert d.resolve(Mailbox("b", ORG)) == (L("carol"),)
    with pytest.raises(UnknownRecipient):
        d.resolve(Mailbox("x", ORG))  # nothing real behind the loop


def test_resolve_depth_guard() -> None:
    n = MAX_ALIAS_DEPTH
    aliases = {f"a{i}@example.org": (f"a{i + 1}@example.org",) for i in range(n)}
    d = Directory([ORG], frozenset({f"a{n}@example.org"}), aliases)
    assert d.resolve(Mailbox("a0", ORG)) == (L(f"a{n}"),)  # exactly MAX_ALIAS_DEPTH aliases
    aliases[f"a{n}@example.org"] = (f"a{n + 1}@example.org",)
    d = Directory([ORG], frozenset({f"a{n + 1}@example.org"}), aliases)
    with pytest.raises(UnknownRecipient):
        d.resolve(Mailbox("a0", ORG))


def test_alias_targets_with_unsafe_local_parts_are_skipped() -> None:
    aliases = {"x@example.org": ("../etc@example.org", "alice@example.org")}
    d = Directory([ORG], frozenset({"alice@example.org"}), aliases)
    assert d.resolve(Mailbox("x", ORG)) == (L("alice"),)


def test_dedupe_of_local_and_remote_targets() -> None:
    aliases = {
        "all@example.org": ("a@example.org", "b@example.org", "ext@partner.example"),
        "a@example.org": ("alice@example.org", "ext@partner.example"),
        "b@example.org": ("ALICE@example.org", "alice+b@example.org"),
    }
    d = Directory([ORG], frozenset({"alice@example.org"}), aliases)
    assert d.resolve(Mailbox("all", ORG)) == (L("alice"), R("ext@partner.example"))


# --------------------------------------------------------------------------- check


def test_check_accepts_good_directory(directory: Directory) -> None:
    directory.check("/etc/mailsrv/aliases")
    directory.check(None)


def check_error(d: Directory, source: str = "/etc/mailsrv/aliases") -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        d.check(source)
    assert exc.value.file == source
    return exc.value


def test_check_names_the_loop() -> None:
    aliases = {
        "postmaster@example.org": ("alice@example.org",),
        "a@example.org": ("b@example.org",),
        "b@example.org": ("a@example.org",),
    }
    err = check_error(Directory([ORG], frozenset({"alice@example.org"}), aliases))
    assert "a@example.org -> b@example.org -> a@example.org" in str(err)


def test_check_names_a_longer_loop_through_a_bare_alias() -> None:
    aliases = {
        "postmaster": ("ops@example.org",),
        "ops@example.org": ("admins@example.net",),
        "admins@example.net": ("postmaster@example.org",),
    }
    err = check_error(Directory([ORG, NET], frozenset({"alice@example.org"}), aliases))
    # aliases are checked in sorted order, so the loop is named from "admins@example.net"
    assert (
        "admins@example.net -> postmaster@example.org -> ops@example.org -> admins@example.net"
        in str(err)
    )


def test_check_loop_through_plus_addressing() -> None:
    aliases = {
        "postmaster@example.org": ("alice@example.org",),
        "a@example.org": ("b+x@example.org",),
        "b@example.org": ("a@example.org",),
    }
    err = check_error(Directory([ORG], frozenset({"alice@example.org"}), aliases))
    assert "a@example.org -> b@example.org -> a@example.org" in str(err)


def test_check_accepts_self_naming_alias_with_mailbox() -> None:
    aliases = {"postmaster@example.org": ("postmaster@example.org", "ops@partner.example")}
    Directory([ORG], frozenset({"postmaster@example.org"}), aliases).check(None)


def test_check_refuses_self_naming_alias_without_mailbox() -> None:
    aliases = {"postmaster@example.org": ("postmaster@example.org", "ops@partner.example")}
    err = check_error(Directory([ORG], frozenset({"alice@example.org"}), aliases))
    assert err.key == "postmaster@example.org"
    assert "postmaster@example.org" in err.expected


def test_check_bare_self_naming_alias_in_every_domain() -> None:
    aliases = {"postmaster": ("postmaster@example.org",)}
    users = frozenset({"postmaster@example.org"})
    Directory([ORG, NET], users, aliases).check(None)
    # without the real mailbox, every instance ends in nothing
    err = check_error(Directory([ORG, NET], frozenset({"alice@example.org"}), aliases))
    assert err.key == "postmaster"


def test_check_refuses_unresolvable_target() -> None:
    aliases = {
        "postmaster": ("alice@example.org",),
        "sales@example.org": ("alice@example.org", "nobody@example.org", "x@partner.example"),
    }
    err = check_error(Directory([ORG], frozenset({"alice@example.org"}), aliases))
    assert err.key == "sales@example.org"
    assert "nobody@example.org" in err.expected
    assert "sales@example.org" in str(err)


def test_check_refuses_unresolvable_target_of_nested_alias() -> None:
    aliases = {
        "postmaster": ("team@example.org",),
        "team@example.org": ("alice@example.org", "nobody@example.net"),
    }
    err = check_error(Directory([ORG, NET], frozenset({"alice@example.org"}), aliases))
    assert "nobody@example.net" in str(err)


def test_check_refuses_unsafe_target() -> None:
    aliases = {"postmaster": ("alice@example.org", "..@example.org")}
    err = check_error(Directory([ORG], frozenset({"alice@example.org"}), aliases))
    assert "..@example.org" in str(err)


def test_check_accepts_plus_addressed_target() -> None:
    aliases = {"postmaster": ("alice+admin@example.org",)}
    Directory([ORG], frozenset({"alice@example.org"}), aliases).check(None)


def test_check_requires_postmaster_in_every_domain() -> None:
    users = frozenset({"alice@example.org", "postmaster@example.org"})
    err = check_error(Directory([ORG, NET], users, {}))
    assert err.key == "postmaster@example.net"
    assert "postmaster" in err.expected
    # a full alias, a bare alias or a user each satisfy it
    Directory([ORG, NET], users, {"postmaster@example.net": ("alice@example.org",)}).check(None)
    bare = {"postmaster": ("alice@example.org",)}
    Directory([ORG, NET], frozenset({"alice@example.org"}), bare).check(None)
    Directory([ORG], users, {}).check(None)


def test_check_catch_all_needs_no_postmaster() -> None:
    Directory(["localhost"], None, {}).check(None)
    Directory(["localhost"], None, {"root": ("anyone@localhost",)}).check(None)
    err = check_error(Directory(["localhost"], None, {"root": ("../x@localhost",)}))
    assert err.key == "root"


def test_check_refuses_alias_in_foreign_domain() -> None:
    aliases = {"postmaster": ("alice@example.org",), "sales@exmaple.org": ("alice@example.org",)}
    err = check_error(Directory([ORG], frozenset({"alice@example.org"}), aliases))
    assert err.key == "sales@exmaple.org"


def test_check_refuses_too_deep_chain() -> None:
    n = MAX_ALIAS_DEPTH
    aliases = {f"a{i}@example.org": (f"a{i + 1}@example.org",) for i in range(n)}
    users = frozenset({f"a{n}@example.org", "postmaster@example.org"})
    Directory([ORG], users, aliases).check(None)  # a chain of exactly MAX_ALIAS_DEPTH aliases
    aliases = {f"a{i}@example.org": (f"a{i + 1}@example.org",) for i in range(n + 1)}
    users = frozenset({f"a{n + 1}@example.org", "postmaster@example.org"})
    err = check_error(Directory([ORG], users, aliases))
    assert str(MAX_ALIAS_DEPTH) in err.expected
    assert "a0@example.org -> a1@example.org" in err.expected


# --------------------------------------------------------------------------- load_users


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    path.chmod(0o640)  # a users file with password fields must not be open to others
    return path


def test_load_users(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "users",
        "# mailboxes\n"
        "\n"
        "alice@example.org:{SHA512-CRYPT}$6$salt$hash:1000:1000::/home/alice::\n"
        "   Bob@Example.ORG   \n"
        "  # indented comment\n"
        "carol@bücher.example:{PLAIN}secret\n"
        "dave@example.org:\r\n"
        "first.last+x@example.net:{BLF-CRYPT}$2y$05$abc\n",
    )
    assert load_users(path) == frozenset(
        {
            "alice@example.org",
            "bob@example.org",
            "carol@xn--bcher-kva.example",
            "dave@example.org",
            "first.last+x@example.net",
        }
    )


def test_load_users_empty_file(tmp_path: Path) -> None:
    assert load_users(write(tmp_path, "users", "# nobody yet\n")) == frozenset()


@pytest.mark.parametrize(
    "line",
    [
        "alice",  # no domain
        "alice@",
        "@example.org",
        ":{PLAIN}x",
        "alice@bob@example.org",
        "alice@example..org",
        "alice@exa_mple.org",
        "alice@[192.0.2.1]",
        ".alice@example.org",
        "al..ice@example.org",
        "a/b@example.org",
        "a\\b@example.org",
        "john doe@example.org",
        "a" * 65 + "@example.org",
        "\"quoted\"@example.org",
    ],
)
def test_load_users_errors_name_the_line(tmp_path: Path, line: str) -> None:
    path = write(tmp_path, "users", f"# header\nok@example.org\n{line}:{{PLAIN}}x\n")
    with pytest.raises(ConfigError) as exc:
        load_users(path)
    assert exc.value.file == str(path)
    assert exc.value.key == "line 3"
    assert f"{path}: line 3: " in str(exc.value)


def test_load_users_64_octet_local_part(tmp_path: Path) -> None:
    path = write(tmp_path, "users", "a" * 64 + "@example.org\n")
    assert load_users(path) == frozenset({"a" * 64 + "@example.org"})


def test_load_users_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path, "users", "alice@example.org:{PLAIN}a\n\nALICE@example.org.:{PLAIN}b\n")
    with pytest.raises(ConfigError) as exc:
        load_users(path)
    assert exc.value.key == "line 3"
    assert "line 1" in exc.value.expected


def test_load_users_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_users(tmp_path / "missing")
    assert exc.value.file == str(tmp_path / "missing")


def test_load_users_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, "users", b"alice@example.org\n\xff@example.org\n")
    with pytest.raises(ConfigError) as exc:
        load_users(path)
    assert exc.value.key == "line 2"


def test_users_must_be_in_a_local_domain(tmp_path: Path) -> None:
    path = write(tmp_path, "users", "alice@example.org\n# a comment\ndave@Other.NET:{PLAIN}x\n")
    with pytest.raises(ConfigError) as exc:
        read_users(path, local_domains=["example.org", "Bücher.example"])
    assert exc.value.key == "line 3 (dave@other.net)"
    assert str(exc.value) == (
        f"{path}: line 3 (dave@other.net): expected an address in a local domain "
        "(example.org, xn--bcher-kva.example); other.net is not in [domains] local"
    )
    path = write(tmp_path, "users", "alice@example.org\ncarol@BÜCHER.example.\n")
    assert read_users(path, local_domains=["example.org", "bücher.example"]) == {
        "alice@example.org": None, "carol@xn--bcher-kva.example": None}


@pytest.mark.parametrize("mode, refused", [
    pytest.param(mode, refused, id=f"{mode:04o}") for mode, refused in (
        (0o640, False), (0o600, False), (0o660, False), (0o400, False),
        (0o644, True), (0o604, True), (0o642, True), (0o641, True), (0o666, True),
    )
])
def test_a_users_file_with_passwords_must_not_be_open_to_others(
    tmp_path: Path, mode: int, refused: bool
) -> None:
    hashed = "{BLF-CRYPT}$2y$05$" + "a" * 53
    for text, passwords in ((f"alice@example.org:{hashed}\nbob@example.org\n", True),
                            ("alice@example.org:{PLAIN}for-dovecot-only\n", False)):
        path = write(tmp_path, "users", text)
        path.chmod(mode)
        if not refused:
            assert "alice@example.org" in read_users(path, passwords=passwords)
            continue
        with pytest.raises(ConfigError) as exc:
            read_users(path, passwords=passwords)
        assert str(exc.value) == (
            f"{path}: mode {mode:04o}: expected a file with password hashes that others "
            "cannot read: chmod 0640 (readable by the server's group)"
        )
    # Without any password field, the file is only a list of mailboxes: any mode will do.
    path = write(tmp_path, "users", "alice@example.org\nbob@example.org:\n")
    path.chmod(mode)
    assert set(read_users(path, passwords=True)) == {"alice@example.org", "bob@example.org"}


# --------------------------------------------------------------------------- load_aliases


def test_load_aliases(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "aliases",
        "# name: target, target\n"
        "\n"
        "Sales@Example.ORG: alice@example.org, Dave.Smith@Partner.EXAMPLE\n"
        "postmaster:alice@example.org\n"
        "  abuse  :  postmaster@example.org ,bob@example.org  \n"
        "info@bücher.example: Info@Bücher.example.\r\n"
        "   # indented comment\n",
    )
    assert load_aliases(path) == {
        "sales@example.org": ("alice@example.org", "Dave.Smith@partner.example"),
        "postmaster": ("alice@example.org",),
        "abuse": ("postmaster@example.org", "bob@example.org"),
        "info@xn--bcher-kva.example": ("Info@xn--bcher-kva.example",),
    }


def test_load_aliases_feed_a_directory(tmp_path: Path) -> None:
    aliases = load_aliases(write(tmp_path, "aliases", "postmaster: Alice@example.org\n"))
    users = load_users(write(tmp_path, "users", "alice@example.org:{PLAIN}x\n"))
    d = Directory([ORG], users, aliases)
    d.check(tmp_path / "aliases")
    assert d.resolve(Mailbox("postmaster", ORG)) == (L("alice"),)


@pytest.mark.parametrize(
    "line",
    [
        "sales example.org alice@example.org",  # no colon
        ": alice@example.org",  # no name
        "sales:",  # no targets
        "sales: ",
        "sales: alice@example.org,",  # empty target
        "sales: alice@example.org,, bob@example.org",
        "sales: alice",  # target without domain
        "sales: alice@",
        "sales: alice@example..org",
        "sales: alice@bob@example.org",
        "sales: alice@[192.0.2.1]",
        "sales: |/usr/bin/procmail",
        "sales: /var/mail/sales",
        "sales: :include:/etc/list",
        "sales: alice@example.org bob@example.org",  # missing comma
        "sa les: alice@example.org",
        ".sales: alice@example.org",
        "sales@: alice@example.org",
        "sales@bad_domain.example: alice@example.org",
        "sales@a@example.org: alice@example.org",
    ],
)
def test_load_aliases_errors_name_the_line(tmp_path: Path, line: str) -> None:
    path = write(tmp_path, "aliases", f"# header\npostmaster: alice@example.org\n\n{line}\n")
    with pytest.raises(ConfigError) as exc:
        load_aliases(path)
    assert exc.value.file == str(path)
    assert exc.value.key == "line 4"
    assert f"{path}: line 4: " in str(exc.value)


def test_load_aliases_duplicate(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "aliases",
        "sales@example.org: alice@example.org\nSALES@EXAMPLE.ORG: bob@example.org\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_aliases(path)
    assert exc.value.key == "line 2"
    assert "line 1" in exc.value.expected


def test_load_aliases_bare_and_full_names_are_distinct(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "aliases",
        "postmaster: alice@example.org\npostmaster@example.net: carol@example.net\n",
    )
    aliases = load_aliases(path)
    d = Directory([ORG, NET], frozenset({"alice@example.org", "carol@example.net"}), aliases)
    assert d.resolve(Mailbox("postmaster", NET)) == (L("carol", NET),)  # full alias first
    assert d.resolve(Mailbox("postmaster", ORG)) == (L("alice"),)


def test_load_aliases_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_aliases(tmp_path / "missing")


def test_check_and_resolve_of_shared_lists_stay_fast() -> None:
    # Each alias lists the next one twice (once plus-addressed): 2**19 walks if naive.
    n = MAX_ALIAS_DEPTH - 1
    aliases = {
        f"l{i}@example.org": (f"l{i + 1}@example.org", f"l{i + 1}+x@example.org")
        for i in range(n)
    }
    aliases[f"l{n}@example.org"] = ("alice@example.org", "ext@partner.example")
    d = Directory([ORG], frozenset({"alice@example.org", "postmaster@example.org"}), aliases)
    d.check(None)
    assert d.resolve(Mailbox("l0", ORG)) == (L("alice"), R("ext@partner.example"))
