"""The pure parts of AUTH: SASL parsing, password fields and hashes, the failure tracker,
sender ownership and users-file edits."""

from __future__ import annotations

import base64
import os

import pytest

from mailsrv.accounts import userfile
from mailsrv.accounts.auth import (
    FailureTracker,
    PasswordError,
    check_password_field,
    hash_password,
    verify_password,
)
from mailsrv.checks.policy import owns_address
from mailsrv.inbound import sasl
from mailsrv.routing.address import Mailbox
from mailsrv.routing.router import Directory

# --------------------------------------------------------------------------- SASL


def test_decode_response() -> None:
    assert sasl.decode_response(base64.b64encode(b"\0u\0p")) == b"\0u\0p"
    assert sasl.decode_response(b"=") == b""
    with pytest.raises(sasl.SASLCancelled):
        sasl.decode_response(b"*")
    for bad in (b"abc", b"a b=", b"!!!!", b"AAA=A"):
        with pytest.raises(sasl.SASLError):
            sasl.decode_response(bad)


def test_parse_plain() -> None:
    assert sasl.parse_plain(b"\0alice@example.org\0pw") == ("", "alice@example.org", "pw")
    assert sasl.parse_plain("a\0b\0p\u00e4ss".encode()) == ("a", "b", "p\u00e4ss")
    for bad in (b"alice\0pw", b"\0\0pw", b"\0alice\0", b"\0a\0b\0c", b"\0a\0\xff"):
        with pytest.raises(sasl.SASLError):
            sasl.parse_plain(bad)


def test_exchange_plain_and_login() -> None:
    plain = sasl.Exchange("PLAIN")
    assert plain.first_challenge() == ""
    assert plain.step(b"\0Alice@example.org\0pw") is None
    assert (plain.username, plain.password) == ("Alice@example.org", "pw")
    same = sasl.Exchange("PLAIN")
    assert same.step(b"alice@example.org\0Alice@Example.org\0pw") is None  # authzid = authcid
    with pytest.raises(sasl.SASLError):
        sasl.Exchange("PLAIN").step(b"bob@example.org\0alice@example.org\0pw")
    login = sasl.Exchange("LOGIN")
    assert base64.b64decode(login.first_challenge()) == b"Username:"
    assert base64.b64decode(login.step(b"alice@example.org")) == b"Password:"
    assert login.step(b"secret") is None
    assert (login.username, login.password) == ("alice@example.org", "secret")
    with pytest.raises(sasl.SASLError):
        sasl.Exchange("LOGIN").step(b"")


# --------------------------------------------------------------------------- passwords


def test_hash_and_verify() -> None:
    hashed = hash_password("correct horse", cost=4)
    assert hashed.startswith("{BLF-CRYPT}$2y$04$") and len(hashed) == len("{BLF-CRYPT}") + 60
    value = check_password_field(hashed)
    assert verify_password("correct horse", value)
    assert not verify_password("correct horsE", value)
    assert not verify_password("correct horse", None)  # no such user / no password
    assert not verify_password("a\0b", value)


def test_bcrypt_72_byte_limit() -> None:
    with pytest.raises(PasswordError, match="longer than 72 bytes"):
        hash_password("x" * 73, cost=4)
    value = check_password_field(hash_password("x" * 72, cost=4))
    assert verify_password("x" * 72, value)
    # As crypt(3) and so Dovecot do, bytes after the 72nd are not part of the password.
    assert verify_password("x" * 72 + "tail", value)
    with pytest.raises(PasswordError):
        hash_password("", cost=4)
    with pytest.raises(PasswordError):
        hash_password("two\nlines", cost=4)


@pytest.mark.parametrize("field, why", [
    ("{PLAIN}secret", "scheme"),
    ("{SHA512-CRYPT}$6$abc$def", "scheme"),
    ("{CRAM-MD5}abc", "scheme"),
    ("secret", "starts with its scheme"),
    ("{BLF-CRYPT}$2y$12$short", "bcrypt hash"),
    ("{BLF-CRYPT}$1$" + "a" * 57, "bcrypt hash"),
])
def test_unusable_password_fields(field: str, why: str) -> None:
    with pytest.raises(PasswordError, match=why.replace("$", r"\$")):
        check_password_field(field)


def test_password_field_accepts_dovecot_forms() -> None:
    bcrypt_hash = "$2y$05$" + "a" * 53
    assert check_password_field("") is None
    assert check_password_field("{BLF-CRYPT}" + bcrypt_hash) == bcrypt_hash
    assert check_password_field("{blf-crypt}" + bcrypt_hash) == bcrypt_hash


