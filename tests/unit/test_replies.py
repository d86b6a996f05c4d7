"""Tests for mailsrv.replies: the one reply type and the one refusal type."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mailsrv import replies
from mailsrv.checks import policy
from mailsrv.replies import Refusal, Reply
from mailsrv.routing import address


def test_every_reply_is_a_reply_whose_status_matches_its_code() -> None:
    table = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}
    assert len(table) > 60
    for name, reply in table.items():
        assert isinstance(reply.code, int) and 200 <= reply.code <= 599, name
        if reply.status:  # 354 and 334 carry none
            assert reply.status[0] == str(reply.code)[0], name
        assert reply.text, name


def test_the_parser_the_policy_and_the_protocol_raise_the_same_refusal_type() -> None:
    assert policy.Refusal is Refusal
    with pytest.raises(Refusal) as exc:
        address.parse_rcpt_to(b"TO:<>")
    assert exc.value.reply == replies.BAD_RECIPIENT


def test_a_refusal_carries_its_reply() -> None:
    err = Refusal(replies.RELAY_DENIED)
    assert err.reply is replies.RELAY_DENIED
    assert (err.code, err.status, err.text) == (554, "5.7.1", "Relay access denied")
    assert str(err) == "554 5.7.1 Relay access denied"
    assert err == Refusal(Reply(554, "5.7.1", "Relay access denied"))
    assert hash(err) == hash(Refusal(Reply(554, "5.7.1", "Relay access denied")))
    assert err != Refusal(replies.USER_UNKNOWN)


def test_format_fills_the_placeholders_and_keeps_code_and_status() -> None:
    reply = replies.RECIPIENT_TOO_LONG.format(part="domain", limit="255")
    assert reply == Reply(
        553, "5.1.3", "Bad recipient address syntax: domain longer than 255 octets")


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        (replies.CANNOT_PREPARE.format(error="gone"), "451 4.3.0 cannot prepare the message: gone"),
        (Reply.from_wire(550, b"5.1.1 <b@x>: unknown"), "550 5.1.1 <b@x>: unknown"),
        (Reply.from_wire(421, b""), "421 4.0.0"),
    ],
)
def test_str_is_one_line_with_the_enhanced_status_once(reply: Reply, line: str) -> None:
    assert str(reply) == line


def test_wire_format_of_a_multiline_reply() -> None:
    assert replies.format_reply(Reply(250, "2.0.0", "a\nb")) == b"250-2.0.0 a\r\n250 2.0.0 b"


def test_a_destination_error_is_a_refusal_whose_code_says_bounce_or_retry() -> None:
    from mailsrv.outbound.mx import DestinationError

    final = DestinationError(replies.NULL_MX.format(domain="x.test"))
    assert isinstance(final, Refusal) and final.permanent and final.status == "5.1.10"
    assert str(final) == "Domain x.test does not accept mail (null MX)"
    later = DestinationError(replies.HOST_LOOKUP_FAILED.format(name="smart.test"))
    assert not later.permanent and later.status == "4.4.3"


#: Files another branch is rewriting, whose literals move to replies.py with that rewrite.
_NOT_YET: set[str] = set()


def test_no_reply_is_written_outside_replies_py() -> None:
    """A reply with a literal code is built only in replies.py, so that one table says what
    clients and bounce reports are told."""
    package = Path(replies.__file__).parent
    found = []
    for source in sorted(package.rglob("*.py")):
        if source.name in _NOT_YET | {"replies.py"}:
            continue
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Reply"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                found.append(f"{source.name}:{node.lineno}")
    assert found == []


def test_a_refusals_log_words_name_the_layer_and_why() -> None:
    """Every refusal's log line says which check refused and why, so a false positive is
    found with one grep; a refusal of the protocol itself is the "smtp" layer."""
    listed = replies.Refusal(replies.RELAY_DENIED, "dnsbl", "dnsbl zen.example score 3")
    assert listed.describe() == 'check=dnsbl reason="dnsbl zen.example score 3"'
    plain = replies.Refusal(replies.RELAY_DENIED)
    assert plain.describe() == (
        f'check=smtp reason="{replies.RELAY_DENIED.code} {replies.RELAY_DENIED.status} '
        f'{replies.RELAY_DENIED.text}"')
    quoted = replies.Refusal(replies.RELAY_DENIED, "rspamd", 'rspamd action="reject"')
    assert quoted.describe() == "check=rspamd reason=\"rspamd action='reject'\""
