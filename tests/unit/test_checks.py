"""
The checks pipeline (mailsrv.checks.pipeline) and its first checks (mailsrv.checks.builtin), in-process:
verdicts, how a stage's verdicts combine, the order of stages, and the built-in rules' replies.
"""

from __future__ import annotations

import datetime

import pytest
from zope.interface import implementer
from zope.interface.exceptions import BrokenImplementation
from zope.interface.verify import verifyObject

from mailsrv import replies
from mailsrv.checks.builtin import (
    HeaderOwnership,
    HopLimit,
    LocalRecipient,
    MissingFields,
    RelayAccess,
    SenderOwnership,
    builtin_pipeline,
)
from mailsrv.checks.pipeline import (
    ACCEPT,
    AddHeaders,
    Client,
    Draft,
    Facts,
    FileInto,
    Pipeline,
    Reject,
    Stage,
    TempFail,
)
from mailsrv.checks.policy import is_local, route
from mailsrv.config import parse_config
from mailsrv.interfaces import ICheck, IModifier, IPipeline
from mailsrv.message.headsection import HeaderFacts
from mailsrv.replies import Reply
from mailsrv.routing.address import parse_mail_from, parse_rcpt_to
from mailsrv.routing.router import Directory, LocalTarget

REJECTED = Reply(550, "5.7.1", "Error: go away")
DEFERRED = Reply(451, "4.7.1", "Error: try later")
DIRECTORY = Directory(
    ["example.org"], frozenset({"alice@example.org", "bob@example.org"}),
    {"sales@example.org": ("alice@example.org",)},
)


@implementer(ICheck)
class Fixed:
    """A check answering ``verdict``, recording each call in ``log``."""

    def __init__(self, name, stage, verdict, log=None):
        self.name, self.stage, self.verdict, self.log = name, stage, verdict, log

    def check(self, facts):
        if self.log is not None:
            self.log.append((self.name, facts.stage))
        return self.verdict


def client(**kwargs) -> Client:
    return Client(ip="192.0.2.7", name="unknown[192.0.2.7]", **kwargs)


def facts(stage: Stage, **kwargs) -> Facts:
    return Facts(stage, kwargs.pop("client", client()), DIRECTORY, **kwargs)


def sender(path: str):
    return parse_mail_from(f"FROM:<{path}>".encode())[0]


def rcpt_facts(path: str, **client_kwargs) -> Facts:
    """The facts of RCPT TO:<path>, routed as the session routes them."""
    mailbox = parse_rcpt_to(f"TO:<{path}>".encode())[0]
    who = client(**client_kwargs)
    return facts(Stage.RCPT, client=who, recipient=mailbox,
                 recipient_is_local=is_local(mailbox, DIRECTORY),
                 targets=route(mailbox, DIRECTORY, who.may_relay))


# -- verdicts -------------------------------------------------------------------------------


def test_accept_passes_to_the_next_check():
    log: list = []
    pipeline = Pipeline([Fixed("a", Stage.MAIL, ACCEPT, log), Fixed("b", Stage.MAIL, ACCEPT, log)])
    outcome = pipeline.run(facts(Stage.MAIL))
    assert outcome.accepted and outcome.headers == () and outcome.folder is None
    assert log == [("a", Stage.MAIL), ("b", Stage.MAIL)]


def test_reject_is_a_5xx_reply_and_stops_the_stage():
    log: list = []
    pipeline = Pipeline([
        Fixed("a", Stage.RCPT, Reject(REJECTED), log), Fixed("b", Stage.RCPT, ACCEPT, log),
    ])
    outcome = pipeline.run(facts(Stage.RCPT))
    assert outcome.refusal == Reject(REJECTED) and outcome.refused_by == "a"
    assert log == [("a", Stage.RCPT)]
    with pytest.raises(ValueError):
        Reject(DEFERRED)


