"""Greylisting: the triplet, the RCPT check's decisions on an injected clock (first 451, a
retry too soon 451, after the delay 250, remembered, auto-allow after N passes and not one
before, expiry), the SQLite memory surviving a restart, and who is never greylisted."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from mailsrv import replies
from mailsrv.checks.dnsbl import Listing
from mailsrv.checks.greylist import Greylisting, client_network, triplet, wants_sender_spf
from mailsrv.checks.pipeline import ACCEPT, Client, Facts, Stage, TempFail
from mailsrv.routing.address import parse_mail_from, parse_rcpt_to
from mailsrv.routing.router import Directory
from mailsrv.storage import greylist as store_module
from mailsrv.storage.greylist import Greylist

DELAY, EXPIRE = 300.0, 35 * 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def run_now(f, *args):
    return defer.maybeDeferred(f, *args)


@contextmanager
def capture_failures(into: list):
    """The text of every failure logged meanwhile."""

    def observer(event: dict) -> None:
        if "log_failure" in event:
            into.append(event.get("log_format", "").format(**event))

    globalLogPublisher.addObserver(observer)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(observer)


def greylist(tmp_path: Path, clock: Clock) -> Greylist:
    return Greylist(tmp_path / "greylist.sqlite3", EXPIRE, clock, run_now)


def facts(sender="someone@sender.test", rcpt="alice@example.org", ip="192.0.2.7", **client):
    return Facts(Stage.RCPT, Client(ip=ip, name=f"unknown[{ip}]", **client),
                 Directory(["example.org"], None, {}),
                 sender=parse_mail_from(f"FROM:<{sender}>".encode())[0],
                 recipient=parse_rcpt_to(f"TO:<{rcpt}>".encode())[0])


def test_the_triplet() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::4") == "2001:db8:1:2::/64"
    assert triplet("192.0.2.7", None, "Alice@Example.org") == (
        "192.0.2.0/24", "", "alice@example.org")


def test_first_too_soon_then_after_the_delay(tmp_path: Path) -> None:
    clock = Clock()
    store = greylist(tmp_path, clock)
    check = Greylisting(lambda: store, DELAY, auto_allow=5)
    first = check.check(facts())
    assert first == TempFail(replies.GREYLISTED.format(seconds="300"), reason="greylisted for 300 s")
    assert (first.reply.code, first.reply.status) == (451, "4.7.1")
    clock.now += DELAY - 1  # one second too soon
    assert check.check(facts()).reply.text.endswith("try again in 1 seconds")
    clock.now += 1
    assert check.check(facts()) is ACCEPT
    clock.now += 3600
    assert check.check(facts()) is ACCEPT  # remembered
    # Another address of the same /24 is the same client; another sender is a new triplet.
    assert check.check(facts(ip="192.0.2.200")) is ACCEPT
    assert isinstance(check.check(facts(sender="other@sender.test")), TempFail)


def test_a_client_that_passed_auto_allow_times_skips_greylisting(tmp_path: Path) -> None:
    clock = Clock()
    store = greylist(tmp_path, clock)
    check = Greylisting(lambda: store, DELAY, auto_allow=3)
    for n in range(3):
        assert isinstance(check.check(facts(sender=f"s{n}@sender.test")), TempFail)
    clock.now += DELAY
    for n in range(2):
        assert check.check(facts(sender=f"s{n}@sender.test")) is ACCEPT
    # Two passes, one short of auto_allow: a new sender from that client is still greylisted.
    assert isinstance(check.check(facts(sender="new@sender.test")), TempFail)
    assert check.check(facts(sender="s2@sender.test")) is ACCEPT  # the third pass
    assert check.check(facts(sender="never-seen@sender.test")) is ACCEPT  # allowed now
    assert isinstance(check.check(facts(sender="x@sender.test", ip="198.51.100.1")), TempFail)


def test_forgotten_after_expire(tmp_path: Path) -> None:
    clock = Clock()
    store = greylist(tmp_path, clock)
    check = Greylisting(lambda: store, DELAY, auto_allow=0)
    check.check(facts())
    clock.now += DELAY
    assert check.check(facts()) is ACCEPT
    clock.now += EXPIRE  # exactly expire after its last pass: still known
    assert check.check(facts()) is ACCEPT
    clock.now += EXPIRE + 1
    assert isinstance(check.check(facts()), TempFail)


def test_the_memory_survives_a_restart_and_is_private(tmp_path: Path) -> None:
    clock = Clock()
    store = greylist(tmp_path, clock)
    check = Greylisting(lambda: store, DELAY, auto_allow=5)
    check.check(facts())
    check.check(facts(sender="waiting@sender.test"))
    clock.now += DELAY
    assert check.check(facts()) is ACCEPT
    store.close()
    assert (tmp_path / "greylist.sqlite3").stat().st_mode & 0o077 == 0
    again = greylist(tmp_path, clock)
    check = Greylisting(lambda: again, DELAY, auto_allow=5)
    assert len(again) == 2
    assert check.check(facts()) is ACCEPT  # passed before the restart
    assert check.check(facts(sender="waiting@sender.test")) is ACCEPT  # its delay ran meanwhile
    assert again.client_passes("192.0.2.0/24") == 3  # one pass before, two after


def test_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MAX_TRIPLETS", 3)
    clock = Clock()
    store = greylist(tmp_path, clock)
    check = Greylisting(lambda: store, DELAY, auto_allow=0)
    for n in range(4):  # one past the bound: the oldest goes, in memory and on disk
        check.check(facts(sender=f"s{n}@sender.test"))
        clock.now += 1
    assert len(store) == 3
    store.close()
    assert len(greylist(tmp_path, clock)) == 3



class LaterThread:
    """A writer thread that runs its jobs only when told (``run``): writes queued meanwhile."""

    def __init__(self) -> None:
        self.jobs: list = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((d, f, args))
        return d

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for d, f, args in jobs:
            defer.maybeDeferred(f, *args).chainDeferred(d)


def on_disk(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT sender, passes FROM triplets ORDER BY sender").fetchall()
    finally:
        db.close()


def test_writes_queued_while_the_writer_is_busy_are_one_commit(tmp_path: Path) -> None:
    clock, writer = Clock(), LaterThread()
    store = Greylist(tmp_path / "greylist.sqlite3", EXPIRE, clock, writer)
    check = Greylisting(lambda: store, DELAY, auto_allow=0)
    for n in range(3):
        check.check(facts(sender=f"s{n}@sender.test"))
    clock.now += DELAY
    assert check.check(facts(sender="s0@sender.test")) is ACCEPT
    assert len(writer.jobs) == 1  # four writes (three new triplets, one pass), one job
    assert on_disk(tmp_path / "greylist.sqlite3") == []
    writer.run()
    assert on_disk(tmp_path / "greylist.sqlite3") == [
        ("s0@sender.test", 1), ("s1@sender.test", 0), ("s2@sender.test", 0)]
    check.check(facts(sender="s3@sender.test"))  # the writer is idle again: a job of its own
    assert len(writer.jobs) == 1
    writer.run()
    assert len(on_disk(tmp_path / "greylist.sqlite3")) == 4


def test_a_failed_batch_is_logged_and_rolled_back(tmp_path: Path) -> None:
    clock, writer = Clock(), LaterThread()
    store = Greylist(tmp_path / "greylist.sqlite3", EXPIRE, clock, writer)
    check = Greylisting(lambda: store, DELAY, auto_allow=0)
    check.check(facts(sender="kept@sender.test"))
    writer.run()
    check.check(facts(sender="lost@sender.test"))
    store._batch.append(("INSERT INTO nowhere VALUES (?)", (1,)))  # a write that fails
    logged: list = []
    with capture_failures(logged):
        writer.run()
    assert len(logged) == 1 and "greylist: writing" in logged[0]
    assert on_disk(tmp_path / "greylist.sqlite3") == [("kept@sender.test", 0)]
    check.check(facts(sender="next@sender.test"))  # the store goes on
    writer.run()
    assert [s for s, _ in on_disk(tmp_path / "greylist.sqlite3")] == [
        "kept@sender.test", "next@sender.test"]


def test_the_write_ahead_log_is_private_too(tmp_path: Path) -> None:
    store = greylist(tmp_path, Clock())
    Greylisting(lambda: store, DELAY, auto_allow=0).check(facts())
    assert store._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for name in ("greylist.sqlite3-wal", "greylist.sqlite3-shm"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name
    store.close()


@pytest.mark.parametrize("client", [
    {"trusted_network": True},
    {"authenticated_as": "alice@example.org"},
    {"blocklist": Listing(allowed_by="list.dnswl.test")},
])
def test_who_is_never_greylisted(tmp_path: Path, client: dict) -> None:
    store = greylist(tmp_path, Clock())
    assert Greylisting(lambda: store, DELAY, 5).check(facts(**client)) is ACCEPT
    assert len(store) == 0


PROVIDERS = ("bigmail.test", "other.test")


@pytest.mark.parametrize("sender, spf, greylisted", [
    ("someone@bigmail.test", "pass", False),
    ("someone@eu.bigmail.test", "pass", False),  # below a listed domain
    ("someone@bigmail.test", "fail", True), ("someone@bigmail.test", "softfail", True),
    ("someone@bigmail.test", "neutral", True), ("someone@bigmail.test", "temperror", True),
    ("someone@bigmail.test", None, True),  # not checked before RCPT
    ("someone@notbigmail.test", "pass", True),  # a name that only ends like one
    ("someone@sender.test", "pass", True),  # SPF passes, but not a listed provider
])
def test_a_big_providers_sender_skips_only_when_its_spf_passes(
        tmp_path: Path, sender: str, spf: str | None, greylisted: bool) -> None:
    store = greylist(tmp_path, Clock())
    check = Greylisting(lambda: store, DELAY, 5, PROVIDERS)
    verdict = check.check(replace(facts(sender=sender), sender_spf=spf))
    assert isinstance(verdict, TempFail) is greylisted
    assert len(store) == (1 if greylisted else 0)


def test_spf_is_wanted_before_rcpt_only_where_it_could_let_a_sender_through() -> None:
    stranger = Client(ip="192.0.2.7", name="unknown[192.0.2.7]")
    assert wants_sender_spf(stranger, "a@bigmail.test", PROVIDERS)
    assert not wants_sender_spf(stranger, "a@sender.test", PROVIDERS)
    assert not wants_sender_spf(stranger, None, PROVIDERS)  # <>
    assert not wants_sender_spf(stranger, "a@bigmail.test", ())
    for exempt in ({"trusted_network": True}, {"authenticated_as": "alice@example.org"},
                   {"blocklist": Listing(allowed_by="list.dnswl.test")}):
        assert not wants_sender_spf(replace(stranger, **exempt), "a@bigmail.test", PROVIDERS)
