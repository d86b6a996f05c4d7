"""Configuration: one TOML file turned into frozen dataclasses.

The rest of mailsrv imports from here.  The modules of this package, each one concern:

- :mod:`.schema`: what a configuration is (frozen dataclasses) and the error a bad one gives;
- :mod:`.endpoints`: Twisted endpoint strings (the listeners), checked and read back;
- :mod:`.keys`: what each kind of key takes, and its converter;
- :mod:`.load`: the file read, validated table by table, and the keys checked together;
- :mod:`.directories`: the mailbox root and the queue directory created and probed.
"""

from __future__ import annotations

from mailsrv.config.directories import prepare_directories
from mailsrv.config.endpoints import endpoint_options, tcp_endpoint_for_ssl
from mailsrv.config.load import (
    DEFAULT_CONFIG_PATH,
    demo_config,
    load_config,
    parse_config,
    read_smarthost_password,
)
from mailsrv.config.schema import (
    AuthConfig,
    ChecksConfig,
    Config,
    ConfigError,
    DkimConfig,
    DnsblConfig,
    DomainsConfig,
    GreylistConfig,
    LimitsConfig,
    LmtpDelivery,
    MailboxesConfig,
    QueueConfig,
    RelayConfig,
    SmtpConfig,
    SrsConfig,
    SubmissionConfig,
    TlsConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AuthConfig",
    "ChecksConfig",
    "Config",
    "ConfigError",
    "DkimConfig",
    "DnsblConfig",
    "GreylistConfig",
    "LimitsConfig",
    "DomainsConfig",
    "LmtpDelivery",
    "MailboxesConfig",
    "QueueConfig",
    "RelayConfig",
    "SmtpConfig",
    "SrsConfig",
    "SubmissionConfig",
    "TlsConfig",
    "demo_config",
    "endpoint_options",
    "load_config",
    "parse_config",
    "prepare_directories",
    "read_smarthost_password",
    "tcp_endpoint_for_ssl",
]
