"""What a configuration is: the frozen dataclasses, and the error a bad one gives.

The dataclasses are the schema: their defaults are the defaults of the keys, a field
without a default is a required key (see :mod:`mailsrv.config.load`), and being frozen
they can be shared by every part of the server without anyone changing them underneath
the others.  Nothing here reads a file or checks a value.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from mailsrv.outbound.retry import DEFAULT_RETRY_SCHEDULE

__all__ = [
    "DEMO_SOURCE",
    "DEFAULT_DKIM_KEYS",
    "AuthConfig",
    "ChecksConfig",
    "Config",
    "ConfigError",
    "DkimConfig",
    "DnsblConfig",
    "GreylistConfig",
    "DomainsConfig",
    "IPNetwork",
    "LimitsConfig",
    "LmtpDelivery",
    "MailboxesConfig",
    "MetricsConfig",
    "QueueConfig",
    "ReportConfig",
    "RelayConfig",
    "RspamdConfig",
    "SmtpConfig",
    "SrsConfig",
    "SubmissionConfig",
    "TlsConfig",
]

#: What ConfigError.file says when the configuration is the built-in demo.
DEMO_SOURCE = "<built-in demo>"


class ConfigError(Exception):
    """A configuration problem found at start-up.

    ``str(err)`` is ``"<file>: <key>: <expected>"``, e.g.
    ``/etc/mailsrv/mailsrv.toml: smtp.max_recipients: expected an integer >= 1, got 'ten'``.
    """

    def __init__(self, file: str | os.PathLike[str] | None, key: str, expected: str) -> None:
        self.file: str = DEMO_SOURCE if file is None else os.fspath(file)
        self.key = key
        self.expected = expected
        super().__init__(f"{self.file}: {key}: {expected}")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SmtpConfig:
    """The SMTP listener and the limits it enforces on every client."""

    listen: tuple[str, ...] = ("tcp:25",)  # Twisted server endpoint strings
    max_message_size: int = 26214400  # bytes, advertised with SIZE
    max_recipients: int = 100  # per transaction; more get 452 4.5.3
    idle_timeout: float = 300.0  # seconds without a command before 421 4.4.2
    data_timeout: float = 600.0  # seconds the whole DATA phase may take
    max_connections: int = 100  # in total
    max_connections_per_ip: int = 50  # trusted_networks are held to the total only
    # NOOP, RSET, VRFY, HELP, HELO, EHLO per session (reset by a delivered message) before
    # each further one counts as an error (Postfix's smtpd_junk_command_limit)
    junk_command_limit: int = 100
    max_received_headers: int = 50  # more Received: hops than this is a loop (554 5.4.6)
    reverse_dns: bool = True  # look up the client's PTR name for Received:
    auth: bool = False  # also offer AUTH here (after STARTTLS), as on the submission ports


@dataclass(frozen=True)
class TlsConfig:
    """The server certificate for STARTTLS and implicit-TLS listeners (re-read on SIGHUP)."""

    cert: Path | None = None  # PEM: the certificate, then its chain (a fullchain.pem)
    key: Path | None = None  # PEM private key

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class SubmissionConfig:
    """Listeners for the users' own mail programs (RFC 6409): AUTH required, over TLS only."""

    listen: tuple[str, ...] = ()  # e.g. ("tcp:587", "ssl:465")
    check_from_header: bool = True  # the From: address must be one the user owns


@dataclass(frozen=True)
class AuthConfig:
    """Brute-force protection for AUTH, per client address."""

    max_failures: int = 5  # failures within ``window`` before the address is locked out
    window: float = 600.0  # seconds
    lockout: float = 900.0  # seconds during which AUTH from that address gets 454 4.7.0
    failure_delay: float = 1.0  # seconds before the first 535; doubles with each failure


@dataclass(frozen=True)
class DomainsConfig:
    """The domains whose mail is delivered here (normalised: lowercase IDNA A-labels)."""

    local: tuple[str, ...]


@dataclass(frozen=True)
class LmtpDelivery:
    """``[mailboxes] delivery = "lmtp:unix:PATH"`` or ``"lmtp:tcp:HOST:PORT"``: local mail is
    handed to Dovecot's LMTP (Sieve, quotas) through the queue, instead of written here."""

    path: Path | None = None  # a Unix socket, or
    host: str = ""  # a TCP host and port
    port: int = 0

    def __str__(self) -> str:
        return f"lmtp:unix:{self.path}" if self.path is not None else \
            f"lmtp:tcp:{self.host}:{self.port}"


@dataclass(frozen=True)
class MailboxesConfig:
    """Where local mail goes and who may receive it."""

    root: Path  # <root>/<domain>/<user>/{tmp,new,cur}
    users: Path | None = None  # None: every safe local part of a local domain is a mailbox
    aliases: Path | None = None
    recipient_delimiter: str = "+"  # "" disables plus-addressing
    delivery: LmtpDelivery | None = None  # "lmtp:..." (None: "maildir", the default)


