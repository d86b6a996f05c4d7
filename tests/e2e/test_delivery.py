"""Where copies land: aliases, duplicates, loops, and what happens when the disk refuses."""

import os
import shutil
import smtplib
import subprocess
import time

import pytest

from support.harness import wait_for
from support.mail import connect, send_mail


def token_count(server, address, token):
    return sum(token in m.as_string() for m in server.messages(address))


def test_one_copy_per_mailbox_however_it_is_named(mail_server):
    body = b"Subject: dedupe\r\n\r\ntoken-dedupe-1\r\n"
    send_mail(mail_server.port, "a@c.test", ["alice@example.org", "ALICE@example.org", "alice+x@example.org",
                       "sales@example.org", "team@example.org", "postmaster@example.net"], body)
    for address in ("alice@example.org", "bob@example.org", "carol@example.net"):
        assert token_count(mail_server, address, "token-dedupe-1") == 1, address


def copy_of(server, address, token):
    """The path of the one file in *address*'s new/ holding *token*."""
    new = server.mailbox_path(address) / "new"
    [path] = [path for path in new.iterdir() if token in path.read_bytes()]
    return path


def test_several_mailboxes_share_one_copy_naming_none(mail_server):
    # team@ -> sales@ (alice, bob) and carol; postmaster@example.net -> alice (already there).
    send_mail(mail_server.port, "a@c.test", ["team@example.org", "postmaster@example.net"],
         b"Subject: dt\r\nDelivered-To: someone@elsewhere.test\r\n\r\ntoken-dt\r\n")
    copies = [copy_of(mail_server, address, b"token-dt")
              for address in ("alice@example.org", "bob@example.org", "carol@example.net")]
    # One file written once and hard-linked into each new/ (as Dovecot's LMTP does for a
    # transaction of several recipients): no Delivered-To: of ours, which would have to
    # name one mailbox to all (a Bcc'd one too) or make a file per mailbox.
    assert len({(p.stat().st_dev, p.stat().st_ino) for p in copies}) == 1
    assert copies[0].stat().st_nlink == 3
    data = copies[0].read_bytes()
    assert data.startswith(b"Return-Path: <a@c.test>\nReceived: "), data[:200]
    assert data.count(b"Delivered-To: ") == 1  # the one the message brought, below ours
    assert b"\nDelivered-To: someone@elsewhere.test\n" in data


def test_delivered_to_is_the_final_mailbox_for_one_recipient(mail_server):
    send_mail(mail_server.port, "a@c.test", ["Alice+tag@Example.org"],
              b"Subject: one\r\n\r\ntoken-dt-one\r\n")
    data = copy_of(mail_server, "alice@example.org", b"token-dt-one").read_bytes()
    assert data.split(b"\n")[1] == b"Delivered-To: alice@example.org"


def test_same_message_id_in_every_copy(mail_server):
    send_mail(mail_server.port, "a@c.test", ["alice@example.org", "carol@example.net"],
              b"Subject: mid\r\n\r\ntoken-mid\r\n")
    ids = {m["Message-ID"] for a in ("alice@example.org", "carol@example.net")
           for m in mail_server.messages(a) if "token-mid" in m.as_string()}
    assert len(ids) == 1 and None not in ids


def test_received_for_clause_only_with_one_recipient(mail_server):
    send_mail(mail_server.port, "a@c.test", ["alice@example.org", "bob@example.org"],
              b"Subject: two\r\n\r\ntoken-two\r\n")
    [msg] = [m for m in mail_server.messages("bob@example.org") if "token-two" in m.as_string()]
    assert " for <" not in msg["Received"]


@pytest.mark.parametrize("hops, code", [(50, 250), (51, 554)])
def test_mail_loop_is_refused_past_50_hops(mail_server, hops, code):
    received = b"".join(b"Received: from hop%d.test by hop%d.test; Sun, 22 Nov 2026 10:00:00 +0000\r\n"
                        % (n, n + 1) for n in range(hops))
    body = received + b"Subject: hops %d\r\n\r\ntoken-hops-%d\r\n" % (hops, hops)
    if code == 250:
        send_mail(mail_server.port, "a@c.test", ["carol@example.net"], body)
        assert token_count(mail_server, "carol@example.net", f"token-hops-{hops}") == 1
    else:
        with pytest.raises(smtplib.SMTPDataError) as e:
            send_mail(mail_server.port, "a@c.test", ["carol@example.net"], body)
        assert e.value.smtp_code == 554 and e.value.smtp_error.startswith(b"5.4.6")
        assert token_count(mail_server, "carol@example.net", f"token-hops-{hops}") == 0


