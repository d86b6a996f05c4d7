"""The configuration's tables: for each ``[table]`` of the file, its dataclass (mailsrv.config.schema)
and the converter of each of its keys (mailsrv.config.keys, netkeys).  Data only: the reading
and the checks that span tables are mailsrv.config.load's.
"""

from __future__ import annotations

from mailsrv.config import keys, netkeys
from mailsrv.config.schema import (
    MTA_STS_MODES,
    RSPAMD_ON_FAILURE,
    AuthConfig,
    ChecksConfig,
    DkimConfig,
    DnsblConfig,
    DomainsConfig,
    GreylistConfig,
    LimitsConfig,
    MailboxesConfig,
    MetricsConfig,
    MtaStsConfig,
    QueueConfig,
    RelayConfig,
    ReportConfig,
    RspamdConfig,
    ServerConfig,
    SmtpConfig,
    SrsConfig,
    SubmissionConfig,
    TlsConfig,
    TlsReportsConfig,
)
from mailsrv.routing.address import normalise_domain

__all__ = ["TABLES"]


# table name -> (dataclass, its keys).  Required keys are the dataclass fields without a
# default; a table holding a required key is itself required.
TABLES: dict[str, tuple[type, dict[str, keys.Key]]] = {
    "smtp": (
        SmtpConfig,
        {
            "listen": keys.listen(),
            "max_message_size": keys.integer(1024),
            "max_recipients": keys.integer(1),
            "idle_timeout": keys.seconds(),
            "data_timeout": keys.seconds(),
            "max_connections": keys.integer(1),
            "max_connections_per_ip": keys.integer(1),
            "junk_command_limit": keys.integer(1),
            "max_received_headers": keys.integer(1),
            "reverse_dns": keys.boolean(),
            "auth": keys.boolean(),
        },
    ),
    "tls": (TlsConfig, {"cert": keys.path(), "key": keys.path()}),
    "submission": (
        SubmissionConfig,
        {"listen": keys.listen(non_empty=False), "check_from_header": keys.boolean()},
    ),
    "auth": (
        AuthConfig,
        {
            "max_failures": keys.integer(1),
            "window": keys.seconds(),
            "lockout": keys.seconds(),
            "failure_delay": keys.seconds_or_zero(),
        },
    ),
    "checks": (
        ChecksConfig,
        {
            "spf": keys.boolean(),
            "dkim_verify": keys.boolean(),
            "dmarc": keys.boolean(),
            "dmarc_reject": keys.boolean(),
            "protect_local_domains": keys.boolean(),
            "dns_timeout": keys.seconds(),
            "arc": keys.boolean(),
            "arc_trusted_sealers": keys.domain_list(non_empty=False),
        },
    ),
    "dnsbl": (
        DnsblConfig,
        {
            "zones": netkeys.zone_weights(),
            "threshold": keys.integer(1),
            "allow_zones": keys.list_of("a list of DNS zones", "a DNS zone", normalise_domain,
                                        non_empty=False),
            "timeout": keys.seconds(),
        },
    ),
    "greylist": (
        GreylistConfig,
        {
            "enabled": keys.boolean(),
            "delay": keys.seconds(),
            "expire": keys.seconds(),
            "auto_allow": keys.integer(0),
            "path": keys.path(),
            "spf_pass_domains": keys.list_of("a list of domains", "a domain", normalise_domain,
                                             non_empty=False),
        },
    ),
    "limits": (LimitsConfig, {name: keys.integer(0) for name in (
        "messages_per_day", "recipients_per_hour", "connections_per_minute")}),
    "domains": (DomainsConfig, {"local": keys.domain_list()}),
    "mailboxes": (
        MailboxesConfig,
        {
            "root": keys.path(),
            "users": keys.path(),
            "aliases": keys.path(),
            "recipient_delimiter": keys.delimiter(),
            "delivery": netkeys.delivery(),
        },
    ),
    "queue": (
        QueueConfig,
        {
            "path": keys.path(),
            "retry_schedule": keys.seconds_list(),
            "max_age": keys.seconds(),
            "delay_warning": keys.seconds_or_zero(),
        },
    ),
    "relay": (
        RelayConfig,
        {
            "trusted_networks": netkeys.networks(),
            "dns_servers": netkeys.dns_servers(),
            "port": keys.integer(1, 65535),
            "smarthost": netkeys.smarthost(),
            "smarthost_user": keys.text(),
            "smarthost_password_file": keys.path(),
            "tls": keys.choice(*netkeys.TLS_MODES),
            "tls_policy": netkeys.tls_policy(),
            "tls_ca_file": keys.path(),
            "dane": keys.boolean(),
            "max_connections": keys.integer(1),
            "max_connections_per_domain": keys.integer(1),
            "connect_timeout": keys.seconds(),
            "timeout": keys.seconds(),
            "mta_sts": keys.boolean(),
            "mta_sts_port": keys.integer(1, 65535),
        },
    ),
    "srs": (
        SrsConfig,
        {"secret_file": keys.path(), "domain": keys.hostname(), "max_age": keys.integer(1, 1000)},
    ),
    "dkim": (DkimConfig, {"keys": keys.path()}),
    "rspamd": (
        RspamdConfig,
        {
            "url": netkeys.http_url(),
            "password": keys.text(),
            "timeout": keys.seconds(),
            "on_failure": keys.choice(*RSPAMD_ON_FAILURE),
        },
    ),
    "metrics": (MetricsConfig, {"listen": keys.metrics_endpoint()}),
    "report": (ReportConfig, {"daily": keys.boolean(), "hour": keys.integer(0, 23)}),
    "tls_reports": (TlsReportsConfig, {
        "enabled": keys.boolean(), "hour": keys.integer(0, 23), "organization": keys.text(),
        "contact": keys.text(), "rua": keys.report_uris()}),
    "mta_sts": (MtaStsConfig, {"mode": keys.choice(*MTA_STS_MODES),
                               "max_age": keys.integer(86400, 31557600)}),
    "server": (ServerConfig, {"processes": keys.integer(0, 256)}),
}
