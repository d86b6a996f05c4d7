"""Configuration: one TOML file turned into frozen dataclasses.

The rest of mailsrv imports from here; the modules of this package are the steps:
:mod:`.schema` is what a configuration is (frozen dataclasses) and the error a bad one
gives; :mod:`.endpoints` checks and reads Twisted endpoint strings (the listeners);
:mod:`.load` reads the file and validates it table by table.
"""

from __future__ import annotations

from mailsrv.config.endpoints import endpoint_options, tcp_endpoint_for_ssl
from mailsrv.config.load import (
    DEFAULT_CONFIG_PATH,
    demo_config,
    load_config,
    parse_config,
    prepare_directories,
    read_smarthost_password,
)
from mailsrv.config.schema import (
    AuthConfig,
    Config,
    ConfigError,
    DomainsConfig,
    MailboxesConfig,
    QueueConfig,
    RelayConfig,
    SmtpConfig,
    SubmissionConfig,
    TlsConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DomainsConfig",
    "MailboxesConfig",
    "QueueConfig",
    "RelayConfig",
    "SmtpConfig",
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