def test_unwritable_maildir_gives_451_and_leaves_no_copy_anywhere(make_server):
    server = make_server().start()
    # bob's Maildir path is taken by a regular file: no directory can be made there, even as root.
    (server.root / "example.org").mkdir(parents=True, exist_ok=True)
    (server.root / "example.org" / "bob").write_text("not a directory")
    with pytest.raises(smtplib.SMTPDataError) as e:
        send_mail(server.port, "a@c.test", ["alice@example.org", "bob@example.org"],
                  b"Subject: x\r\n\r\ntoken-fail\r\n")
    assert e.value.smtp_code == 451 and e.value.smtp_error.startswith(b"4.3.0")
    assert token_count(server, "alice@example.org", "token-fail") == 0
    alice = server.root / "example.org" / "alice"
    assert not alice.exists() or (os.listdir(alice / "new") == [] and os.listdir(alice / "tmp") == [])
    assert os.listdir(server.queue / "incoming") == []
    # Once the administrator fixes it, the retry succeeds.
    (server.root / "example.org" / "bob").unlink()
    send_mail(server.port, "a@c.test", ["alice@example.org", "bob@example.org"],
              b"Subject: x\r\n\r\ntoken-fail\r\n")
    assert token_count(server, "bob@example.org", "token-fail") == 1


@pytest.fixture
def small_filesystem(tmp_path):
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_full_disk_gives_452_and_leaves_no_partial_file(make_server, small_filesystem):
    server = make_server(overrides={"mailboxes": {"root": str(small_filesystem / "mail")}}).start()
    send_mail(server.port, "a@c.test", ["alice@example.org"], b"Subject: fits\r\n\r\nsmall\r\n")
    big = b"Subject: too big for the disk\r\n\r\n" + (b"z" * 76 + b"\r\n") * 20000  # ~1.5 MB
    with pytest.raises(smtplib.SMTPDataError) as e:
        send_mail(server.port, "a@c.test", ["alice@example.org", "bob@example.org"], big)
    assert e.value.smtp_code == 452 and e.value.smtp_error.startswith(b"4.3.1")
    for user in ("alice", "bob"):
        box = small_filesystem / "mail" / "example.org" / user
        if box.exists():
            for name in os.listdir(box / "new"):
                assert b"too big" not in (box / "new" / name).read_bytes()
            assert os.listdir(box / "tmp") == []
    server.root = small_filesystem / "mail"
    assert [m["Subject"] for m in server.messages("alice@example.org")] == ["fits"]
    # The server keeps working once there is room again.
    send_mail(server.port, "a@c.test", ["bob@example.org"], b"Subject: after\r\n\r\nsmall again\r\n")
    assert [m["Subject"] for m in server.messages("bob@example.org")] == ["after"]


def test_full_spool_during_data_gives_452_and_keeps_the_session(make_server, small_filesystem):
    server = make_server(overrides={"queue": {"path": str(small_filesystem / "queue")}}).start()
    big = b"Subject: spool full\r\n\r\n" + (b"q" * 76 + b"\r\n") * 20000  # ~1.5 MB > 1 MB tmpfs
    with connect(server.port) as client:
        with pytest.raises(smtplib.SMTPDataError) as e:
            client.sendmail("a@c.test", ["alice@example.org"], big)
        assert e.value.smtp_code == 452 and e.value.smtp_error.startswith(b"4.3.1")
        assert os.listdir(small_filesystem / "queue" / "incoming") == []
        client.sendmail("a@c.test", ["alice@example.org"], b"Subject: small\r\n\r\nok\r\n")
    assert [m["Subject"] for m in server.messages("alice@example.org")] == ["small"]


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


