"""Tests for mailsrv.storage.tmpclean: tmp/ files left by a crash are removed after 36 hours."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher

from mailsrv.storage import tmpclean
from mailsrv.storage.tmpclean import INTERVAL, MAX_AGE, TmpCleaner, clean_tmp

NOW = 1_800_000_000.0


def plant(path: Path, age: float, data: bytes = b"partial message") -> Path:
    """A file at *path* last modified *age* seconds before NOW."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (NOW - age, NOW - age))
    return path


def maildir(root: Path, domain: str, user: str) -> Path:
    for sub in ("tmp", "new", "cur"):
        (root / domain / user / sub).mkdir(parents=True, exist_ok=True)
    return root / domain / user


def test_only_regular_files_in_tmp_older_than_36_hours_go(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    alice = maildir(root, "example.org", "alice")
    carol = maildir(root, "example.net", "carol")
    old = plant(alice / "tmp" / "old", MAX_AGE + 60)
    young = plant(alice / "tmp" / "young", MAX_AGE - 60)
    old_carol = plant(carol / "tmp" / "old", 10 * 86400)
    kept = [
        young,
        plant(alice / "new" / "delivered", MAX_AGE * 10),  # mail, not litter
        plant(alice / "cur" / "read", MAX_AGE * 10),
        plant(alice / "old-file-beside-the-maildir", MAX_AGE * 10),
    ]
    (alice / "tmp" / "a-directory").mkdir()
    os.utime(alice / "tmp" / "a-directory", (0, 0))
    (alice / "tmp" / "a-link").symlink_to(alice / "new" / "delivered")
    maildir(root, "example.org", "bob")  # an empty tmp/
    (root / "example.org" / "dave").mkdir()  # no tmp/ at all: not a Maildir yet

    cleaned = clean_tmp(root, NOW)

    assert sorted(cleaned.removed) == sorted(
        [(str(old), MAX_AGE + 60), (str(old_carol), 10 * 86400)]
    )
    assert cleaned.errors == []
    assert cleaned.maildirs == 3
    assert not old.exists() and not old_carol.exists()
    assert all(path.exists() for path in kept)
    assert (alice / "tmp" / "a-directory").is_dir() and (alice / "tmp" / "a-link").is_symlink()


def test_the_limit_is_the_given_age(tmp_path: Path) -> None:
    alice = maildir(tmp_path, "example.org", "alice")
    plant(alice / "tmp" / "two-hours", 7200)
    assert clean_tmp(tmp_path, NOW, max_age=7300).removed == []
    assert [p for p, _ in clean_tmp(tmp_path, NOW, max_age=7100).removed] == [
        str(alice / "tmp" / "two-hours")
    ]


@pytest.mark.parametrize("link", ["example.org", "example.org/bob", "example.org/bob/tmp"])
def test_links_in_the_store_are_not_followed(tmp_path: Path, link: str) -> None:
    root = tmp_path / "mail"
    elsewhere = tmp_path / "elsewhere"
    victim = plant(elsewhere / "bob" / "tmp" / "precious", MAX_AGE * 10)
    plant(elsewhere / "precious", MAX_AGE * 10)
    plant(elsewhere / "tmp" / "precious", MAX_AGE * 10)
    (root / link).parent.mkdir(parents=True)
    target = {"example.org": elsewhere, "example.org/bob": elsewhere / "bob",
              "example.org/bob/tmp": elsewhere / "bob" / "tmp"}[link]
    (root / link).symlink_to(target)
    cleaned = clean_tmp(root, NOW)
    assert cleaned.removed == [] and victim.exists()
    assert len(list(elsewhere.rglob("precious"))) == 3
    if link == "example.org/bob/tmp":  # a Maildir whose tmp/ is a link: said so
        assert cleaned.errors == [
            f"cannot open directory {root / link}: a symbolic link, not followed"
        ]


def test_a_symlinked_root_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "srv" / "mail"
    old = plant(real / "example.org" / "alice" / "tmp" / "old", MAX_AGE + 1)
    (tmp_path / "mail").symlink_to(real)
    assert [p for p, _ in clean_tmp(tmp_path / "mail", NOW).removed] == [
        str(tmp_path / "mail" / "example.org" / "alice" / "tmp" / "old")
    ]
    assert not old.exists()


def test_a_missing_root_is_an_error_not_an_exception(tmp_path: Path) -> None:
    cleaned = clean_tmp(tmp_path / "nope", NOW)
    assert cleaned.errors == [
        f"cannot open directory {tmp_path / 'nope'}: No such file or directory"
    ]


def test_a_file_that_cannot_be_removed_is_reported_and_the_walk_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = plant(tmp_path / "a.org" / "alice" / "tmp" / "stuck", MAX_AGE + 1)
    gone = plant(tmp_path / "b.org" / "bob" / "tmp" / "gone", MAX_AGE + 1)
    real_unlink = os.unlink

    def unlink(name: str, *, dir_fd: int | None = None) -> None:
        if name == "stuck":
            raise OSError(errno.EPERM, "Operation not permitted")
        real_unlink(name, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    cleaned = clean_tmp(tmp_path, NOW)
    assert cleaned.errors == [f"cannot remove {stuck}: Operation not permitted"]
    assert [p for p, _ in cleaned.removed] == [str(gone)]
    assert stuck.exists() and not gone.exists()


def test_stop_ends_the_walk_between_maildirs(tmp_path: Path) -> None:
    for user in ("a", "b", "c"):
        plant(tmp_path / "example.org" / user / "tmp" / "old", MAX_AGE + 1)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 1

    cleaned = clean_tmp(tmp_path, NOW, stop=stop)
    assert len(cleaned.removed) == 1
    assert len(list(tmp_path.rglob("old"))) == 2


# --- the service ----------------------------------------------------------------------


@pytest.fixture
def logged():
    events: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "mailsrv":
            events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_the_service_cleans_at_start_and_every_8_hours(tmp_path: Path, logged) -> None:
    clock = task.Clock()
    clock.advance(time.time())  # mtimes are wall-clock times
    alice = maildir(tmp_path, "example.org", "alice")
    ran: list[object] = []

    def in_thread(f, *args):
        ran.append(f)
        return defer.maybeDeferred(f, *args)

    first = alice / "tmp" / "first"
    first.write_bytes(b"x")
    os.utime(first, (clock.seconds() - MAX_AGE - 5,) * 2)
    cleaner = TmpCleaner(tmp_path, clock, in_thread=in_thread)
    cleaner.startService()
    assert ran == [tmpclean.clean_tmp]  # at start-up, in the thread runner
    assert not first.exists()
    assert logged[0].startswith(f"tmp cleanup: removed {first}, unchanged for 36.0 hours")
    assert logged[1] == (
        f"tmp cleanup: removed 1 file(s) older than 36 hours from 1 maildir(s) in {tmp_path} "
        "(0 not logged), 0 error(s)"
    )

    later = alice / "tmp" / "later"
    later.write_bytes(b"x")
    os.utime(later, (clock.seconds(),) * 2)  # young now, old after 40 hours
    clock.advance(INTERVAL)
    assert len(ran) == 2 and later.exists()
    for _ in range(4):
        clock.advance(INTERVAL)
    assert len(ran) == 6 and not later.exists()
    assert len(logged) == 4  # nothing logged by the runs that found nothing
    d = cleaner.stopService()
    assert d is None or d.called
    clock.advance(INTERVAL)
    assert len(ran) == 6


def test_the_service_survives_a_failing_run(tmp_path: Path, logged) -> None:
    clock = task.Clock()
    calls: list[int] = []

    def in_thread(f, *args):
        calls.append(1)
        if len(calls) == 1:
            return defer.fail(RuntimeError("boom"))
        return defer.maybeDeferred(f, *args)

    cleaner = TmpCleaner(tmp_path, clock, in_thread=in_thread)
    cleaner.startService()
    assert logged == ["tmp cleanup failed"]
    clock.advance(INTERVAL)
    assert len(calls) == 2  # the timer goes on
    cleaner.stopService()


def test_stopping_the_service_stops_a_walk_under_way(tmp_path: Path) -> None:
    clock = task.Clock()
    pending: list[tuple[defer.Deferred, tuple]] = []

    def in_thread(f, *args):
        d: defer.Deferred = defer.Deferred()
        pending.append((d, args))
        return d

    cleaner = TmpCleaner(tmp_path, clock, in_thread=in_thread)
    cleaner.startService()
    [(d, (root, now, max_age, stop))] = pending
    assert not stop()
    stopped = cleaner.stopService()
    assert stop()  # the walk in the thread sees it and ends
    assert not stopped.called  # shutdown waits for the walk to end
    d.callback(tmpclean.Cleaned())
    assert stopped.called
