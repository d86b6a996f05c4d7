"""
mailsrv's own interfaces, each implementation checked with verifyObject, and the checks
pipeline as the intake runs it: a session on a StringTransport, time on a task.Clock,
deliveries run at once on the test's thread into a Maildir under tmp_path.
"""

from __future__ import annotations

import threading

from twisted.internet import task
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv.checks.builtin import builtin_pipeline
from mailsrv.checks.pipeline import ACCEPT, AddHeaders, FileInto, Pipeline, Reject, Stage, TempFail
from mailsrv.config import prepare_directories
from mailsrv.interfaces import (
    ICheck,
    IMessageIntake,
    IRelayer,
    ISessionIntake,
    ISpareSpoolFiles,
    IThreadRunner,
)
from mailsrv.outbound.relayer import Relayer
from mailsrv.replies import Reply
from mailsrv.routing.router import Directory
from mailsrv.runtime import Runtime
from mailsrv.storage import queue
from mailsrv.storage.spoolfiles import SpareSpoolFiles
from mailsrv.workers import ThreadRunner
from support.config import minimal_config
from support.inprocess import CLIENT, Connection, SyncWorkers
from support.queue_runtime import maildir_of

MESSAGE = ("Subject: x", "From: <sender@client.test>", "", "body", ".")


class ThreadReactor(task.Clock):
    """A clock with what a ThreadRunner and the spare files ask of a reactor besides."""

    def __init__(self) -> None:
        task.Clock.__init__(self)
        self.calls: list = []
        self.lock = threading.Lock()

    def addSystemEventTrigger(self, *args) -> None:
        pass

    def callFromThread(self, f, *args) -> None:
        with self.lock:
            self.calls.append((f, args))

    def callInThread(self, f, *args) -> None:
        threading.Thread(target=f, args=args).start()


def make_runtime(tmp_path, checks=None, **tables) -> Runtime:
    config = minimal_config(tmp_path, **{"relay": {"trusted_networks": ["10.0.0.0/8"]},
                                         **tables})
    prepare_directories(config)
    queue.queue_dirs(config.queue.path)
    directory = Directory(["example.org"], frozenset({"alice@example.org", "bob@example.org"}), {})
    return Runtime(config=config, directory=directory, reactor=task.Clock(),
                   workers=SyncWorkers(), checks=checks)


def open_session(runtime: Runtime, ip: str = CLIENT) -> Connection:
    """A connection with the banner read."""
    connection = Connection.to(runtime, ip)
    connection.output()
    return connection


@implementer(ICheck)
class Recording:
    def __init__(self, stage, verdict=ACCEPT, log=None):
        self.name, self.stage, self.verdict = f"rec_{stage.value}", stage, verdict
        self.log = log if log is not None else []

    def check(self, facts):
        self.log.append((facts.stage, facts.client.helo, facts.sender and str(facts.sender),
                         facts.recipient and str(facts.recipient), facts.head is not None,
                         facts.size))
        return self.verdict


def with_checks(tmp_path, *extra, **tables) -> Runtime:
    runtime = make_runtime(tmp_path, **tables)
    builtin = builtin_pipeline(runtime.config)
    runtime.checks = Pipeline(list(builtin.checks) + list(extra), builtin.modifiers)
    return runtime


def count(tmp_path, user="alice", folder="") -> int:
    """Messages in the Maildir (++ folder) of ``user``; 0 when it was never made."""
    new = tmp_path / "mail" / "example.org" / user / folder / "new"
    return len(list(new.iterdir())) if new.exists() else 0


# -- the interfaces, verified on every implementation -----------------------------------------


def test_session_and_transaction_provide_the_intake_interfaces(tmp_path):
    runtime = make_runtime(tmp_path)
    session = runtime.new_session(CLIENT)
    verifyObject(ISessionIntake, session)
    session.greeted("client.test", True)
    transaction = session.validateFrom(None, None)
    verifyObject(IMessageIntake, transaction)