# --------------------------------------------------------------------------- failures


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lockout_after_max_failures_within_the_window() -> None:
    clock = Clock()
    tracker = FailureTracker(3, window=60, lockout=300, failure_delay=1, clock=clock)
    assert [tracker.failed("192.0.2.1") for _ in range(2)] == [1, 2]
    assert not tracker.locked("192.0.2.1")
    clock.now += 61  # the first two fell out of the window
    assert tracker.failed("192.0.2.1") == 1
    assert tracker.failed("192.0.2.1") == 2
    assert tracker.failed("192.0.2.1") == 3
    assert tracker.locked("192.0.2.1")
    assert not tracker.locked("192.0.2.2")
    clock.now += 299
    assert tracker.locked("192.0.2.1")
    clock.now += 1
    assert not tracker.locked("192.0.2.1")
    assert tracker.failed("192.0.2.1") == 1  # a fresh start after the lockout


def test_success_forgets_failures_and_delays_grow() -> None:
    tracker = FailureTracker(5, 60, 60, failure_delay=0.5, clock=Clock())
    tracker.failed("a")
    tracker.failed("a")
    tracker.succeeded("a")
    assert tracker.failed("a") == 1
    assert [tracker.delay(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]


def test_checks_under_way_count_as_failures() -> None:
    """Ten parallel logins from one address get no more than max_failures checks."""
    clock = Clock()
    tracker = FailureTracker(5, window=60, lockout=300, failure_delay=1, clock=clock)
    started = [tracker.begin("192.0.2.1") for _ in range(10)]
    assert started == [True] * 5 + [False] * 5
    assert tracker.begin("192.0.2.2")  # another address is not affected
    assert [tracker.failed("192.0.2.1") for _ in range(5)] == [1, 2, 3, 4, 5]
    assert tracker.locked("192.0.2.1") and not tracker.begin("192.0.2.1")
    clock.now += 300
    assert tracker.begin("192.0.2.1")  # the lockout is over


def test_a_check_that_ends_frees_its_reservation() -> None:
    clock = Clock()
    tracker = FailureTracker(3, window=60, lockout=300, failure_delay=1, clock=clock)
    assert tracker.begin("a") and tracker.begin("a") and tracker.begin("a")
    assert not tracker.begin("a")
    tracker.succeeded("a")  # ends its own check, not the two others under way
    assert tracker.begin("a") and not tracker.begin("a")
    tracker.abandoned("a")  # could not be checked: no failure counted
    assert tracker.begin("a") and not tracker.begin("a")
    assert tracker.failed("a") == 1
    assert tracker.failed("a") == 2
    tracker.abandoned("a")
    assert not tracker.locked("a")
    assert tracker.begin("a")  # 2 failures + 1 under way: full
    assert not tracker.begin("a")
    clock.now += 61  # the two failures fell out of the window; one check is still under way
    assert tracker.begin("a") and tracker.begin("a") and not tracker.begin("a")
    assert tracker._checking == {"a": 3}
    for _ in range(3):
        tracker.abandoned("a")
    assert tracker._checking == {}  # nothing kept for an address with no check under way


def test_tracker_memory_is_bounded() -> None:
    tracker = FailureTracker(1, 60, 60, 0, clock=Clock(), max_addresses=100)
    for n in range(1000):
        tracker.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(tracker._failures) == 100
    assert len(tracker._locked_until) <= 100
    assert tracker.locked("10.0.3.231")  # the newest are kept


# --------------------------------------------------------------------------- ownership


@pytest.fixture
def directory() -> Directory:
    return Directory(
        ["example.org", "example.net"],
        frozenset({"alice@example.org", "bob@example.org", "bob@example.net"}),
        {
            "postmaster": ("alice@example.org",),
            "sales@example.org": ("alice@example.org", "bob@example.org"),
            "outside@example.org": ("alice@example.org", "x@remote.test"),
            "team@example.org": ("sales@example.org",),
        },
    )


@pytest.mark.parametrize("local, domain, owned", [
    ("alice", "example.org", True),
    ("ALICE", "example.org", True),
    ("alice+lists", "example.org", True),
    ("sales", "example.org", True),
    ("team", "example.org", True),  # through a nested alias
    ("outside", "example.org", True),
    ("postmaster", "example.org", True),
    ("postmaster", "example.net", True),
    ("bob", "example.org", False),
    ("alice", "example.net", False),
    ("alice", "remote.test", False),
    ("nobody", "example.org", False),
    ("alice%remote.test", "example.org", False),
])
def test_owns_address(directory: Directory, local: str, domain: str, owned: bool) -> None:
    assert owns_address("alice@example.org", Mailbox(local, domain), directory) is owned


def test_null_sender_and_source_routes_are_owned_by_nobody(directory: Directory) -> None:
    assert not owns_address("alice@example.org", None, directory)
    routed = Mailbox("alice", "example.org", source_route=True)
    assert not owns_address("alice@example.org", routed, directory)


# --------------------------------------------------------------------------- users file


USERS = "# users\nalice@example.org:{BLF-CRYPT}old:1000:1000::/home/alice\n\nbob@example.org\n"


def test_set_password_keeps_everything_else() -> None:
    changed = userfile.set_password(USERS, "alice@example.org", "{BLF-CRYPT}new", create=False)
    assert changed == ("# users\nalice@example.org:{BLF-CRYPT}new:1000:1000::/home/alice\n\n"
                       "bob@example.org\n")
    changed = userfile.set_password(USERS, "bob@example.org", "{BLF-CRYPT}b", create=False)
    assert "\nbob@example.org:{BLF-CRYPT}b\n" in changed
    added = userfile.set_password(USERS, "carol@example.org", "{BLF-CRYPT}c", create=True)
    assert added == USERS + "carol@example.org:{BLF-CRYPT}c\n"
    with pytest.raises(userfile.UserFileError, match="exists already"):
        userfile.set_password(USERS, "bob@example.org", "h", create=True)
    with pytest.raises(userfile.UserFileError, match="no user"):
        userfile.set_password(USERS, "carol@example.org", "h", create=False)


def test_remove_and_list_users() -> None:
    assert userfile.remove_user(USERS, "bob@example.org") == (
        "# users\nalice@example.org:{BLF-CRYPT}old:1000:1000::/home/alice\n\n")
    with pytest.raises(userfile.UserFileError):
        userfile.remove_user(USERS, "carol@example.org")
    assert userfile.list_users(USERS) == [("alice@example.org", True), ("bob@example.org", False)]


def test_replace_file_is_atomic_and_checked(tmp_path) -> None:
    path = tmp_path / "users"
    path.write_text(USERS)
    path.chmod(0o640)
    userfile.replace_file(path, "new\n")
    assert path.read_text() == "new\n"
    assert path.stat().st_mode & 0o777 == 0o640

    def refuse(candidate):
        assert candidate.read_text() == "rejected\n"
        raise ValueError("no")

    with pytest.raises(ValueError):
        userfile.replace_file(path, "rejected\n", refuse)
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]  # no temporary file left