@dataclass(frozen=True)
class QueueConfig:
    """The durable outbound queue and how long a message may stay in it."""

    path: Path
    # Seconds to wait after the 1st, 2nd, ... failed attempt; the last one repeats.
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    max_age: float = 5 * 86400.0  # then the message is bounced
    delay_warning: float = 0.0  # seconds before the sender is told of a delay; 0: never


@dataclass(frozen=True)
class RelayConfig:
    """Who may relay, and how remote mail is sent."""

    trusted_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    dns_servers: tuple[tuple[str, int], ...] = ()  # empty: the system resolver
    port: int = 25  # port used on MX hosts (tests use another)
    # (host, port) that takes all remote mail instead of the MX hosts; None: MX delivery.
    smarthost: tuple[str, int] | None = None
    smarthost_user: str | None = None  # AUTH on the smarthost (then TLS is required)
    smarthost_password_file: Path | None = None  # first line is the password
    tls: str = "opportunistic"  # "opportunistic", "verify" or "none"
    tls_policy: tuple[tuple[str, str], ...] = ()  # (domain, mode) exceptions to ``tls``
    tls_ca_file: Path | None = None  # CA bundle for "verify"; None: the system's
    # DANE (RFC 7672) for MX hosts with DNSSEC-secure TLSA records; needs dns_servers to be
    # DNSSEC-validating resolvers (their AD bit is trusted)
    dane: bool = False
    max_connections: int = 20  # outgoing connections in total
    max_connections_per_domain: int = 5
    connect_timeout: float = 30.0
    timeout: float = 300.0  # seconds to wait for each reply of a remote server
    # MTA-STS (RFC 8461): honour the policies destination domains publish.
    mta_sts: bool = True
    mta_sts_port: int = 443  # the policy servers' HTTPS port (another one only for tests)

    def tls_mode(self, domain: str) -> str:
        """The TLS mode for one destination domain: its policy entry, or the default."""
        return dict(self.tls_policy).get(domain, self.tls)


#: Where DKIM keys are looked for when the file names no ``[dkim] keys``.
DEFAULT_DKIM_KEYS = Path("/etc/mailsrv/dkim")


@dataclass(frozen=True)
class DkimConfig:
    """The DKIM signing keys: ``<keys>/<domain>/<selector>.key`` (see mailsrv.message.dkimkeys).

    ``keys`` None is the default directory, which may be missing (no signing); a directory
    the file names must exist.  The demo signs nothing (``enabled`` False).
    """

    keys: Path | None = None
    enabled: bool = True

    @property
    def directory(self) -> Path:
        return DEFAULT_DKIM_KEYS if self.keys is None else Path(self.keys)


@dataclass(frozen=True)
class SrsConfig:
    """[srs]: the sender of mail we forward off-site rewritten (mailsrv.routing.srs)."""

    secret_file: Path | None = None  # one secret a line, the first signs; None: no SRS
    domain: str | None = None  # None: the hostname's domain if local, else the first local
    max_age: int = 21  # days a rewritten sender is good for bounces


@dataclass(frozen=True)
class DnsblConfig:
    """[dnsbl]: DNS blocklists and allowlists of client addresses (mailsrv.checks.dnsbl)."""

    zones: tuple[tuple[str, int], ...] = ()  # (zone, weight): none by default
    threshold: int = 1  # a score this high is refused (554 5.7.1)
    allow_zones: tuple[str, ...] = ()  # a client listed here is never refused by a blocklist
    timeout: float = 5.0  # seconds for each zone's answer (then: not listed)

    @property
    def enabled(self) -> bool:
        return bool(self.zones or self.allow_zones)


@dataclass(frozen=True)
class GreylistConfig:
    """[greylist]: unknown (client network, sender, recipient) triplets deferred once
    (mailsrv.checks.greylist); off by default."""

    enabled: bool = False
    delay: float = 300.0  # seconds before a retry passes
    expire: float = 35 * 86400.0  # seconds a triplet or client is remembered unused
    auto_allow: int = 5  # passes after which a client network skips greylisting; 0: never
    path: Path | None = None  # the SQLite file; None: <queue.path>/greylist.sqlite3
    #: Senders in these domains (or below) skip greylisting when their SPF passes: the big
    #: providers retry late and from other addresses, and their mail is rarely spam-software.
    spf_pass_domains: tuple[str, ...] = (
        "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "msn.com",
        "yahoo.com", "aol.com", "icloud.com", "me.com", "mac.com", "gmx.de", "gmx.net",
        "web.de", "proton.me", "protonmail.com", "fastmail.com", "zoho.com", "yandex.ru",
        "mail.ru",
    )


@dataclass(frozen=True)
class LimitsConfig:
    """[limits]: rates no person reaches, which a stolen password or a flooding client does
    (mailsrv.checks.ratelimits); 0 turns a limit off."""

    # messages an authenticated user may have accepted in any 24 hours (mox's default)
    messages_per_day: int = 1000
    recipients_per_hour: int = 500  # recipients of an authenticated user's accepted messages
    connections_per_minute: int = 60  # per client address; relay.trusted_networks exempt


