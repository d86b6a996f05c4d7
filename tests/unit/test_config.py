"""Tests for mailsrv.config: TOML -> frozen dataclasses, and the errors a bad file gives.

No reactor, no network: parse_config is fed dicts, load_config small files in tmp_path.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mailsrv.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    DomainsConfig,
    MailboxesConfig,
    QueueConfig,
    RelayConfig,
    SmtpConfig,
    demo_config,
    load_config,
    parse_config,
    prepare_directories,
)
from mailsrv.config import directories as directories_module
from mailsrv.config import load as config_module
from mailsrv.config.tables import TABLES

SOURCE = Path("/etc/mailsrv/mailsrv.toml")
EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "mailsrv.toml"

MINIMAL: dict[str, Any] = {
    "hostname": "mail.example.org",
    "domains": {"local": ["example.org"]},
    "mailboxes": {"root": "/var/mail/mailsrv"},
    "queue": {"path": "/var/spool/mailsrv"},
}


def make(**tables: Any) -> dict[str, Any]:
    """MINIMAL with some tables (or hostname) merged in; a value of None removes the key."""
    data = copy.deepcopy(MINIMAL)
    for name, value in tables.items():
        if value is None:
            data.pop(name, None)
        elif isinstance(value, dict) and isinstance(data.get(name), dict):
            for key, item in value.items():
                if item is None:
                    data[name].pop(key, None)
                else:
                    data[name][key] = item
        else:
            data[name] = value
    return data


def error_for(data: dict[str, Any], source: Path | None = SOURCE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source)
    return info.value


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    config = parse_config(make(), SOURCE)
    assert config.hostname == "mail.example.org"
    assert config.smtp == SmtpConfig()
    assert config.smtp.listen == ("tcp:25",)
    assert config.smtp.max_message_size == 26214400
    assert config.smtp.max_recipients == 100
    assert config.smtp.idle_timeout == 300.0
    assert config.smtp.data_timeout == 600.0
    assert config.smtp.max_connections == 100
    assert config.smtp.max_connections_per_ip == 50
    assert config.smtp.junk_command_limit == 100
    assert config.smtp.max_received_headers == 50
    assert config.smtp.reverse_dns is True
    assert config.domains == DomainsConfig(local=("example.org",))
    assert config.mailboxes == MailboxesConfig(root=Path("/var/mail/mailsrv"))
    assert config.mailboxes.users is None
    assert config.mailboxes.aliases is None
    assert config.mailboxes.recipient_delimiter == "+"
    assert config.queue == QueueConfig(path=Path("/var/spool/mailsrv"))
    assert config.relay == RelayConfig()
    assert config.relay.trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.relay.dns_servers == ()
    assert config.relay.port == 25
    assert config.source == SOURCE
    assert DEFAULT_CONFIG_PATH == Path("/etc/mailsrv/mailsrv.toml")


def test_every_key_can_be_set() -> None:
    config = parse_config(
        make(
            smtp={
                "listen": ["tcp:2525", "tcp6:2525"],
                "max_message_size": 1024,
                "max_recipients": 1,
                "idle_timeout": 1.5,
                "data_timeout": 60,
                "max_connections": 5,
                "max_connections_per_ip": 2,
                "max_received_headers": 30,
                "reverse_dns": False,
            },
            mailboxes={
                "users": "/etc/mailsrv/users",
                "aliases": "/etc/mailsrv/aliases",
                "recipient_delimiter": "",
            },
            relay={
                "trusted_networks": [],
                "dns_servers": ["127.0.0.1:5353"],
                "port": 2500,
            },
        ),
        SOURCE,
    )
    assert config.smtp == SmtpConfig(
        listen=("tcp:2525", "tcp6:2525"),
        max_message_size=1024,
        max_recipients=1,
        idle_timeout=1.5,
        data_timeout=60.0,
        max_connections=5,
        max_connections_per_ip=2,
        max_received_headers=30,
        reverse_dns=False,
    )
    assert isinstance(config.smtp.data_timeout, float)
    assert config.mailboxes.users == Path("/etc/mailsrv/users")
    assert config.mailboxes.aliases == Path("/etc/mailsrv/aliases")
    assert config.mailboxes.recipient_delimiter == ""
    assert config.relay == RelayConfig(
        trusted_networks=(), dns_servers=(("127.0.0.1", 5353),), port=2500
    )


def test_config_is_frozen() -> None:
    config = parse_config(make(), SOURCE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hostname = "other.example"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.smtp.max_recipients = 5  # type: ignore[misc]


def test_hostname_defaults_to_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "Host1.Example.NET.")
    assert parse_config(make(hostname=None), SOURCE).hostname == "host1.example.net"


def test_hostname_default_that_is_not_a_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "build_box")
    err = error_for(make(hostname=None))
    assert err.key == "hostname"
    assert "'build_box'" in err.expected
    assert "getfqdn" in err.expected


# --------------------------------------------------------------------------- wrong values

BAD_VALUES = [
    # (table or None for top level, key, bad value, words the expectation must contain)
    (None, "hostname", 5, "a domain name"),
    (None, "hostname", "", "a domain name"),
    (None, "hostname", "mail_1.example.org", "a domain name"),
    (None, "hostname", ["mail.example.org"], "a domain name"),
    ("smtp", "listen", "tcp:25", "a non-empty list of endpoint strings"),
    ("smtp", "listen", [], "a non-empty list of endpoint strings"),
    ("smtp", "listen", {"port": 25}, "a non-empty list of endpoint strings"),
    ("smtp", "max_message_size", "25M", "an integer >= 1024"),
    ("smtp", "max_message_size", 1023, "an integer >= 1024"),
    ("smtp", "max_message_size", 26214400.0, "an integer >= 1024"),
    ("smtp", "max_recipients", "ten", "an integer >= 1"),
    ("smtp", "max_recipients", 0, "an integer >= 1"),
    ("smtp", "max_recipients", -5, "an integer >= 1"),
    ("smtp", "max_recipients", 10.0, "an integer >= 1"),
    ("smtp", "idle_timeout", "300", "a number of seconds > 0"),
    ("smtp", "idle_timeout", 0, "a number of seconds > 0"),
    ("smtp", "idle_timeout", -1.5, "a number of seconds > 0"),
    ("smtp", "idle_timeout", math.inf, "a number of seconds > 0"),
    ("smtp", "idle_timeout", math.nan, "a number of seconds > 0"),
    ("smtp", "data_timeout", [600], "a number of seconds > 0"),
    ("smtp", "data_timeout", 0.0, "a number of seconds > 0"),
    ("smtp", "max_connections", "100", "an integer >= 1"),
    ("smtp", "max_connections", 0, "an integer >= 1"),
    ("smtp", "max_connections_per_ip", 0, "an integer >= 1"),
    ("smtp", "max_connections_per_ip", "10", "an integer >= 1"),
    ("smtp", "junk_command_limit", 0, "an integer >= 1"),
    ("smtp", "max_received_headers", 0, "an integer >= 1"),
    ("smtp", "max_received_headers", 50.5, "an integer >= 1"),
    ("smtp", "reverse_dns", 1, "true or false"),
    ("smtp", "reverse_dns", "yes", "true or false"),
    ("domains", "local", "example.org", "a non-empty list of domain names"),
    ("domains", "local", [], "a non-empty list of domain names"),
    ("mailboxes", "root", 5, "a path"),
    ("mailboxes", "root", "", "a path"),
    ("mailboxes", "root", ["/var/mail"], "a path"),
    ("mailboxes", "users", True, "a path"),
    ("mailboxes", "users", "", "a path"),
    ("mailboxes", "aliases", 0, "a path"),
    ("mailboxes", "recipient_delimiter", "++", '"" or one of the characters +-_='),
    ("mailboxes", "recipient_delimiter", "#", '"" or one of the characters +-_='),
    ("mailboxes", "recipient_delimiter", 43, '"" or one of the characters +-_='),
    ("queue", "path", 5, "a path"),
    ("queue", "path", "", "a path"),
    ("relay", "trusted_networks", "127.0.0.0/8", "a list of networks"),
    ("relay", "dns_servers", "127.0.0.1", "a list of DNS server addresses"),
    ("relay", "port", 0, "an integer from 1 to 65535"),
    ("relay", "port", 65536, "an integer from 1 to 65535"),
    ("relay", "port", "25", "an integer from 1 to 65535"),
    ("smtp", "auth", "yes", "true or false"),
    ("tls", "cert", 5, "a path"),
    ("tls", "key", "", "a path"),
    ("submission", "listen", "tcp:587", "a list of endpoint strings"),
    ("submission", "check_from_header", 0, "true or false"),
    ("auth", "max_failures", 0, "an integer >= 1"),
    ("auth", "max_failures", 2.5, "an integer >= 1"),
    ("auth", "window", 0, "a number of seconds > 0"),
    ("auth", "lockout", -1, "a number of seconds > 0"),
    ("auth", "failure_delay", -0.5, "a number of seconds >= 0"),
    ("tls_reports", "enabled", "yes", "true or false"),
    ("tls_reports", "hour", 24, "an integer from 0 to 23"),
    ("tls_reports", "organization", "", "a non-empty string"),
    ("tls_reports", "rua", "mailto:tlsrpt@example.org", "a list of mailto: or https: URIs"),
    ("mta_sts", "mode", "strict", 'one of "none", "testing", "enforce"'),
    ("mta_sts", "max_age", 86399, "an integer from 86400 to 31557600"),
    ("mta_sts", "max_age", 31557601, "an integer from 86400 to 31557600"),
]


@pytest.mark.parametrize(("table", "key", "value", "wanted"), BAD_VALUES)
def test_wrong_value(table: str | None, key: str, value: Any, wanted: str) -> None:
    data = make(**({key: value} if table is None else {table: {key: value}}))
    err = error_for(data)
    dotted = key if table is None else f"{table}.{key}"
    assert err.key == dotted
    assert err.file == str(SOURCE)
    assert err.expected.startswith(f"expected {wanted}")
    assert f"got {value!r}" in err.expected
    assert str(err).startswith(f"{SOURCE}: {dotted}: expected ")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("smtp", "max_message_size"),
        ("smtp", "max_recipients"),
        ("smtp", "idle_timeout"),
        ("smtp", "data_timeout"),
        ("smtp", "max_connections"),
        ("smtp", "max_connections_per_ip"),
        ("smtp", "max_received_headers"),
        ("relay", "port"),
    ],
)
@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_number(table: str, key: str, value: bool) -> None:
    # bool is a subclass of int in Python: `max_recipients = true` must still be refused.
    err = error_for(make(**{table: {key: value}}))
    assert err.key == f"{table}.{key}"
    assert err.expected.endswith(f"got {value!r}")


def test_tls_reports_and_mta_sts() -> None:
    config = parse_config(make(), SOURCE)
    assert (config.tls_reports.enabled, config.tls_reports.hour, config.tls_reports.rua) == \
        (False, 0, ())
    assert (config.mta_sts.mode, config.mta_sts.max_age) == ("none", 604800)
    rua = ["mailto:tlsrpt@example.org", "https://reports.example.org:8443/tlsrpt"]
    config = parse_config(make(
        tls_reports={"enabled": True, "hour": 23, "organization": "Example", "contact":
                     "tls@example.org", "rua": rua},
        mta_sts={"mode": "enforce", "max_age": 86400}), SOURCE)
    assert config.tls_reports.rua == tuple(rua) and config.tls_reports.hour == 23
    assert config.mta_sts.mode == "enforce"
    for bad in ("http://reports.example.org/", "mailto:a@b.test,mailto:c@d.test",
                "https://x.test/a;b", "mailto:nobody"):
        err = error_for(make(tls_reports={"rua": ["mailto:ok@example.org", bad]}))
        assert err.key == "tls_reports.rua[1]" and "a mailto: or https: URI" in err.expected


def test_wrong_element_type_names_the_index() -> None:
    err = error_for(make(domains={"local": ["example.org", 7]}))
    assert err.key == "domains.local[1]"
    assert err.expected == "expected a domain name, got 7"


# --------------------------------------------------------------------------- structure


def test_unknown_top_level_key() -> None:
    err = error_for(make(smpt={"listen": ["tcp:25"]}))
    assert err.key == "smpt"
    assert "unknown key" in err.expected
    for allowed in ("hostname", "smtp", "domains", "mailboxes", "queue", "relay"):
        assert allowed in err.expected


def test_unknown_key_in_a_table() -> None:
    err = error_for(make(smtp={"max_recipents": 10}))
    assert err.key == "smtp.max_recipents"
    assert "unknown key" in err.expected
    assert "max_recipients" in err.expected
    assert "listen" in err.expected
    assert str(err).startswith(f"{SOURCE}: smtp.max_recipents: unknown key; allowed keys: ")


def test_unknown_sub_table() -> None:
    err = error_for(make(relay={"tls": {"cert": "x"}}))
    assert err.key == "relay.tls"


def test_table_of_the_wrong_type() -> None:
    err = error_for(make(smtp=5))
    assert err.key == "smtp"
    assert err.expected == "expected a table, got 5"


REQUIRED = [("domains", "local"), ("mailboxes", "root"), ("queue", "path")]


@pytest.mark.parametrize(("table", "key"), REQUIRED)
def test_missing_required_table(table: str, key: str) -> None:
    err = error_for(make(**{table: None}))
    assert err.key == table
    assert "missing required table" in err.expected
    assert key in err.expected


@pytest.mark.parametrize(("table", "key"), REQUIRED)
def test_missing_required_key(table: str, key: str) -> None:
    err = error_for(make(**{table: {key: None}}))
    assert err.key == f"{table}.{key}"
    assert "missing required key" in err.expected


def test_optional_tables_may_be_missing() -> None:
    data = make()
    assert "smtp" not in data and "relay" not in data
    config = parse_config(data, SOURCE)
    assert config.smtp == SmtpConfig()
    assert config.relay == RelayConfig()


def test_empty_optional_table() -> None:
    assert parse_config(make(smtp={}), SOURCE).smtp == SmtpConfig()


# --------------------------------------------------------------------------- files


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL_TOML = """\
hostname = "mail.example.org"
[domains]
local = ["example.org"]
[mailboxes]
root = "/var/mail/mailsrv"
[queue]
path = "/var/spool/mailsrv"
"""


def test_load_config(tmp_path: Path) -> None:
    path = write(tmp_path / "mailsrv.toml", MINIMAL_TOML)
    config = load_config(path)
    assert config == parse_config(make(), path)
    assert config.source == path
    assert load_config(str(path)).source == path


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == "(file)"
    assert err.expected.startswith("a readable TOML file: ")
    assert "No such file or directory" in err.expected
    assert str(err).startswith(f"{path}: (file): a readable TOML file: ")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.key == "(file)"


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "hostname = \n[smtp\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == "(syntax)"
    assert "line 1" in err.expected


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('hostname = "m\xfcller.example"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "(syntax)"


def test_error_message_names_file_key_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path / "mailsrv.toml", MINIMAL_TOML + '[smtp]\nmax_recipients = "ten"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.file, err.key) == (str(path), "smtp.max_recipients")
    assert err.expected == "expected an integer >= 1, got 'ten'"
    assert str(err) == f"{path}: smtp.max_recipients: expected an integer >= 1, got 'ten'"


def test_config_error_attributes() -> None:
    err = ConfigError(Path("/x/y.toml"), "queue.path", "expected a path")
    assert (err.file, err.key, err.expected) == ("/x/y.toml", "queue.path", "expected a path")
    assert str(err) == "/x/y.toml: queue.path: expected a path"
    demo = ConfigError(None, "queue.path", "a directory mailsrv can write: boom")
    assert demo.file == "<built-in demo>"
    assert str(demo) == "<built-in demo>: queue.path: a directory mailsrv can write: boom"


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "etc" / "mailsrv.toml",
        MINIMAL_TOML.replace('root = "/var/mail/mailsrv"', 'root = "mail"\nusers = "users"')
        .replace('"/var/spool/mailsrv"', '"../spool"'),
    )
    config = load_config(path)
    assert config.mailboxes.root == tmp_path / "etc" / "mail"
    assert config.mailboxes.users == tmp_path / "etc" / "users"
    assert config.mailboxes.aliases is None
    assert config.queue.path == tmp_path / "etc" / ".." / "spool"
    assert config.queue.path.resolve() == (tmp_path / "spool").resolve()


def test_relative_config_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = MINIMAL_TOML.replace('"/var/mail/mailsrv"', '"mail"')
    write(tmp_path / "conf" / "mailsrv.toml", text)
    monkeypatch.chdir(tmp_path)
    config = load_config("conf/mailsrv.toml")
    assert config.mailboxes.root == tmp_path / "conf" / "mail"
    assert config.mailboxes.root.is_absolute()


def test_relative_paths_without_source_use_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_config(
        make(
            mailboxes={"root": "mail", "users": "users", "aliases": "sub/aliases"},
            queue={"path": "queue"},
        ),
        None,
    )
    assert config.source is None
    assert config.mailboxes.root == tmp_path / "mail"
    assert config.mailboxes.users == tmp_path / "users"
    assert config.mailboxes.aliases == tmp_path / "sub" / "aliases"
    assert config.queue.path == tmp_path / "queue"


def test_errors_without_source_name_the_demo() -> None:
    err = error_for(make(smtp={"max_recipients": 0}), source=None)
    assert err.file == "<built-in demo>"


# --------------------------------------------------------------------------- domains


def test_domain_normalisation() -> None:
    config = parse_config(
        make(
            hostname="MAIL.Example.ORG.",
            domains={
                "local": [
                    "EXAMPLE.Org",
                    "example.org.",
                    "bücher.example",
                    "BÜCHER.example",
                    "xn--bcher-kva.example",
                    "localhost",
                ]
            },
        ),
        SOURCE,
    )
    assert config.hostname == "mail.example.org"
    assert config.domains.local == ("example.org", "xn--bcher-kva.example", "localhost")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "a..example",
        ".example.org",
        "-a.example",
        "a-.example",
        "under_score.example",
        "sp ace.example",
        "192.0.2.1",
        "[192.0.2.1]",
        "a" * 64 + ".example",
        ("a" * 60 + ".") * 5 + "example",
        "example.org..",
        "user@example.org",
    ],
)
def test_bad_domain(bad: str) -> None:
    err = error_for(make(domains={"local": ["example.org", bad]}))
    assert err.key == "domains.local[1]"
    assert err.expected.startswith(f"expected a domain name, got {bad!r}")


# --------------------------------------------------------------------------- relay


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("2001:DB8::53", ("2001:db8::53", 53)),
        ("[2001:db8:0:0:0:0:0:53]:53", ("2001:db8::53", 53)),
        ("192.0.2.53:65535", ("192.0.2.53", 65535)),
    ],
)
def test_dns_servers(text: str, parsed: tuple[str, int]) -> None:
    config = parse_config(make(relay={"dns_servers": [text]}), SOURCE)
    assert config.relay.dns_servers == (parsed,)


def test_several_dns_servers() -> None:
    config = parse_config(make(relay={"dns_servers": ["127.0.0.1:5353", "[::1]:5353"]}), SOURCE)
    assert config.relay.dns_servers == (("127.0.0.1", 5353), ("::1", 5353))


@pytest.mark.parametrize(
    "bad",
    [
        "ns1.example.org",
        "ns1.example.org:53",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:dns",
        "[127.0.0.1]:53",
        "[::1]:",
        "[::1]:x",
        "[::1",
        "",
        "999.0.0.1",
    ],
)
def test_bad_dns_server(bad: str) -> None:
    err = error_for(make(relay={"dns_servers": ["127.0.0.1", bad]}))
    assert err.key == "relay.dns_servers[1]"
    assert f"got {bad!r}" in err.expected


def test_dns_server_of_the_wrong_type() -> None:
    err = error_for(make(relay={"dns_servers": [53]}))
    assert err.key == "relay.dns_servers[0]"


def test_trusted_networks() -> None:
    config = parse_config(
        make(relay={"trusted_networks": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]}), SOURCE
    )
    assert config.relay.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.7/32"),
    )


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "2001:db8::1/32"])
def test_trusted_network_with_host_bits(bad: str) -> None:
    err = error_for(make(relay={"trusted_networks": ["127.0.0.0/8", bad]}))
    assert err.key == "relay.trusted_networks[1]"
    assert f"got {bad!r}" in err.expected
    assert "host bits set" in err.expected


@pytest.mark.parametrize("bad", ["localhost", "10.0.0.0/33", "", 8])
def test_bad_trusted_network(bad: Any) -> None:
    err = error_for(make(relay={"trusted_networks": [bad]}))
    assert err.key == "relay.trusted_networks[0]"


# --------------------------------------------------------------------------- listen

GOOD_LISTEN = [
    "tcp:25",
    "tcp:0",
    "tcp:65535",
    "tcp:25:interface=127.0.0.1",
    "tcp:2525:interface=127.0.0.1:backlog=10",
    "tcp:interface=192.0.2.1:25",
    "tcp:port=25",
    "tcp:25:192.0.2.1:10",
    "tcp:25:interface=\\:\\:1",
    "tcp6:25",
    "tcp6:25:interface=\\:\\:1",
    "tcp6:587:backlog=5:interface=2001\\:db8\\:\\:25",
    "ssl:465",
    "ssl:465:interface=192.0.2.1:backlog=20",
    "ssl:port=465:interface=\\:\\:1",
    "unix:/run/mailsrv/smtp.sock",
    "unix:/run/mailsrv/smtp.sock:mode=660:backlog=5:lockfile=0",
    "unix:address=/tmp/a\\:b.sock",
]


TLS = {"cert": "/etc/mailsrv/cert.pem", "key": "/etc/mailsrv/key.pem"}


@pytest.mark.parametrize("entry", GOOD_LISTEN)
def test_good_listen_entry(entry: str) -> None:
    # An implicit-TLS listener takes its certificate from [tls].
    config = parse_config(make(smtp={"listen": ["tcp:25", entry]}, tls=TLS), SOURCE)
    assert config.smtp.listen == ("tcp:25", entry)


@pytest.mark.parametrize("entry", [e for e in GOOD_LISTEN if e.startswith("ssl:")])
def test_ssl_listener_is_tcp_under_tls_and_needs_a_certificate(entry: str) -> None:
    from twisted.internet.endpoints import serverFromString

    from mailsrv.config import tcp_endpoint_for_ssl

    tcp = tcp_endpoint_for_ssl(entry)
    assert tcp == "tcp:" + entry[4:]
    endpoint = serverFromString(object(), tcp)
    assert endpoint._port == 465
    err = error_for(make(smtp={"listen": ["tcp:25", entry]}))
    assert err.key == "smtp.listen[1]"
    assert "[tls] cert and key" in err.expected


@pytest.mark.parametrize(
    "entry", [e for e in GOOD_LISTEN if e.startswith(("tcp:", "unix:"))]
)
def test_good_listen_entries_are_accepted_by_twisted(entry: str) -> None:
    # Cross-check the validator's reading of the endpoint grammar against Twisted's own
    # parser (no reactor is needed to build, rather than listen on, an endpoint).
    from twisted.internet.endpoints import serverFromString

    serverFromString(object(), entry)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("", "the type must be one of"),
        ("25", "the type must be one of"),
        ("TCP:25", "the type must be one of"),
        ("udp:53", "the type must be one of"),
        ("systemd:domain=INET:index=0", "the type must be one of"),
        ("tcp", "tcp needs port"),
        ("tcp:", "port must be"),
        ("tcp:smtp", "port must be"),
        ("tcp:-1", "port must be"),
        ("tcp:65536", "port must be"),
        ("tcp:25:interface=localhost", "interface must be an IP address"),
        ("tcp:25:interface=::1", "escape the colons"),  # they split the value
        ("tcp6:25:interface=2001:db8::25", "escape the colons"),
        ("tcp:25:interface=", "interface must be an IP address"),
        ("tcp:25:backlog=0", "backlog must be"),
        ("tcp:25:backlog=many", "backlog must be"),
        ("tcp:25:timeout=5", "unknown option 'timeout'"),
        ("tcp:25:port=26", "port given twice"),
        ("tcp:25:interface=127.0.0.1:interface=127.0.0.2", "interface given twice"),
        ("tcp:25:127.0.0.1:5:extra", "too many plain values"),
        ("tcp:25\\", "lone backslash"),
        ("tcp6:25:interface=\\:\\:1:ssl=yes", "unknown option 'ssl'"),
        ("ssl", "ssl needs port"),
        ("ssl:465:privateKey=k.pem", "privateKey is not taken here: the certificate is [tls]"),
        ("ssl:465:certKey=c.pem", "certKey is not taken here"),
        ("ssl:465:sslmethod=TLS_METHOD", "sslmethod is not taken here"),
        ("ssl:465:verify=yes", "unknown option 'verify'"),
        ("unix", "unix needs address"),
        ("unix:", "address must be"),
        ("unix:/run/s.sock:mode=999", "mode must be"),
        ("unix:/run/s.sock:lockfile=yes", "lockfile must be"),
    ],
)
def test_bad_listen_entry(entry: str, why: str) -> None:
    err = error_for(make(smtp={"listen": ["tcp:25", entry]}))
    assert err.key == "smtp.listen[1]"
    assert err.expected.startswith("expected an endpoint such as 'tcp:25'")
    assert f"got {entry!r}" in err.expected
    assert why in err.expected


def test_listen_entry_of_the_wrong_type() -> None:
    err = error_for(make(smtp={"listen": ["tcp:25", 2525]}))
    assert err.key == "smtp.listen[1]"
    assert err.expected.endswith("got 2525")


# --------------------------------------------------------------------------- directories


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def config_with_dirs(root: Path, queue: Path, source: Path | None = SOURCE) -> Config:
    return parse_config(make(mailboxes={"root": str(root)}, queue={"path": str(queue)}), source)


def test_prepare_directories_creates_them(tmp_path: Path, umask_022: None) -> None:
    root = tmp_path / "var" / "mail" / "mailsrv"
    queue = tmp_path / "spool" / "mailsrv"
    config = config_with_dirs(root, queue)
    prepare_directories(config)
    for directory in (root, root.parent, root.parent.parent, queue, queue.parent):
        assert directory.is_dir()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert list(root.iterdir()) == [] and list(queue.iterdir()) == []  # no probe left behind
    prepare_directories(config)  # existing directories are fine


def test_prepare_directories_keeps_existing_modes(tmp_path: Path) -> None:
    root, queue = tmp_path / "mail", tmp_path / "queue"
    root.mkdir(mode=0o750)
    queue.mkdir()
    os.chmod(root, 0o750)
    prepare_directories(config_with_dirs(root, queue))
    assert stat.S_IMODE(root.stat().st_mode) == 0o750


def test_prepare_directories_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    config = config_with_dirs(tmp_path / "afile" / "mail", tmp_path / "queue")
    with pytest.raises(ConfigError) as info:
        prepare_directories(config)
    err = info.value
    assert (err.file, err.key) == (str(SOURCE), "mailboxes.root")
    assert err.expected.startswith("a directory mailsrv can write: ")
    assert "Not a directory" in err.expected


def test_prepare_directories_queue_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "queue").write_text("not a directory")
    config = config_with_dirs(tmp_path / "mail", tmp_path / "queue", source=None)
    with pytest.raises(ConfigError) as info:
        prepare_directories(config)
    err = info.value
    assert (err.file, err.key) == ("<built-in demo>", "queue.path")
    assert "a directory mailsrv can write: " in str(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_prepare_directories_not_writable(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError) as info:
            prepare_directories(config_with_dirs(root, tmp_path / "queue"))
        assert info.value.key == "mailboxes.root"
        assert "Permission denied" in info.value.expected
    finally:
        root.chmod(0o700)


def test_prepare_directories_probe_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A read-only file system refuses even root; simulate it where the probe is created.
    real_open = os.open

    def read_only(path: Any, *args: Any, **kwargs: Any) -> int:
        if ".mailsrv-probe" in os.fspath(path):
            raise OSError(30, "Read-only file system", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(directories_module.os, "open", read_only)
    with pytest.raises(ConfigError) as info:
        prepare_directories(config_with_dirs(tmp_path / "mail", tmp_path / "queue"))
    assert info.value.key == "mailboxes.root"
    assert "Read-only file system" in info.value.expected


# --------------------------------------------------------------------------- demo and example


def test_demo_config(tmp_path: Path) -> None:
    config = demo_config(tmp_path)
    assert config.hostname == "localhost"
    assert config.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert dataclasses.replace(config.smtp, listen=("tcp:25",), reverse_dns=True) == SmtpConfig()
    assert config.smtp.reverse_dns is False  # loopback clients only: no DNS at all
    assert config.domains.local == ("localhost",)
    assert config.mailboxes == MailboxesConfig(root=tmp_path / "demo-mail" / "mailboxes")
    assert config.mailboxes.users is None and config.mailboxes.aliases is None
    assert config.queue.path == tmp_path / "demo-mail" / "queue"
    assert config.relay == RelayConfig(trusted_networks=())  # the demo never relays
    assert config.source is None
    prepare_directories(config)
    assert (tmp_path / "demo-mail" / "mailboxes").is_dir()
    assert (tmp_path / "demo-mail" / "queue").is_dir()


def test_demo_config_listens_on_loopback_only() -> None:
    config = demo_config(Path("/nonexistent"))
    for entry in config.smtp.listen:
        interface = entry.split("interface=")[1]
        assert ipaddress.ip_address(interface).is_loopback


def test_example_configuration_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.source == EXAMPLE
    assert config.hostname == "mail.example.org"
    assert config.smtp == SmtpConfig()  # the example spells out every default
    assert config.domains.local == ("example.org",)
    assert config.mailboxes == MailboxesConfig(
        root=Path("/var/mail/mailsrv"),
        users=Path("/etc/mailsrv/users"),
        aliases=Path("/etc/mailsrv/aliases"),
    )
    assert config.queue.path == Path("/var/spool/mailsrv")
    assert config.relay == RelayConfig()


def test_tls_and_auth_keys_that_go_together() -> None:
    err = error_for(make(tls={"cert": "/etc/mailsrv/cert.pem"}))
    assert (err.key, err.expected) == ("tls.key", "expected tls.cert and tls.key together")
    err = error_for(make(tls={"key": "/etc/mailsrv/key.pem"}))
    assert err.key == "tls.cert"
    err = error_for(make(submission={"listen": ["tcp:587"]}))
    assert err.key == "submission.listen" and "[tls] cert and key" in err.expected
    err = error_for(make(smtp={"auth": True}))
    assert err.key == "smtp.auth" and "[tls] cert and key" in err.expected
    # AUTH needs passwords, so a users file (the catch-all has none).
    err = error_for(make(tls=TLS, submission={"listen": ["tcp:587"]}))
    assert err.key == "mailboxes.users" and "password hashes" in err.expected
    config = parse_config(make(tls=TLS, submission={"listen": ["tcp:587", "ssl:465"]},
                               mailboxes={"users": "/etc/mailsrv/users"}), SOURCE)
    assert config.auth_enabled and config.tls.enabled
    assert config.submission.listen == ("tcp:587", "ssl:465")
    assert (config.auth.max_failures, config.auth.window, config.auth.lockout) == (5, 600, 900)


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for _cls, keys in TABLES.values():
        for key in keys:
            # Keys without a default value are shown commented out.
            assert f"\n{key} = " in text or f"\n# {key} = " in text, key
    assert "\nhostname = " in text


def test_example_users_and_aliases() -> None:
    etc = EXAMPLE.parent

    def entries(name: str) -> list[str]:
        lines = (etc / name).read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip() and not line.startswith("#")]

    assert entries("users") == ["alice@example.org", "bob@example.org"]
    assert entries("aliases") == [
        "postmaster: alice@example.org",
        "abuse: alice@example.org",
        "sales@example.org: alice@example.org, bob@example.org",
    ]