def test_replace_file_keeps_hashes_from_others(tmp_path) -> None:
    """0640 at most (a stricter mode stays); the server's group when the file is new or was
    readable by everyone, so that taking "others" away does not lock the server out."""
    path = tmp_path / "users"
    userfile.replace_file(path, "new\n", server_group=os.getgid())
    assert path.stat().st_mode & 0o7777 == 0o640
    for before, after in ((0o644, 0o640), (0o666, 0o640), (0o604, 0o600), (0o600, 0o600),
                          (0o660, 0o640), (0o4755, 0o640)):
        path.chmod(before)
        userfile.replace_file(path, "x\n")
        assert path.stat().st_mode & 0o7777 == after, oct(before)
    if os.geteuid() != 0:
        pytest.skip("changing a file's group to any group needs root")
    server, admin = 4242, 4343
    path.unlink()
    userfile.replace_file(path, "new\n", server_group=server)
    assert (path.stat().st_gid, path.stat().st_mode & 0o777) == (server, 0o640)
    os.chown(path, 0, admin)
    path.chmod(0o640)  # the administrator's choice of group: kept
    userfile.replace_file(path, "y\n", server_group=server)
    assert (path.stat().st_uid, path.stat().st_gid) == (0, admin)
    path.chmod(0o644)  # the server may read it as "others": it gets the server's group
    userfile.replace_file(path, "z\n", server_group=server)
    assert (path.stat().st_uid, path.stat().st_gid) == (0, server)
    assert path.stat().st_mode & 0o777 == 0o640
    os.chown(path, 1234, admin)
    path.chmod(0o644)
    userfile.replace_file(path, "w\n")  # no server group known: the owner and group stay
    assert (path.stat().st_uid, path.stat().st_gid, path.stat().st_mode & 0o777) == (
        1234, admin, 0o640)
