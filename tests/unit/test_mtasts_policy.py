"""mailsrv.outbound.mtasts.policy and .cache: the TXT record, the policy text, MX matching
(RFC 8461 §3.1, §3.2, §4.1) and the policies kept on disk."""

from __future__ import annotations

import stat

import pytest

from mailsrv.outbound.mtasts.cache import PolicyCache
from mailsrv.outbound.mtasts.policy import (
    MAX_MAX_AGE,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
    pick_txt,
)
from mailsrv.outbound.requiretls import requiretls_refusal

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"


@pytest.mark.parametrize("strings, expected", [
    ([b"v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    ([b"v=STSv1;id=abc"], "abc"),
    ([b"v=STSv1; ", b"id=split1"], "split1"),  # the strings of one record are joined
    ([b"v=STSv1; id=a1; id=b2"], "a1"),  # the first id counts
    ([b"v=STSv1; foo=bar; id=x"], "x"),
])
def test_txt_record(strings, expected) -> None:
    assert parse_txt(strings) == expected


@pytest.mark.parametrize("strings", [
    [b"v=STSv2; id=1"], [b"v=STSv1"], [b"v=STSv1; id="], [b"v=STSv1; id=" + b"a" * 33],
    [b"v=STSv1; id=a-b"], [b"v=STSv1; junk"],
])
def test_malformed_txt_record(strings) -> None:
    with pytest.raises(PolicyError):
        parse_txt(strings)


def test_one_sts_record_among_the_txt_records() -> None:
    assert pick_txt([[b"google-site-verification=x"], [b"v=STSv1; id=7"]]) == "7"
    assert pick_txt([[b"v=spf1 -all"]]) is None
    with pytest.raises(PolicyError):
        pick_txt([[b"v=STSv1; id=1"], [b"v=STSv1; id=2"]])


def test_policy() -> None:
    policy = parse_policy(POLICY, id="x", fetched=100.0)
    assert policy.mode == "enforce" and policy.max_age == 86400
    assert policy.mx == ("mail.example.com", "*.example.net")
    assert policy.lines == ["version: STSv1", "mode: enforce", "mx: mail.example.com",
                            "mx: *.example.net", "max_age: 86400"]
    assert not policy.expired(100.0 + 86399) and policy.expired(100.0 + 86400)
    assert policy.matches("MAIL.example.com.") and policy.matches("mx1.example.net")
    assert not policy.matches("example.net") and not policy.matches("a.b.example.net")


def test_policy_lf_unknown_keys_and_first_of_duplicates() -> None:
    policy = parse_policy("version: STSv1\nmode: testing\nmode: enforce\nfoo: bar\nmx: a.test\n"
                          "max_age: 0\n")
    assert policy.mode == "testing" and policy.max_age == 0


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 60\n").mx == ()


@pytest.mark.parametrize("text", [
    "mode: enforce\nmx: a.test\nmax_age: 60\n",  # no version
    "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 60\n",
    "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 60\n",
    "version: STSv1\nmode: enforce\nmax_age: 60\n",  # no mx
    "version: STSv1\nmode: enforce\nmx: a.test\n",  # no max_age
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
    f"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: {MAX_MAX_AGE + 1}\n",  # one past
    "version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 60\n",
    "version: STSv1\nmode: enforce\nmx: bad_name.test\nmax_age: 60\n",
    "version: STSv1\nmode enforce\nmx: a.test\nmax_age: 60\n",
])
def test_malformed_policy(text) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_the_largest_max_age() -> None:
    text = f"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: {MAX_MAX_AGE}\n"
    assert parse_policy(text).max_age == MAX_MAX_AGE


@pytest.mark.parametrize("pattern, host, expected", [
    ("mx.example.com", "mx.example.com", True),
    ("mx.example.com", "MX.Example.Com.", True),
    ("mx.example.com", "mx2.example.com", False),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.mx.example.com", False),  # one label only
    ("*.example.com", ".example.com", False),
    ("*.example.com", "mx.example.comx", False),
])
def test_mx_matching(pattern, host, expected) -> None:
    assert mx_matches(pattern, host) is expected


def test_cache_round_trip_and_mode(tmp_path) -> None:
    cache = PolicyCache(tmp_path / "mta-sts")
    assert cache.load("example.com") is None
    policy = parse_policy(POLICY, id="abc", fetched=1234.5)
    cache.store("Example.COM.", policy)
    path = tmp_path / "mta-sts" / "example.com.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "mta-sts").stat().st_mode) == 0o700
    assert PolicyCache(tmp_path / "mta-sts").load("example.com") == policy


def test_a_corrupt_cache_file_is_no_policy(tmp_path) -> None:
    cache = PolicyCache(tmp_path)
    (tmp_path / "example.com.json").write_text('{"id": "1", "fetched": 0, "text": "junk"}')
    assert cache.load("example.com") is None
    (tmp_path / "example.com.json").write_text("not json")
    assert cache.load("example.com") is None


@pytest.mark.parametrize("domain", ["../etc", ".hidden", "a/b", ""])
def test_cache_refuses_names_that_are_not_domains(tmp_path, domain) -> None:
    with pytest.raises(ValueError):
        PolicyCache(tmp_path).store(domain, parse_policy(POLICY))


class _Check:
    def __init__(self, verified: bool, result: str | None = None) -> None:
        self.verified, self.result = verified, result


@pytest.mark.parametrize("check, tls, offered, expected", [
    (_Check(True), True, True, None),
    (_Check(True), True, False, "550 5.7.30"),
    (_Check(False, "certificate-host-mismatch"), True, True, "550 5.7.10"),
    (_Check(False), False, True, "550 5.7.10"),
    (None, True, True, "550 5.7.10"),
])
def test_requiretls_verdict(check, tls, offered, expected) -> None:
    reply = requiretls_refusal(check, tls, offered, "mx.test")
    if expected is None:
        assert reply is None
    else:
        assert str(reply).startswith(expected)
        assert reply.permanent


@pytest.mark.parametrize("requiretls, head, expected", [
    (True, b"TLS-Required: No\n", "yes"),  # the parameter wins
    (False, b"Subject: x\nTLS-Required: No\n", "no"),
    (False, b"tls-required:   NO  \r\n", "no"),
    (False, b"TLS-Required:\n No\n", "no"),  # folded
    (False, b"TLS-Required: Yes\n", None),
    (False, b"X-TLS-Required: No\nSubject: TLS-Required: No\n", None),
    (False, b"", None),
])
def test_tls_required_from_mail_and_header(requiretls, head, expected) -> None:
    from mailsrv.outbound.requiretls import tls_required
    assert tls_required(requiretls, head) == expected


def test_envelope_keeps_tls_required() -> None:
    from mailsrv.storage.envelope import decode, encode, new_message
    for value in ("yes", "no", None):
        message = new_message("ABC123", sender="a@b.test", recipients=["c@d.test"], prefix=b"",
                              created=1.0, received_from="x", tls_required=value)
        data = encode(message)
        assert (b'"tls_required"' in data) is (value is not None)
        assert decode(data).tls_required == value
    with pytest.raises(ValueError):
        new_message("ABC123", sender="", recipients=["c@d.test"], prefix=b"", created=1.0,
                    received_from="x", tls_required="maybe")
    bad = encode(new_message("ABC123", sender="", recipients=["c@d.test"], prefix=b"",
                             created=1.0, received_from="x", tls_required="yes"))
    with pytest.raises(ValueError):
        decode(bad.replace(b'"yes"', b'"maybe"'))


def test_requiretls_parameter() -> None:
    from mailsrv.inbound.parameters import check_mail_parameters, parse_mail
    from mailsrv.replies import Refusal
    assert parse_mail(b"FROM:<a@b.test> REQUIRETLS", True, 1000, tls=True)[3] is True
    assert parse_mail(b"FROM:<a@b.test>", True, 1000, tls=True)[3] is False
    with pytest.raises(Refusal) as refused:
        check_mail_parameters({"REQUIRETLS": None}, True, 1000, tls=False)
    assert str(refused.value.reply).startswith("530 5.7.10")
    with pytest.raises(Refusal) as refused:
        check_mail_parameters({"REQUIRETLS": "YES"}, True, 1000, tls=True)
    assert str(refused.value.reply).startswith("501 5.5.4")
    with pytest.raises(Refusal) as refused:
        check_mail_parameters({"REQUIRETLS": None}, False, 1000, tls=True)
    assert str(refused.value.reply).startswith("501 5.5.4")
