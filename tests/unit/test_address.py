"""Tests for mailsrv.routing.address: SMTP path and parameter parsing, domains, safe local parts."""

from __future__ import annotations

import pytest

from mailsrv import replies
from mailsrv.replies import Refusal, Reply
from mailsrv.routing.address import (
    Mailbox,
    is_dot_atom,
    is_safe_local_part,
    normalise_domain,
    parse_mail_from,
    parse_rcpt_to,
)

MAIL_USAGE = (501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_USAGE = (501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
BAD_SENDER = (553, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = (553, "5.1.3", "Bad recipient address syntax")
NON_ASCII = (553, "5.6.7", "Non-ASCII address without the SMTPUTF8 parameter")
BAD_PARAM = (501, "5.5.4", "Bad parameter syntax")


def reply(exc: pytest.ExceptionInfo[Refusal]) -> tuple[int, str, str]:
    return exc.value.code, exc.value.status, exc.value.text


def rcpt_error(rest: bytes) -> tuple[int, str, str]:
    with pytest.raises(Refusal) as exc:
        parse_rcpt_to(rest)
    return reply(exc)


def mail_error(rest: bytes) -> tuple[int, str, str]:
    with pytest.raises(Refusal) as exc:
        parse_mail_from(rest)
    return reply(exc)


def label_domain(length: int) -> str:
    """A valid domain of exactly ``length`` octets (labels of 50 octets and a last one)."""
    labels = []
    remaining = length
    while remaining > 51:
        labels.append("a" * 49 + "b")
        remaining -= 51  # label + dot
    labels.append("c" * remaining)
    domain = ".".join(labels)
    assert len(domain) == length
    return domain


# --------------------------------------------------------------------------- refusals


def test_address_error_attributes() -> None:
    err = Refusal(Reply(553, "5.1.3", "Bad recipient address syntax"))
    assert (err.code, err.status, err.text) == BAD_RECIPIENT
    assert isinstance(err, Exception)
    assert "553 5.1.3" in str(err)


# --------------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    "rest, local, domain",
    [
        (b"FROM:<alice@example.org>", "alice", "example.org"),
        (b"from:<alice@example.org>", "alice", "example.org"),
        (b"FrOm:<alice@example.org>", "alice", "example.org"),
        (b"FROM: <alice@example.org>", "alice", "example.org"),  # space after colon
        (b"FROM:   <alice@example.org>", "alice", "example.org"),
        (b"FROM:alice@example.org", "alice", "example.org"),  # no brackets
        (b"FROM: alice@example.org", "alice", "example.org"),
        (b"FROM:alice@example.org  ", "alice", "example.org"),  # trailing spaces
        (b"FROM:<alice@example.org>  ", "alice", "example.org"),
        (b"FROM:<Alice.Smith@Example.ORG>", "Alice.Smith", "example.org"),
    ],
)
def test_mail_from_forms(rest: bytes, local: str, domain: str) -> None:
    mailbox, params = parse_mail_from(rest)
    assert mailbox == Mailbox(local, domain)
    assert params == {}


@pytest.mark.parametrize(
    "rest",
    [
        b"TO:<bob@example.org>",
        b"to:<bob@example.org>",
        b"tO:<bob@example.org>",
        b"TO: <bob@example.org>",
        b"TO:bob@example.org",
        b"TO:  bob@example.org",
        b"TO:<bob@EXAMPLE.org>",
    ],
)
def test_rcpt_to_forms(rest: bytes) -> None:
    assert parse_rcpt_to(rest) == (Mailbox("bob", "example.org"), {})


@pytest.mark.parametrize(
    "rest",
    [
        b"",
        b"FROM",
        b"FROM:",
        b"FROM: ",
        b"FROM <alice@example.org>",  # no colon
        b"FROM :<alice@example.org>",  # space before the colon
        b"FRM:<alice@example.org>",
        b"TO:<alice@example.org>",  # wrong keyword for MAIL
        b"FROM:<alice@example.org",  # unclosed
        b"FROM:<alice@example.org>SIZE=10",  # no space before the parameters
        b"FROM:<alice@example.org>>",
        b"FROM:<<alice@example.org>>",
        b"FROM:alice@example.org SIZE=10",  # no brackets but parameters
        b"FROM:alice @example.org",
        b"FROM:alice@example.org>",
        b'FROM:<"unterminated@example.org>',  # the quoted-string swallows the '>'
        b'FROM:<"a\\>',
        b"FROM:\t<alice@example.org>",
        b'FROM:<"alice>@example.org',  # '>' inside an unterminated quoted-string
    ],
)
def test_mail_from_framing_errors(rest: bytes) -> None:
    assert mail_error(rest) == MAIL_USAGE


@pytest.mark.parametrize(
    "rest",
    [
        b"",
        b"TO:",
        b"TO <bob@example.org>",
        b"FROM:<bob@example.org>",
        b"TO:<bob@example.org",
        b"TO:<bob@example.org>X=1",
        b"TO:bob@example.org NOTIFY=NEVER",
    ],
)
def test_rcpt_to_framing_errors(rest: bytes) -> None:
    assert rcpt_error(rest) == RCPT_USAGE


@pytest.mark.parametrize("rest", [b'TO:"unterminated@example.org', b'TO:"a\\'])
def test_unterminated_quoted_string_without_brackets(rest: bytes) -> None:
    assert rcpt_error(rest) == BAD_RECIPIENT


def test_closing_bracket_inside_quotes_does_not_end_the_path() -> None:
    mailbox, params = parse_rcpt_to(b'TO:<"a>b"@example.org> X=1')
    assert mailbox == Mailbox("a>b", "example.org", quoted=True)
    assert params == {"X": "1"}


# --------------------------------------------------------------------------- null path, postmaster


def test_null_reverse_path() -> None:
    assert parse_mail_from(b"FROM:<>") == (None, {})
    assert parse_mail_from(b"FROM: <> BODY=7BIT") == (None, {"BODY": "7BIT"})


def test_null_forward_path_refused() -> None:
    assert rcpt_error(b"TO:<>") == BAD_RECIPIENT


@pytest.mark.parametrize(
    "rest", [b"TO:<postmaster>", b"TO:<Postmaster>", b"TO:<POSTMASTER>", b"TO: postmaster"]
)
def test_rcpt_special_postmaster(rest: bytes) -> None:
    mailbox, _ = parse_rcpt_to(rest)
    assert mailbox == Mailbox("postmaster", "")
    assert str(mailbox) == "postmaster"
    assert not mailbox.is_address_literal


@pytest.mark.parametrize(
    "rest",
    [
        b"TO:<alice>",
        b'TO:<"postmaster">',  # only the unquoted form is special
        b"TO:<@relay.example:postmaster>",
        b"TO:<postmaster@>",
    ],
)
def test_rcpt_without_domain_refused(rest: bytes) -> None:
    assert rcpt_error(rest) == BAD_RECIPIENT


@pytest.mark.parametrize("rest", [b"FROM:<postmaster>", b"FROM:<alice>", b"FROM:<alice@>"])
def test_mail_without_domain_refused(rest: bytes) -> None:
    assert mail_error(rest) == BAD_SENDER


# --------------------------------------------------------------------------- local parts


@pytest.mark.parametrize(
    "path, local, quoted, text",
    [
        (b'"john doe"@example.org', "john doe", True, '"john doe"@example.org'),
        (b'"a\\"b"@example.org', 'a"b', True, '"a\\"b"@example.org'),
        (b'"a\\\\b"@example.org', "a\\b", True, '"a\\\\b"@example.org'),
        (b'"\\a\\l\\i\\c\\e"@example.org', "alice", True, "alice@example.org"),
        (b'"alice"@example.org', "alice", True, "alice@example.org"),
        (b'"a@b"@example.org', "a@b", True, '"a@b"@example.org'),
        (b'"a..b"@example.org', "a..b", True, '"a..b"@example.org'),
        (b'""@example.org', "", True, '""@example.org'),
        (b"first.last@example.org", "first.last", False, "first.last@example.org"),
        (b"a+tag@example.org", "a+tag", False, "a+tag@example.org"),
        (b"!#$%&'*+-/=?^_`{|}~@example.org", "!#$%&'*+-/=?^_`{|}~", False,
         "!#$%&'*+-/=?^_`{|}~@example.org"),
        (b"CamelCase@example.org", "CamelCase", False, "CamelCase@example.org"),
    ],
)
def test_local_part_forms(path: bytes, local: str, quoted: bool, text: str) -> None:
    mailbox, _ = parse_rcpt_to(b"TO:<" + path + b">")
    assert mailbox.local == local
    assert mailbox.quoted is quoted
    assert mailbox.domain == "example.org"
    assert str(mailbox) == text
    # str() gives a form that parses back to the same address.
    again, _ = parse_rcpt_to(b"TO:<" + text.encode() + b">")
    assert (again.local, again.domain) == (local, "example.org")


@pytest.mark.parametrize(
    "path",
    [
        b".alice@example.org",
        b"alice.@example.org",
        b"al..ice@example.org",
        b"al ice@example.org",
        b"(comment)alice@example.org",
        b"al,ice@example.org",
        b"al[ice@example.org",
        b"al\\ice@example.org",
        b"al:ice@example.org",
        b'"a"b@example.org',  # junk after the quoted-string
        b'"a\x01b"@example.org',  # control character in a quoted-string
        b'"a\\\x01"@example.org',  # escaped control character
        b'"a\x7fb"@example.org',
        b"a\x00b@example.org",
        b"a\x7fb@example.org",
        b"@example.org",
        b"alice@@example.org",
        b"alice@bob@example.org",  # double '@' outside quotes
        b'"alice"@bob@example.org',
    ],
)
def test_local_part_errors(path: bytes) -> None:
    assert rcpt_error(b"TO:<" + path + b">") == BAD_RECIPIENT
    assert mail_error(b"FROM:<" + path + b">") == BAD_SENDER


# --------------------------------------------------------------------------- domains in paths


@pytest.mark.parametrize(
    "domain, expected",
    [
        (b"example.org", "example.org"),
        (b"EXAMPLE.Org", "example.org"),
        (b"example.org.", "example.org"),  # one trailing dot
        (b"localhost", "localhost"),
        (b"a-b.example", "a-b.example"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        (b"1.example", "1.example"),
        (b"[192.0.2.1]", "[192.0.2.1]"),
        (b"[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        (b"[ipv6:2001:DB8:0:0:0:0:0:1]", "[IPv6:2001:db8::1]"),
        (b"[IPV6:::1]", "[IPv6:::1]"),
        (b"[IPv6:::ffff:192.0.2.1]", "[IPv6:::ffff:c000:201]"),
    ],
)
def test_domain_forms(domain: bytes, expected: str) -> None:
    mailbox, _ = parse_rcpt_to(b"TO:<user@" + domain + b">")
    assert mailbox.domain == expected
    assert mailbox.is_address_literal is expected.startswith("[")


@pytest.mark.parametrize(
    "domain",
    [
        b"",
        b".",
        b"example..org",
        b".example.org",
        b"example.org..",
        b"-example.org",
        b"example-.org",
        b"exa_mple.org",
        b"exa mple.org",
        b"192.0.2.1",  # an IP address must be an address literal
        b"xn--zz-.example",  # not valid punycode
        b"[192.0.2.256]",
        b"[192.0.2]",
        b"[192.000.2.1]",
        b"[2001:db8::1]",  # IPv6 without its tag
        b"[IPv6:2001:db8::zz]",
        b"[IPv6:192.0.2.1]",
        b"[IPv6:fe80::1%eth0]",
        b"[tag:content]",  # general address literal
        b"[]",
        b"[192.0.2.1",
        b"192.0.2.1]",
        (b"a" * 64) + b".example",  # label too long
    ],
)
def test_domain_errors(domain: bytes) -> None:
    assert rcpt_error(b"TO:<user@" + domain + b">") == BAD_RECIPIENT
    assert mail_error(b"FROM:<user@" + domain + b">") == BAD_SENDER


# --------------------------------------------------------------------------- source routes


@pytest.mark.parametrize(
    "path",
    [
        b"@a.example:user@c.example",
        b"@a.example,@b.example:user@c.example",
        b"@A.EXAMPLE,@b.example.:user@C.example",
    ],
)
def test_source_route_discarded(path: bytes) -> None:
    mailbox, _ = parse_rcpt_to(b"TO:<" + path + b">")
    assert mailbox == Mailbox("user", "c.example", source_route=True)
    assert str(mailbox) == "user@c.example"


@pytest.mark.parametrize(
    "path",
    [
        b"@a.example:",
        b"@a.example",
        b"@:user@c.example",
        b"@a.example,b.example:user@c.example",
        b"@a.example,:user@c.example",
        b"@a..example:user@c.example",
        b"@[192.0.2.1]:user@c.example",
        b"@a.example:@b.example:user@c.example",
        b"@a.example:user",
    ],
)
def test_source_route_errors(path: bytes) -> None:
    assert rcpt_error(b"TO:<" + path + b">") == BAD_RECIPIENT


def test_source_route_in_mail_from() -> None:
    mailbox, _ = parse_mail_from(b"FROM:<@relay.example:alice@example.org>")
    assert mailbox == Mailbox("alice", "example.org", source_route=True)


# --------------------------------------------------------------------------- non-ASCII


@pytest.mark.parametrize(
    "rest",
    [
        "TO:<jörg@example.org>".encode(),
        "TO:<bob@bücher.example>".encode(),
        '"jörg"@example.org'.join([b"TO:<".decode(), ">"]).encode(),
        "TO:jörg@example.org".encode(),
        b"TO:<\xff@example.org>",
        "TO:<@bücher.example:bob@example.org>".encode(),
    ],
)
def test_non_ascii_refused(rest: bytes) -> None:
    assert rcpt_error(rest) == NON_ASCII
    assert mail_error(b"FROM:" + rest[3:]) == NON_ASCII


def test_non_ascii_in_parameters_is_bad_parameter_syntax() -> None:
    assert rcpt_error("TO:<bob@example.org> X=ä".encode()) == BAD_PARAM


# --------------------------------------------------------------------------- length limits


def test_local_part_64_accepted_65_refused() -> None:
    mailbox, _ = parse_rcpt_to(b"TO:<" + b"a" * 64 + b"@example.org>")
    assert mailbox.local == "a" * 64
    code, status, text = rcpt_error(b"TO:<" + b"a" * 65 + b"@example.org>")
    assert (code, status) == (553, "5.1.3")
    assert "local part" in text and "64" in text
    code, status, text = mail_error(b"FROM:<" + b"a" * 65 + b"@example.org>")
    assert (code, status) == (553, "5.1.7")
    assert "local part" in text


def test_quoted_local_part_is_measured_with_its_quotes() -> None:
    parse_rcpt_to(b'TO:<"' + b"a" * 62 + b'"@example.org>')
    _, _, text = rcpt_error(b'TO:<"' + b"a" * 63 + b'"@example.org>')
    assert "local part" in text


def test_domain_255_within_domain_limit_256_beyond() -> None:
    # A 255-octet domain passes the domain limit; with "x@" and the brackets the path is
    # 259 octets, which is then the limit reported.
    code, status, text = rcpt_error(b"TO:<x@" + label_domain(255).encode() + b">")
    assert (code, status) == (553, "5.1.3")
    assert "domain" not in text and "path" in text
    code, status, text = rcpt_error(b"TO:<x@" + label_domain(256).encode() + b">")
    assert (code, status) == (553, "5.1.3")
    assert "domain" in text and "255" in text
    code, status, text = mail_error(b"FROM:<x@" + label_domain(256).encode() + b">")
    assert (code, status) == (553, "5.1.7")
    assert "domain" in text


def test_path_256_accepted_257_refused() -> None:
    # "<" + 64 + "@" + 189 + ">" = 256 octets
    path = b"a" * 64 + b"@" + label_domain(189).encode()
    assert len(path) + 2 == 256
    mailbox, _ = parse_rcpt_to(b"TO:<" + path + b">")
    assert mailbox.domain == label_domain(189)
    path = b"a" * 64 + b"@" + label_domain(190).encode()
    code, status, text = rcpt_error(b"TO:<" + path + b">")
    assert (code, status) == (553, "5.1.3")
    assert "path" in text and "256" in text
    code, status, text = mail_error(b"FROM:" + path)  # no brackets: measured as if bracketed
    assert (code, status) == (553, "5.1.7")
    assert "path" in text


def test_path_length_counts_the_source_route() -> None:
    route = b"@relay.example:"
    domain = label_domain(189 - len(route)).encode()
    parse_rcpt_to(b"TO:<" + route + b"a" * 64 + b"@" + domain + b">")
    domain = label_domain(190 - len(route)).encode()
    _, _, text = rcpt_error(b"TO:<" + route + b"a" * 64 + b"@" + domain + b">")
    assert "path" in text


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "params, expected",
    [
        (b"", {}),
        (b" SIZE=1000", {"SIZE": "1000"}),
        (b" size=1000 body=8BITMIME", {"SIZE": "1000", "BODY": "8BITMIME"}),
        (b" SMTPUTF8", {"SMTPUTF8": None}),
        (b"   SIZE=1   BODY=7BIT  ", {"SIZE": "1", "BODY": "7BIT"}),
        (b" X-Y-1=a+b/c!~", {"X-Y-1": "a+b/c!~"}),
        (b" 8BITMIME", {"8BITMIME": None}),
        (b" AUTH=<>", {"AUTH": "<>"}),
        (b" ENVID=QQ314159", {"ENVID": "QQ314159"}),
    ],
)
def test_parameters(params: bytes, expected: dict[str, str | None]) -> None:
    assert parse_mail_from(b"FROM:<a@example.org>" + params) == (
        Mailbox("a", "example.org"),
        expected,
    )
    assert parse_rcpt_to(b"TO:<a@example.org>" + params)[1] == expected


@pytest.mark.parametrize(
    "params",
    [
        b" =1",
        b" -SIZE=1",
        b" SI_ZE=1",
        b" SIZE=",  # a value, when given, is not empty
        b" SIZE=1=2",
        b" X=a\x7fb",
        b" X=a\x01b",
        b" X\x00",
        b" X=\xff",
        b" <x@y.example>",
    ],
)
def test_bad_parameters(params: bytes) -> None:
    assert mail_error(b"FROM:<a@example.org>" + params) == BAD_PARAM
    assert rcpt_error(b"TO:<a@example.org>" + params) == BAD_PARAM


@pytest.mark.parametrize(
    ("params", "name"),
    [(b" SIZE=1 SIZE=2", "SIZE"), (b" size=1 SIZE=2", "SIZE"), (b" BODY BODY", "BODY"),
     (b" NOTIFY=NEVER notify=SUCCESS", "NOTIFY")],
)
def test_a_parameter_given_twice_is_named(params: bytes, name: str) -> None:
    with pytest.raises(Refusal) as exc:
        parse_rcpt_to(b"TO:<a@example.org>" + params)
    assert exc.value.reply == replies.DUPLICATE_PARAMETER.format(name=name)
    assert str(exc.value) == f"501 5.5.4 Error: parameter {name} given twice"


def test_bad_address_reported_before_bad_parameter() -> None:
    assert rcpt_error(b"TO:<a@@example.org> =x") == BAD_RECIPIENT


# --------------------------------------------------------------------------- Mailbox


def test_mailbox_properties() -> None:
    assert Mailbox("x", "[192.0.2.1]").is_address_literal
    assert Mailbox("x", "[IPv6:2001:db8::1]").is_address_literal
    assert not Mailbox("x", "example.org").is_address_literal
    for local in ("alice%evil.example", "evil!alice", "a@evil", "%", "!", "@"):
        assert Mailbox(local, "example.org").relay_tokens, local
    assert not Mailbox("alice+tag.x", "example.org").relay_tokens


def test_mailbox_is_frozen_and_hashable() -> None:
    mailbox = Mailbox("alice", "example.org")
    with pytest.raises(AttributeError):
        mailbox.local = "bob"  # type: ignore[misc]
    assert {mailbox, Mailbox("alice", "example.org")} == {mailbox}
    assert Mailbox("a", "b.example", quoted=True) != Mailbox("a", "b.example")


def test_mailbox_str_address_literal_and_postmaster() -> None:
    assert str(Mailbox("x", "[192.0.2.1]")) == "x@[192.0.2.1]"
    assert str(Mailbox("postmaster", "")) == "postmaster"


# --------------------------------------------------------------------------- normalise_domain


@pytest.mark.parametrize(
    "domain, expected",
    [
        ("example.org", "example.org"),
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("localhost", "localhost"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example.", "xn--bcher-kva.example"),
        ("bücher。example", "xn--bcher-kva.example"),  # ideographic full stop
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        ("0-9.example", "0-9.example"),
        ("123.example", "123.example"),
    ],
)
def test_normalise_domain(domain: str, expected: str) -> None:
    assert normalise_domain(domain) == expected
    assert normalise_domain(expected) == expected  # idempotent


def test_normalise_domain_total_length() -> None:
    assert normalise_domain(label_domain(253)) == label_domain(253)
    assert normalise_domain(label_domain(253) + ".") == label_domain(253)
    with pytest.raises(ValueError):
        normalise_domain(label_domain(254))


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "..",
        "example.org..",
        ".example.org",
        "a..b",
        "a" * 64 + ".example",
        "-a.example",
        "a-.example",
        "a_b.example",
        "a b.example",
        "a/b.example",
        "a@b.example",
        "192.0.2.1",
        "example.123",
        "[192.0.2.1]",
        "xn--zz-.example",
        "bü" + "x" * 70 + ".example",  # A-label too long
        "b\u00fccher..example",
    ],
)
def test_normalise_domain_errors(domain: str) -> None:
    with pytest.raises(ValueError):
        normalise_domain(domain)


# --------------------------------------------------------------------------- safe local parts


@pytest.mark.parametrize(
    "local, safe",
    [
        ("alice", True),
        ("Alice.Smith", True),
        ("a+tag", True),
        ("a-b_c", True),
        ("john doe", True),
        ("a.b", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("é" * 32, True),  # 64 octets in UTF-8
        ("é" * 32 + "a", False),  # 65 octets
        ("", False),
        ("a/b", False),
        ("/", False),
        ("..", False),
        ("a..b", False),
        ("../etc", False),
        ("a\\b", False),
        ("a\x00b", False),
        ("a\x01b", False),
        ("a\nb", False),
        ("a\tb", False),
        ("a\x1fb", False),
        ("a\x7fb", False),
        (".", False),
        (".hidden", False),
        ("a.", True),
        ("\ud800", False),  # lone surrogate: not encodable
    ],
)
def test_is_safe_local_part(local: str, safe: bool) -> None:
    assert is_safe_local_part(local) is safe


@pytest.mark.parametrize(
    "text, ok",
    [("a", True), ("a.b", True), ("a..b", False), (".a", False), ("a.", False), ("", False),
     ("a b", False), ("a@b", False), ("a+b=c", True)],
)
def test_is_dot_atom(text: str, ok: bool) -> None:
    assert is_dot_atom(text) is ok


def test_host_domains_are_the_host_then_its_parent() -> None:
    from mailsrv.routing.address import host_domains

    assert host_domains("mx.example.org") == ("mx.example.org", "example.org")
    assert host_domains("localhost") == ("localhost",)