def test_tempfail_is_a_4xx_reply_and_stops_the_stage():
    pipeline = Pipeline([
        Fixed("grey", Stage.RCPT, TempFail(DEFERRED)), Fixed("b", Stage.RCPT, Reject(REJECTED)),
    ])
    outcome = pipeline.run(facts(Stage.RCPT))
    assert outcome.refusal == TempFail(DEFERRED) and outcome.refused_by == "grey"
    with pytest.raises(ValueError):
        TempFail(REJECTED)


def test_first_refusal_wins():
    pipeline = Pipeline([
        Fixed("a", Stage.MAIL, TempFail(DEFERRED)), Fixed("b", Stage.MAIL, Reject(REJECTED)),
    ])
    assert pipeline.run(facts(Stage.MAIL)).refusal == TempFail(DEFERRED)


def test_added_headers_accumulate_in_order_across_stages():
    pipeline = Pipeline([
        Fixed("a", Stage.HEADER, AddHeaders((b"X-A: 1\n",))),
        Fixed("b", Stage.HEADER, ACCEPT),
        Fixed("c", Stage.HEADER, AddHeaders((b"X-C: 3\n", b"X-D: 4\n\tfolded\n"))),
        Fixed("d", Stage.MESSAGE, AddHeaders((b"X-E: 5\n",))),
    ])
    outcome = pipeline.run_stages(facts(Stage.HEADER), facts(Stage.MESSAGE))
    assert outcome.accepted
    assert outcome.headers == (b"X-A: 1\n", b"X-C: 3\n", b"X-D: 4\n\tfolded\n", b"X-E: 5\n")


@pytest.mark.parametrize("field", [
    b"X-A: 1", b"X-A: 1\r\n", b"X-A 1\n", b"X-A: 1\nX-B: 2\n", b"X-A: a\rb\n", b": x\n",
    b"X-A: a\0b\n",
])
def test_added_headers_must_be_one_lf_terminated_field(field):
    with pytest.raises(ValueError):
        AddHeaders((field,))


def test_file_into_the_first_folder_named():
    pipeline = Pipeline([
        Fixed("spam", Stage.HEADER, FileInto("Junk")),
        Fixed("lists", Stage.MESSAGE, FileInto("Lists.python")),
    ])
    outcome = pipeline.run_stages(facts(Stage.HEADER), facts(Stage.MESSAGE))
    assert outcome.accepted and outcome.folder == "Junk"


@pytest.mark.parametrize("folder", ["", ".Junk", "Junk.", "a/b", "..", "a..b", "Jünk", "a b"])
def test_file_into_takes_only_safe_maildirplusplus_names(folder):
    with pytest.raises(ValueError):
        FileInto(folder)


def test_a_check_returning_no_verdict_is_an_error():
    with pytest.raises(TypeError):
        Pipeline([Fixed("x", Stage.MAIL, None)]).run(facts(Stage.MAIL))


# -- stages ----------------------------------------------------------------------------------


def test_stages_run_in_order_and_only_their_own_checks():
    log: list = []
    checks = [Fixed(stage.value, stage, ACCEPT, log) for stage in reversed(Stage)]
    pipeline = Pipeline(checks)
    pipeline.run_stages(facts(Stage.CONNECT), facts(Stage.HELO), facts(Stage.MAIL))
    assert log == [("connect", Stage.CONNECT), ("helo", Stage.HELO), ("mail", Stage.MAIL)]
    assert [s.value for s in Stage] == ["connect", "helo", "mail", "rcpt", "header", "message"]


def test_a_refused_stage_ends_the_sequence():
    log: list = []
    pipeline = Pipeline([
        Fixed("connect", Stage.CONNECT, AddHeaders((b"X-Seen: 1\n",)), log),
        Fixed("helo", Stage.HELO, Reject(REJECTED), log),
        Fixed("mail", Stage.MAIL, ACCEPT, log),
    ])
    outcome = pipeline.run_stages(facts(Stage.CONNECT), facts(Stage.HELO), facts(Stage.MAIL))
    assert outcome.refusal == Reject(REJECTED) and outcome.refused_by == "helo"
    assert [name for name, _ in log] == ["connect", "helo"]