def test_thread_runner_spare_files_and_relayer_provide_their_interfaces(tmp_path):
    verifyObject(IThreadRunner, ThreadRunner(ThreadReactor(), 2, "passwords"))
    verifyObject(ISpareSpoolFiles, SpareSpoolFiles(tmp_path, ThreadReactor(), stock=1))
    runtime = make_runtime(tmp_path)
    verifyObject(IRelayer, Relayer(runtime))


def test_build_makes_every_collaborator_with_a_runner_per_role(tmp_path):
    config = make_runtime(tmp_path).config
    directory = Directory(["example.org"], frozenset({"alice@example.org"}), {})
    reactor = ThreadReactor()
    made: list = []
    runtime = Runtime.build(config, directory, reactor, tls=None,
                            relayer=lambda r: made.append(r) or Relayer(r))
    assert made == [runtime] and isinstance(runtime.relayer, Relayer)
    assert isinstance(runtime.workers, ThreadRunner) and runtime.workers.name == "delivery"
    assert runtime.workers.size == 8
    assert runtime.password_threads is None and runtime.checker is None  # no AUTH configured
    assert isinstance(runtime.spool_files, SpareSpoolFiles)
    assert [c.name for c in runtime.checks.checks][:4] == [
        "sender_ownership", "relay_access", "srs_address", "local_recipient"]
    runtime.spool_files.stop()


# -- the stages as a session reaches them ------------------------------------------------------


def test_every_stage_runs_once_in_order_with_what_it_knows(tmp_path):
    log: list = []
    runtime = with_checks(tmp_path, *(Recording(stage, log=log) for stage in reversed(Stage)))
    session = open_session(runtime)
    replies = session.send("EHLO client.test", "MAIL FROM:<s@client.test>",
                           "RCPT TO:<alice@example.org>", "DATA", *MESSAGE)
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    assert [entry[0] for entry in log] == list(Stage)
    by_stage = {entry[0]: entry[1:] for entry in log}
    # (helo, sender, recipient, head read, size) as each stage saw them
    assert by_stage[Stage.CONNECT] == ("client.test", None, None, False, 0)  # run at MAIL
    assert by_stage[Stage.HELO] == ("client.test", None, None, False, 0)
    assert by_stage[Stage.MAIL] == ("client.test", "s@client.test", None, False, 0)
    assert by_stage[Stage.RCPT] == ("client.test", "s@client.test", "alice@example.org", False, 0)
    assert by_stage[Stage.HEADER] == ("client.test", "s@client.test", None, True, 0)
    assert by_stage[Stage.MESSAGE][3] and by_stage[Stage.MESSAGE][4] > 0


def test_a_connection_stage_refusal_is_answered_at_mail(tmp_path):
    refused = Reply(554, "5.7.1", "Error: your address is listed")
    session = open_session(with_checks(tmp_path, Recording(Stage.CONNECT, Reject(refused))))
    assert session.send("EHLO client.test")[-1].startswith("250 ")
    assert session.send("MAIL FROM:<s@client.test>") == [
        "554 5.7.1 Error: your address is listed"]
    assert session.send("RCPT TO:<alice@example.org>") == ["503 5.5.1 Error: need MAIL command"]


def test_a_recipient_tempfail_is_the_rcpt_reply(tmp_path):
    later = Reply(450, "4.2.0", "Error: greylisted, try again later")
    session = open_session(with_checks(tmp_path, Recording(Stage.RCPT, TempFail(later))))
    assert session.send("EHLO client.test", "MAIL FROM:<s@client.test>",
                        "RCPT TO:<alice@example.org>")[-1] == (
        "450 4.2.0 Error: greylisted, try again later")
    # The built-in checks come first: an unknown user is still 550.
    assert session.send("RCPT TO:<nobody@example.org>") == [
        "550 5.1.1 User unknown in local recipient table"]


def test_a_message_stage_refusal_stores_nothing(tmp_path):
    refused = Reply(554, "5.7.1", "Error: message content rejected")
    session = open_session(with_checks(tmp_path, Recording(Stage.MESSAGE, Reject(refused))))
    replies = session.send("EHLO client.test", "MAIL FROM:<s@client.test>",
                           "RCPT TO:<alice@example.org>", "DATA", *MESSAGE)
    assert replies[-1] == "554 5.7.1 Error: message content rejected"
    assert not (tmp_path / "mail" / "example.org" / "alice").exists()