@dataclass(frozen=True)
class ChecksConfig:
    """The authentication of mail from other servers (not authenticated, not in
    relay.trusted_networks): SPF, DKIM, DMARC, and our own domains kept from forgery."""

    spf: bool = True  # SPF (RFC 7208) on the envelope sender, or HELO for <>
    dkim_verify: bool = True  # every DKIM-Signature verified (RFC 6376)
    dmarc: bool = True  # the From: domain's DMARC policy applied (RFC 7489)
    dmarc_reject: bool = True  # p=reject refuses (550 5.7.1); false: into Junk instead
    # MAIL FROM in our domains needs our SPF's pass, From: in our domains an aligned
    # SPF or DKIM identity (550 5.7.1)
    protect_local_domains: bool = True
    dns_timeout: float = 5.0  # seconds per DNS lookup of these checks (then temperror)
    arc: bool = True  # the ARC chain verified (RFC 8617)
    # ARC sealers (d= of the most recent ARC-Seal) whose recorded DKIM/SPF/DMARC pass
    # overrides a DMARC failure and the From: check of protect_local_domains
    arc_trusted_sealers: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.spf or self.dkim_verify or self.dmarc or self.arc


#: What ``[rspamd] on_failure`` takes: accept the message unscanned, or defer it (451).
RSPAMD_ON_FAILURE = ("accept", "tempfail")


@dataclass(frozen=True)
class RspamdConfig:
    """[rspamd]: every message scanned by rspamd (mailsrv.checks.rspamd) when ``url`` is set."""

    url: str | None = None  # "http://127.0.0.1:11333": the normal worker (or the controller)
    password: str | None = None  # sent as Password: (the controller's, if url names it)
    timeout: float = 20.0  # seconds for the whole scan (connect, send, answer)
    on_failure: str = "accept"  # no answer in time: "accept" (logged) or "tempfail" (451)

    @property
    def enabled(self) -> bool:
        return self.url is not None


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: the Prometheus endpoint (mailsrv.metrics), served at ``/metrics``."""

    listen: str | None = None  # a Twisted endpoint, e.g. "tcp:9125:interface=127.0.0.1"; None: off


@dataclass(frozen=True)
class ReportConfig:
    """[report]: a plain-text report to the postmaster once a day (mailsrv.report)."""

    daily: bool = False
    hour: int = 6  # local time at which it is sent: 0-23


@dataclass(frozen=True)
class TlsReportsConfig:
    """[tls_reports]: TLS-RPT (RFC 8460).  ``enabled``: a daily report of our outbound TLS
    sessions to each domain's ``_smtp._tls`` rua (mailsrv.outbound.tlsrpt); ``rua``: where
    others should send theirs about us (printed by ``mailsrv dns``)."""

    enabled: bool = False
    hour: int = 0  # UTC hour at which the last 24 hours are reported (0: the UTC day)
    organization: str | None = None  # organization-name; None: the hostname
    contact: str | None = None  # contact-info; None: postmaster@<hostname>
    rua: tuple[str, ...] = ()  # mailto:/https: URIs for our own _smtp._tls record


#: What [mta_sts] mode may be (RFC 8461 §3.2); "none" publishes nothing.
MTA_STS_MODES = ("none", "testing", "enforce")


@dataclass(frozen=True)
class MtaStsConfig:
    """[mta_sts]: the MTA-STS policy we publish for our domains (``mailsrv dns`` prints the
    ``_mta-sts`` record and the policy file; serving the file over HTTPS is the web server's)."""

    mode: str = "none"
    max_age: int = 604800  # seconds (RFC 8461: at most 31557600)


@dataclass(frozen=True)
class ServerConfig:
    """[server]: how the server runs (mailsrv.procs)."""

    # receiving processes; 0: one per core the server may run on (os.sched_getaffinity);
    # 1: a single process that receives and relays, as before [server] existed
    processes: int = 0

    @property
    def process_count(self) -> int:
        """``processes`` resolved: 0 becomes the number of cores this process may use."""
        import os

        return self.processes or max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Config:
    """The whole configuration.  ``source`` is the file it came from, None for the demo."""

    hostname: str
    smtp: SmtpConfig
    domains: DomainsConfig
    mailboxes: MailboxesConfig
    queue: QueueConfig
    relay: RelayConfig
    tls: TlsConfig = TlsConfig()
    submission: SubmissionConfig = SubmissionConfig()
    auth: AuthConfig = AuthConfig()
    srs: SrsConfig = SrsConfig()
    checks: ChecksConfig = ChecksConfig()
    dnsbl: DnsblConfig = DnsblConfig()
    greylist: GreylistConfig = GreylistConfig()
    limits: LimitsConfig = LimitsConfig()
    dkim: DkimConfig = DkimConfig()
    rspamd: RspamdConfig = RspamdConfig()
    metrics: MetricsConfig = MetricsConfig()
    report: ReportConfig = ReportConfig()
    tls_reports: TlsReportsConfig = TlsReportsConfig()
    mta_sts: MtaStsConfig = MtaStsConfig()
    server: ServerConfig = ServerConfig()
    source: Path | None = None

    @property
    def auth_enabled(self) -> bool:
        """Whether any listener offers AUTH (and so whether passwords matter)."""
        return bool(self.submission.listen) or self.smtp.auth