@pytest.mark.parametrize("link, target", [
    ("example.org/bob", "elsewhere"),  # bob's Maildir a link to a directory outside
    ("example.org/bob", "example.net/carol"),  # ... to carol's (../example.net/carol)
    ("example.org/bob/new", "elsewhere"),  # bob's new/ a link
    ("example.org", "elsewhere"),  # the domain directory a link
])
def test_a_symlink_below_the_root_gives_451_is_logged_and_nothing_is_written(
    make_server, link, target
):
    server = make_server().start()
    root = server.root
    send_mail(server.port, "a@c.test", ["carol@example.net", "bob@example.org"],
              b"Subject: before\r\n\r\nfirst\r\n")
    (root / "elsewhere").mkdir()
    if link == "example.org":
        shutil.rmtree(root / "example.org")
    else:
        shutil.rmtree(root / link)
    (root / link).symlink_to(os.path.relpath(root / target, (root / link).parent))
    before = tree(root / target)
    with pytest.raises(smtplib.SMTPDataError) as e:
        send_mail(server.port, "a@c.test", ["alice@example.org", "bob@example.org"],
                  b"Subject: x\r\n\r\ntoken-link\r\n")
    assert e.value.smtp_code == 451 and e.value.smtp_error.startswith(b"4.3.0")
    # Nothing through the link, nothing for alice either (all or nothing), nothing queued.
    assert tree(root / target) == before
    alice = root / "example.org" / "alice"
    assert not alice.exists() or os.listdir(alice / "new") == os.listdir(alice / "tmp") == []
    assert os.listdir(server.queue / "incoming") == []
    assert os.listdir(server.queue / "messages") == []
    assert f"cannot open directory {root / link}: [Errno 40] a symbolic link, not followed" in (
        server.log_text()
    )


def test_a_symlinked_mailbox_root_is_followed(make_server, tmp_path):
    """The administrator's choice of root may be a link (/var/mail -> /srv/mail)."""
    real = tmp_path / "srv" / "mail"
    real.mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "mail").symlink_to(real)
    server = make_server(overrides={"mailboxes": {"root": str(tmp_path / "var" / "mail")}}).start()
    send_mail(server.port, "a@c.test", ["alice@example.org", "bob@example.org"],
              b"Subject: rooted\r\n\r\nok\r\n")
    for user in ("alice", "bob"):
        assert len(os.listdir(real / "example.org" / user / "new")) == 1


def test_a_started_server_removes_tmp_files_left_by_a_crash(make_server, tmp_path):
    """Files in tmp/ unchanged for more than 36 hours are litter (a crash mid-delivery)."""
    server = make_server()
    tmp = server.root / "example.org" / "alice" / "tmp"
    tmp.mkdir(parents=True)
    now = time.time()
    old, young = tmp / "1700000000.M1P1Q1.crashed", tmp / "1700000000.M2P1Q2.recent"
    for path, age in ((old, 36 * 3600 + 120), (young, 36 * 3600 - 120)):
        path.write_bytes(b"Subject: partial\n")
        os.utime(path, (now - age, now - age))
    # A link in the store is not followed: a file elsewhere is never removed through it.
    elsewhere = tmp_path / "elsewhere" / "tmp"
    elsewhere.mkdir(parents=True)
    precious = elsewhere / "precious"
    precious.write_bytes(b"keep me")
    os.utime(precious, (0, 0))
    (server.root / "example.org" / "bob").symlink_to(elsewhere.parent)
    server.start()
    wait_for(lambda: not old.exists(), 10, "the old tmp/ file to be removed")
    wait_for(lambda: "tmp cleanup: removed 1 file(s)" in server.log_text(), 10, "the summary")
    assert young.exists() and precious.exists()
    assert f"tmp cleanup: removed {old}, unchanged for 36.0 hours (left by a crash)" in (
        server.log_text()
    )
    send_mail(server.port, "a@c.test", ["alice@example.org"], b"Subject: still works\r\n\r\nok\r\n")
    assert [m["Subject"] for m in server.messages("alice@example.org")] == ["still works"]