def test_the_pipeline_verifies_what_it_is_given():
    class NoStage:
        name = "broken"

        def check(self, facts):
            return ACCEPT

    with pytest.raises(BrokenImplementation):  # no stage: verifyObject refuses it
        Pipeline([implementer(ICheck)(NoStage)()])
    with pytest.raises(TypeError):
        Pipeline([Fixed("x", "mail", ACCEPT)])


# -- the built-in checks: the replies the server always gave ---------------------------------


def test_relay_access():
    check = RelayAccess()
    relay_denied = Reject(Reply(554, "5.7.1", "Relay access denied"))
    assert check.check(rcpt_facts("alice@example.org")) == ACCEPT
    assert check.check(rcpt_facts("someone@elsewhere.test")) == relay_denied
    assert check.check(rcpt_facts("alice%elsewhere.test@example.org")) == relay_denied
    assert check.check(rcpt_facts("someone@elsewhere.test", trusted_network=True)) == ACCEPT
    assert check.check(rcpt_facts("x@elsewhere.test", authenticated_as="bob@example.org")) == ACCEPT


def test_local_recipient():
    check = LocalRecipient()
    assert check.check(rcpt_facts("alice@example.org")) == ACCEPT
    assert check.check(rcpt_facts("sales@example.org")) == ACCEPT
    assert check.check(rcpt_facts("nobody@example.org")) == Reject(
        Reply(550, "5.1.1", "User unknown in local recipient table"))
    assert check.check(rcpt_facts('"../x"@example.org')) == Reject(
        Reply(553, "5.1.3", "Mailbox name not allowed"))
    assert check.check(rcpt_facts("x@elsewhere.test", trusted_network=True)) == ACCEPT


def test_sender_ownership():
    check = SenderOwnership()
    bob = client(authenticated_as="bob@example.org")
    assert check.check(facts(Stage.MAIL, sender=sender("anyone@elsewhere.test"))) == ACCEPT
    assert check.check(facts(Stage.MAIL, client=bob, sender=sender("bob@example.org"))) == ACCEPT
    verdict = check.check(facts(Stage.MAIL, client=bob, sender=sender("alice@example.org")))
    assert verdict == Reject(Reply(
        553, "5.7.1", "Error: sender address <alice@example.org> not owned by user bob@example.org"
    ), reason="sender not owned")
    assert check.check(facts(Stage.MAIL, client=bob, sender=None)).reply.text.startswith(
        "Error: sender address <> not owned")


def head(**kwargs) -> HeaderFacts:
    return HeaderFacts(**{"has_header_section": True, "has_message_id": True,
                          "received_count": 0, **kwargs})


def test_hop_limit():
    check = HopLimit(3)
    assert check.check(facts(Stage.HEADER, head=head(received_count=3))) == ACCEPT
    assert check.check(facts(Stage.HEADER, head=head(received_count=4))) == Reject(
        replies.TOO_MANY_HOPS)


def test_header_ownership():
    check = HeaderOwnership()
    bob = client(authenticated_as="bob@example.org")
    own = head(originators=(("From", "bob@example.org"),))
    other = head(originators=(("From", "bob@example.org"), ("Sender", "alice@example.org")))
    assert check.check(facts(Stage.HEADER, head=other)) == ACCEPT  # port 25: not checked
    assert check.check(facts(Stage.HEADER, client=bob, head=own)) == ACCEPT
    assert check.check(facts(Stage.HEADER, client=bob, head=other)).reply == Reply(
        553, "5.7.1",
        "Error: Sender: header address <alice@example.org> not owned by user bob@example.org")
    ambiguous = check.check(facts(Stage.HEADER, client=bob, head=head(ambiguity="a NUL")))
    assert ambiguous.reply == Reply(
        554, "5.6.0", "Error: malformed header section (a NUL); message refused")
    assert check.check(facts(Stage.HEADER, client=bob, head=head(too_long=True))).reply.code == 552


