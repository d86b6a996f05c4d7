"""The modules of mailsrv.config, each on its own, in-process (test_config.py tests them
together through parse_config and load_config)."""

from __future__ import annotations

from pathlib import Path

import pytest

import mailsrv.config
from mailsrv.config import directories, endpoints, keys, load, netkeys, schema

# What mailsrv, its tools, the plugin and the tests import from mailsrv.config: the package
# re-exports each from the module that defines it, so that no importer depends on the layout.
PUBLIC = {
    "DEFAULT_CONFIG_PATH": load,
    "AuthConfig": schema,
    "ChecksConfig": schema,
    "Config": schema,
    "ConfigError": schema,
    "DkimConfig": schema,
    "DnsblConfig": schema,
    "GreylistConfig": schema,
    "LimitsConfig": schema,
    "DomainsConfig": schema,
    "LmtpDelivery": schema,
    "MailboxesConfig": schema,
    "QueueConfig": schema,
    "RelayConfig": schema,
    "SmtpConfig": schema,
    "SrsConfig": schema,
    "SubmissionConfig": schema,
    "TlsConfig": schema,
    "demo_config": load,
    "endpoint_options": endpoints,
    "load_config": load,
    "parse_config": load,
    "prepare_directories": directories,
    "read_smarthost_password": load,
    "tcp_endpoint_for_ssl": endpoints,
}


def test_package_exports_every_public_name() -> None:
    assert sorted(mailsrv.config.__all__) == sorted(PUBLIC)
    for name, module in PUBLIC.items():
        assert getattr(mailsrv.config, name) is getattr(module, name), name
        assert name in module.__all__, name


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("text", "kind", "options"),
    [
        ("tcp:25", "tcp", {"port": "25"}),
        ("tcp:25:192.0.2.1:10", "tcp", {"port": "25", "interface": "192.0.2.1", "backlog": "10"}),
        ("tcp6:25:5", "tcp6", {"port": "25", "backlog": "5"}),  # tcp6 takes backlog second
        ("tcp:interface=\\:\\:1:25", "tcp", {"port": "25", "interface": "::1"}),
        ("unix:/run/a\\:b.sock:mode=660", "unix", {"address": "/run/a:b.sock", "mode": "660"}),
    ],
)
def test_endpoint_options_names_every_value(text: str, kind: str, options: dict) -> None:
    assert endpoints.check_endpoint(text) == text
    assert endpoints.endpoint_options(text) == (kind, options)


def test_check_endpoint_says_why() -> None:
    with pytest.raises(ValueError, match="escape the colons"):
        endpoints.check_endpoint("tcp:25:interface=::1")
    with pytest.raises(ValueError, match="unknown option 'timeout' for tcp"):
        endpoints.check_endpoint("tcp:25:timeout=5")


@pytest.mark.parametrize("text", [" 25", "+25", "2_5", "\uff12\uff15", "", "65536", "0"])
def test_is_decimal_takes_ascii_digits_in_range_only(text: str) -> None:
    assert not endpoints.is_decimal(text, 1, 65535)
    assert endpoints.is_decimal("25", 1, 65535) and endpoints.is_decimal("65535", 1, 65535)


def test_is_ip_address() -> None:
    assert endpoints.is_ip_address("192.0.2.1") and endpoints.is_ip_address("2001:db8::1")
    assert not endpoints.is_ip_address("localhost")
    assert not endpoints.is_ip_address("192.0.2.1:25")


# --------------------------------------------------------------------------- keys

BASE = Path("/etc/mailsrv")


def test_a_converter_raises_invalid_with_the_value_and_where() -> None:
    with pytest.raises(keys.Invalid) as info:
        keys.seconds_list().convert([60, 0], BASE)
    assert info.value.where == "[1]"
    assert info.value.expected == "expected a number of seconds > 0, got 0"
    with pytest.raises(keys.Invalid) as info:
        netkeys.dns_servers().convert(["192.0.2.53:0"], BASE)
    assert info.value.where == "[0]"
    assert info.value.expected.endswith("(the port must be from 1 to 65535)")


def test_integer_refuses_a_boolean() -> None:
    assert keys.integer(1).convert(1, BASE) == 1
    with pytest.raises(keys.Invalid):
        keys.integer(1).convert(True, BASE)


def test_paths_are_relative_to_the_configuration_file() -> None:
    assert keys.path().convert("users", BASE) == BASE / "users"
    assert keys.path().convert("/var/mail", BASE) == Path("/var/mail")


def test_smarthost_and_tls_policy_normalise_names() -> None:
    assert netkeys.smarthost().convert("SMTP.Example.NET:587", BASE) == ("smtp.example.net", 587)
    assert netkeys.smarthost().convert("[2001:DB8::25]", BASE) == ("2001:db8::25", 25)
    assert netkeys.tls_policy().convert({"Example.COM": "verify"}, BASE) == (
        ("example.com", "verify"),
    )
