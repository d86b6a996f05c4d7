"""Tests for mailsrv.checks.policy: relay rules, disguised routing, local recipients."""

from __future__ import annotations

import pytest

from mailsrv.checks.policy import Refusal, recipient_targets
from mailsrv.replies import Reply
from mailsrv.routing.address import Mailbox, parse_rcpt_to
from mailsrv.routing.router import Directory, LocalTarget, RemoteTarget

RELAY_DENIED = (554, "5.7.1", "Relay access denied")
NOT_ALLOWED = (553, "5.1.3", "Mailbox name not allowed")
UNKNOWN = (550, "5.1.1", "User unknown in local recipient table")

ALICE = LocalTarget("example.org", "alice")


@pytest.fixture
def directory() -> Directory:
    return Directory(
        ["example.org", "example.net"],
        frozenset({"alice@example.org", "bob@example.net"}),
        {
            "postmaster": ("alice@example.org",),
            "sales@example.org": ("alice@example.org", "dave@partner.example"),
        },
    )


def rcpt(path: str) -> Mailbox:
    """The mailbox a client's ``RCPT TO:<path>`` parses to."""
    mailbox, _ = parse_rcpt_to(b"TO:<" + path.encode() + b">")
    return mailbox


def refusal(mailbox: Mailbox, directory: Directory, may_relay: bool) -> tuple[int, str, str]:
    with pytest.raises(Refusal) as exc:
        recipient_targets(mailbox, directory, may_relay)
    return exc.value.code, exc.value.status, exc.value.text


DISGUISES = [
    "alice%evil.example@example.org",  # %-hack
    '"a@evil.example"@example.org',  # quoted '@'
    "evil!alice@example.org",  # UUCP bang path
    "@example.org:x@evil.example",  # source route to a foreign domain
    "@example.org:alice@example.org",  # source route, even to a local mailbox
    "x@[192.0.2.1]",  # address literal
    "alice@[IPv6:2001:db8::1]",
    "alice%example.org@evil.example",  # %-hack at a foreign domain
]


@pytest.mark.parametrize("path", DISGUISES)
def test_disguises_from_untrusted_clients_are_relay_attempts(
    directory: Directory, path: str
) -> None:
    assert refusal(rcpt(path), directory, may_relay=False) == RELAY_DENIED


@pytest.mark.parametrize(
    "path",
    ["alice%evil.example@example.org", '"a@evil.example"@example.org', "evil!alice@example.org"],
)
def test_trusted_relay_syntax_to_local_domain_is_looked_up_literally(
    directory: Directory, path: str
) -> None:
    # Never interpreted as routing: the literal name is simply not a mailbox here.
    assert refusal(rcpt(path), directory, may_relay=True) == UNKNOWN


@pytest.mark.parametrize(
    "path, expected",
    [
        ("@example.org:x@evil.example", (RemoteTarget("x@evil.example"),)),
        ("@example.org:alice@example.org", (ALICE,)),  # the route is discarded
        ("x@[192.0.2.1]", (RemoteTarget("x@[192.0.2.1]"),)),
        ("alice@[IPv6:2001:db8::1]", (RemoteTarget("alice@[IPv6:2001:db8::1]"),)),
        ("alice%example.org@evil.example", (RemoteTarget("alice%example.org@evil.example"),)),
    ],
)
def test_trusted_disguises_elsewhere_are_relayed_as_written(
    directory: Directory, path: str, expected: object
) -> None:
    assert recipient_targets(rcpt(path), directory, may_relay=True) == expected


@pytest.mark.parametrize("may_relay", [False, True])
@pytest.mark.parametrize(
    "path, expected",
    [
        ("alice@example.org", (ALICE,)),
        ("Alice@EXAMPLE.org", (ALICE,)),
        ("alice+news@example.org", (ALICE,)),
        ('"alice"@example.org', (ALICE,)),  # quoting alone is no disguise
        ("bob@example.net", (LocalTarget("example.net", "bob"),)),
        ("postmaster", (ALICE,)),  # RFC 5321's <postmaster> without a domain
        ("postmaster@example.net", (ALICE,)),
        # our own alias may point elsewhere, whoever sends
        ("sales@example.org", (ALICE, RemoteTarget("dave@partner.example"))),
    ],
)
def test_local_recipients(
    directory: Directory, may_relay: bool, path: str, expected: object
) -> None:
    assert recipient_targets(rcpt(path), directory, may_relay) == expected


@pytest.mark.parametrize("may_relay", [False, True])
@pytest.mark.parametrize(
    "path",
    ["nobody@example.org", "bob@example.org", "alice@example.net", "nobody+alice@example.org"],
)
def test_unknown_local_user(directory: Directory, may_relay: bool, path: str) -> None:
    assert refusal(rcpt(path), directory, may_relay) == UNKNOWN


@pytest.mark.parametrize("may_relay", [False, True])
@pytest.mark.parametrize(
    "path",
    [
        '".hidden"@example.org',
        '"../alice"@example.org',
        '"a/b"@example.org',
        '"a\\\\b"@example.org',
        '"a..b"@example.org',
        '""@example.org',
        '"postmaster/x"@example.net',
    ],
)
def test_unsafe_local_part(directory: Directory, may_relay: bool, path: str) -> None:
    assert refusal(rcpt(path), directory, may_relay) == NOT_ALLOWED


def test_quoted_but_safe_local_part_is_just_unknown(directory: Directory) -> None:
    assert refusal(rcpt('"a b\\"c"@example.net'), directory, False) == UNKNOWN


def test_unsafe_local_part_control_characters(directory: Directory) -> None:
    # Not producible from the wire (the parser refuses them), but the policy does not rely on it.
    for local in ("a\x00b", "a\nb", "a" * 65):
        assert refusal(Mailbox(local, "example.org"), directory, False) == NOT_ALLOWED


@pytest.mark.parametrize(
    "path", ["dave@partner.example", "Dave.Smith@Partner.Example", '"john doe"@partner.example']
)
def test_foreign_domain(directory: Directory, path: str) -> None:
    mailbox = rcpt(path)
    assert refusal(mailbox, directory, may_relay=False) == RELAY_DENIED
    assert recipient_targets(mailbox, directory, may_relay=True) == (RemoteTarget(str(mailbox)),)


def test_foreign_domain_keeps_local_part_case_and_quoting(directory: Directory) -> None:
    assert recipient_targets(rcpt("Dave.Smith@Partner.Example"), directory, True) == (
        RemoteTarget("Dave.Smith@partner.example"),
    )
    assert recipient_targets(rcpt('"john doe"@partner.example'), directory, True) == (
        RemoteTarget('"john doe"@partner.example'),
    )


def test_refusal_is_an_exception_with_the_reply() -> None:
    err = Refusal(Reply(554, "5.7.1", "Relay access denied"))
    assert isinstance(err, Exception)
    assert (err.code, err.status, err.text) == RELAY_DENIED
    assert err == Refusal(Reply(*RELAY_DENIED))
    assert "554 5.7.1 Relay access denied" in str(err)