def test_missing_fields_adds_message_id_and_a_submitted_message_date():
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    modifier = MissingFields(now=lambda: when)
    draft = Draft(queue_id="Q1", hostname="mx.example.org", sender=None, prefix=b"Received: x\n",
                  head=head(has_message_id=False))
    changed = modifier.modify(draft)
    assert changed.prefix.startswith(b"Received: x\nMessage-ID: <")
    assert b"Date:" not in changed.prefix
    submitted = modifier.modify(Draft(
        queue_id="Q1", hostname="mx.example.org", sender=None, prefix=b"",
        head=head(has_date=False), authenticated_as="bob@example.org"))
    assert submitted.prefix == b"Date: Fri, 02 Jan 2026 03:04:05 +0000\n"
    complete = Draft(queue_id="Q1", hostname="h", sender=None, prefix=b"R\n",
                     head=head(has_date=True), authenticated_as="bob@example.org")
    assert modifier.modify(complete) is complete


def test_builtin_pipeline_order_and_configuration():
    def config(check_from_header):
        return parse_config({"domains": {"local": ["example.org"]},
                             "mailboxes": {"root": "/nonexistent"},
                             "queue": {"path": "/nonexistent"},
                             "submission": {"check_from_header": check_from_header}}, None)

    pipeline = builtin_pipeline(config(True))
    assert [c.name for c in pipeline.checks] == [
        "sender_ownership", "relay_access", "srs_address", "local_recipient", "hop_limit",
        "header_ownership", "own_domains", "dmarc_policy", "authentication_results"]
    assert [m.name for m in pipeline.modifiers] == ["missing_fields", "sender_rewriting"]
    assert "header_ownership" not in [c.name for c in builtin_pipeline(config(False)).checks]
    verifyObject(IPipeline, pipeline)
    for check in pipeline.checks:
        verifyObject(ICheck, check)
    for modifier in pipeline.modifiers:
        verifyObject(IModifier, modifier)
    # The relay rule runs before the recipient rule: a disguised local address from a client
    # that may not relay is a relay attempt (554), not an unknown user.
    assert pipeline.run(rcpt_facts("a%b@example.org")).refusal.reply.code == 554
    assert LocalTarget("example.org", "alice") in route(
        parse_rcpt_to(b"TO:<sales@example.org>")[0], DIRECTORY, False)


# -- the example check of docs/design.md, as written there -------------------------------------

FORGED_HELO = replies.Reply(550, "5.7.1", "Error: you are not {hostname}")


@implementer(ICheck)
class HeloIsNotUs:
    name = "helo_is_not_us"
    stage = Stage.HELO

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname.lower()

    def check(self, facts: Facts):
        helo = (facts.client.helo or "").lower()
        if helo == self.hostname and not facts.client.trusted_network:
            return Reject(FORGED_HELO.format(hostname=self.hostname))
        return ACCEPT


def test_the_design_documents_example_check():
    check = HeloIsNotUs("MX.example.org")
    verifyObject(ICheck, check)
    assert check.check(facts(Stage.HELO, client=client(helo="client.test"))) == ACCEPT
    assert check.check(facts(Stage.HELO, client=client(helo="mx.example.org"))) == Reject(
        Reply(550, "5.7.1", "Error: you are not mx.example.org"))
    trusted = client(helo="mx.example.org", trusted_network=True)
    assert check.check(facts(Stage.HELO, client=trusted)) == ACCEPT
    forged = client(helo="mx.example.org")
    outcome = Pipeline([check]).run_stages(
        facts(Stage.CONNECT, client=forged), facts(Stage.HELO, client=forged))
    assert outcome.refused_by == "helo_is_not_us"