def test_added_headers_from_every_stage_follow_our_received(tmp_path):
    session = open_session(with_checks(
        tmp_path,
        Recording(Stage.HELO, AddHeaders((b"X-Helo-Check: pass\n",))),
        Recording(Stage.RCPT, AddHeaders((b"X-Rcpt-Check: pass\n",))),
        Recording(Stage.HEADER, AddHeaders((b"Authentication-Results: mx.example.org; none\n",))),
    ))
    replies = session.send("EHLO client.test", "MAIL FROM:<s@client.test>",
                           "RCPT TO:<alice@example.org>", "DATA", *MESSAGE)
    assert replies[-1].startswith("250 ")
    (message,) = maildir_of(tmp_path)
    raw = message.as_bytes()
    after_received = raw[raw.index(b"Received:"):].split(b"\n")
    fields = [line.split(b":")[0] for line in after_received if line[:1] not in (b" ", b"\t")]
    assert fields[1:5] == [b"X-Helo-Check", b"X-Rcpt-Check", b"Authentication-Results",
                           b"Message-ID"]


def test_a_message_filed_into_a_folder_lands_in_its_maildirplusplus_folder(tmp_path):
    session = open_session(with_checks(tmp_path, Recording(Stage.HEADER, FileInto("Junk"))))
    replies = session.send("EHLO client.test", "MAIL FROM:<s@client.test>",
                           "RCPT TO:<alice@example.org>", "RCPT TO:<bob@example.org>", "DATA",
                           *MESSAGE)
    assert replies[-1].startswith("250 ")
    for user in ("alice", "bob"):
        assert count(tmp_path, user, ".Junk") == 1
        assert count(tmp_path, user) == 0  # the INBOX got nothing


def test_a_recipient_filed_into_a_folder_keeps_the_others_in_their_inbox(tmp_path):
    @implementer(ICheck)
    class BobsLists:
        name, stage = "bobs_lists", Stage.RCPT

        def check(self, facts):
            return FileInto("Lists.python") if facts.recipient.local == "bob" else ACCEPT

    session = open_session(with_checks(tmp_path, BobsLists()))
    replies = session.send("EHLO client.test", "MAIL FROM:<s@client.test>",
                           "RCPT TO:<alice@example.org>", "RCPT TO:<bob@example.org>", "DATA",
                           *MESSAGE)
    assert replies[-1].startswith("250 ")
    assert count(tmp_path, "alice") == 1
    assert count(tmp_path, "bob", ".Lists.python") == 1
    assert count(tmp_path, "bob") == 0


def test_the_relay_rule_is_a_check_with_the_same_reply(tmp_path):
    session = open_session(make_runtime(tmp_path))
    assert session.send("EHLO client.test", "MAIL FROM:<s@client.test>",
                        "RCPT TO:<x@elsewhere.test>")[-1] == "554 5.7.1 Relay access denied"
    trusted = open_session(make_runtime(tmp_path), ip="10.1.2.3")
    assert trusted.send("EHLO client.test", "MAIL FROM:<s@client.test>",
                        "RCPT TO:<x@elsewhere.test>")[-1] == "250 2.1.5 Ok"


def test_bcrypt_runs_in_two_threads_of_its_own(tmp_path):
    """AUTH's password checks never queue in front of deliveries: a runner of their own."""
    config = make_runtime(
        tmp_path, smtp={"listen": ["tcp:2525"], "auth": True},
        tls={"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")},
        mailboxes={"root": str(tmp_path / "mail"), "users": str(tmp_path / "users")},
    ).config
    directory = Directory(["example.org"], frozenset({"alice@example.org"}), {})
    runtime = Runtime.build(config, directory, ThreadReactor(), tls=None, relayer=Relayer)
    passwords = runtime.password_threads
    assert isinstance(passwords, ThreadRunner) and passwords is not runtime.workers
    assert (passwords.name, passwords.size) == ("passwords", 2)
    verifyObject(IThreadRunner, passwords)
    assert runtime.checker._in_thread == passwords.run
    assert runtime.auth_failures is not None
    runtime.spool_files.stop()
