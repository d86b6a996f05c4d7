"""
What every session shares, built in one place: configuration, the mail directory, the reactor,
DNS, TLS, the thread runners, the spare spool files, AUTH, the checks pipeline, the DKIM keys,
the relayer.

``Runtime.build`` makes the running server's; tests make one with only what they need (the
others keep their defaults: no TLS, no AUTH, the built-in checks).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads, IReactorTime, IResolver
from twisted.logger import Logger

from mailsrv.accounts.auth import FailureTracker, PasswordChecker
from mailsrv.checks.auth.dmarc import org_domain
from mailsrv.checks.auth.evaluate import Authenticator
from mailsrv.checks.auth.lookups import ThreadDNS
from mailsrv.checks.builtin import builtin_pipeline
from mailsrv.checks.pipeline import Pipeline
from mailsrv.checks.rspamd.client import RspamdClient
from mailsrv.config import Config
from mailsrv.dnsutil import ReverseNames, make_resolver
from mailsrv.inbound.blocklists import Blocklists
from mailsrv.inbound.sendquota import SendQuota
from mailsrv.inbound.tls import ServerTLS
from mailsrv.interfaces import IPipeline, IRelayer, ISpareSpoolFiles, IThreadRunner
from mailsrv.message.dkimkeys import SigningKeys
from mailsrv.metrics import Metrics
from mailsrv.outbound.notice import send_limit_notice
from mailsrv.outbound.tlsrpt.counts import TLSCounts
from mailsrv.routing.router import Directory
from mailsrv.storage.greylist import Greylist
from mailsrv.storage.spoolfiles import SpareSpoolFiles
from mailsrv.workers import DELIVERY_THREADS, PASSWORD_THREADS, ThreadRunner

if TYPE_CHECKING:
    from mailsrv.inbound.session_intake import SessionDelivery

__all__ = ["Runtime"]

log = Logger(namespace="mailsrv")


@dataclass
class Runtime:
    """What every session shares."""

    config: Config
    directory: Directory
    #: The reactor (a task.Clock in tests that need no threads; threads and shutdown
    #: triggers too in the server: see build).
    reactor: IReactorTime
    resolver: IResolver | None = None
    #: The relayer that learns of each newly queued message.
    relayer: IRelayer | None = None
    #: The server TLS context factory, None without [tls].
    tls: ServerTLS | None = None
    #: Failed AUTH per client address (the delay and the lockout), shared by all listeners.
    auth_failures: FailureTracker | None = None
    #: The credentials checker for AUTH (mailsrv.accounts.auth.PasswordChecker), None without AUTH.
    checker: ICredentialsChecker | None = None
    #: Spool files created ahead in a thread (mailsrv.storage.spoolfiles), or None: made at DATA.
    spool_files: ISpareSpoolFiles | None = None
    #: The delivery threads; made on first use when not given.
    workers: IThreadRunner | None = None
    #: The bcrypt threads, None without AUTH.
    password_threads: IThreadRunner | None = None
    #: The clients' reverse names, one lookup per address shared by its connections.
    reverse_names: ReverseNames | None = None
    #: The checks and modifiers every session and message goes through.
    checks: IPipeline | None = None
    #: SPF, DKIM and DMARC for mail from other servers (mailsrv.checks.auth), None: not done.
    authenticator: Authenticator | None = None
    #: The DKIM signing keys (mailsrv.message.dkimkeys), swapped on SIGHUP; None: no signing.
    dkim: SigningKeys | None = None
    #: The DNS blocklist lookups of client addresses, None without [dnsbl] zones.
    blocklists: Blocklists | None = None
    #: The greylisting memory, None without [greylist] enabled.
    greylist: Greylist | None = None
    #: The rspamd client (mailsrv.checks.rspamd), None without ``[rspamd] url``.
    rspamd: RspamdClient | None = None
    #: What each authenticated user sent, against [limits] (None: both limits 0); its clock
    #: is the reactor's.
    send_quota: SendQuota | None = None
    #: The TLS-RPT counts of outbound sessions (mailsrv.outbound.tlsrpt.counts), None without
    #: ``[tls_reports] enabled``.
    tls_counts: TLSCounts | None = None
    #: The server's counters (mailsrv.metrics), in a registry of this runtime's own.
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        if self.reverse_names is None and self.resolver is not None:
            self.reverse_names = ReverseNames(self.resolver)
        limits = self.config.limits
        if self.send_quota is None and (limits.messages_per_day or limits.recipients_per_hour):
            self.send_quota = SendQuota(limits.messages_per_day, limits.recipients_per_hour,
                                        lambda: self.reactor.seconds(), self.notify_send_limit)
        if self.checks is None:
            self.checks = builtin_pipeline(
                self.config, dkim=lambda: self.dkim, greylist=lambda: self.greylist,
                send_quota=lambda: self.send_quota)
        if isinstance(self.checks, Pipeline) and self.checks.observe is None:
            self.checks.observe = self.metrics.decision
        self.metrics.add_state(self)

    @classmethod
    def build(
        cls,
        config: Config,
        directory: Directory,
        reactor: IReactorThreads,
        *,
        tls: ServerTLS | None,
        relayer: Callable[["Runtime"], IRelayer],
        checks: Pipeline | None = None,
        dkim: SigningKeys | None = None,
        spare: str | None = None,
        greylist_owns: Callable[[str], bool] | None = None,
        metrics: Any = None,
    ) -> "Runtime":
        """The running server's runtime: every collaborator made here, from ``config``.

        ``reactor`` is the real one (time, threads, shutdown triggers). ``relayer`` makes the
        relayer from the runtime (it sends through the runtime's threads and resolver).
        ``spare``: the spare spool files' own subdirectory (a receiving process's);
        ``greylist_owns``: the client networks whose greylisting rows it reads (a receiving
        process's); ``metrics``: where the counters go (a receiving process's go to the
        parent: mailsrv.procs.metricsrelay).
        """
        runtime = cls(
            config=config, directory=directory, reactor=reactor,
            resolver=make_resolver(config.relay.dns_servers, reactor), tls=tls,
            spool_files=SpareSpoolFiles(Path(config.queue.path), reactor, subdir=spare),
            workers=ThreadRunner(reactor, DELIVERY_THREADS, "delivery"),
            checks=checks, dkim=dkim, **({} if metrics is None else {"metrics": metrics}),
        )
        grey = config.greylist
        if grey.enabled:
            # Read at start-up (blocking, before anything listens); written behind, in order.
            writer = ThreadRunner(reactor, 1, "greylist")
            runtime.greylist = Greylist(
                grey.path or Path(config.queue.path) / "greylist.sqlite3", grey.expire,
                reactor.seconds, writer.run, owns=greylist_owns)
        dnsbl = config.dnsbl
        if dnsbl.enabled and runtime.resolver is not None:
            runtime.blocklists = Blocklists(
                runtime.resolver, reactor, dict(dnsbl.zones), dnsbl.allow_zones, dnsbl.timeout)
        checks_config = config.checks
        if checks_config.enabled and runtime.resolver is not None:
            runtime.authenticator = Authenticator(
                ThreadDNS(runtime.resolver, reactor, timeout=checks_config.dns_timeout),
                spf=checks_config.spf, dkim=checks_config.dkim_verify,
                dmarc=checks_config.dmarc, arc=checks_config.arc,
                trusted_sealers=checks_config.arc_trusted_sealers,
            )
            if checks_config.dmarc or checks_config.protect_local_domains:
                # The Public Suffix List takes most of a second to read: in a delivery
                # thread now, not in the first message's.
                runtime.workers.run(org_domain, config.hostname)
        if config.rspamd.enabled:
            assert config.rspamd.url is not None
            runtime.rspamd = RspamdClient(config.rspamd.url, reactor, config.rspamd.timeout)
        if config.auth_enabled:
            auth = config.auth
            runtime.auth_failures = FailureTracker(
                auth.max_failures, auth.window, auth.lockout, auth.failure_delay
            )
            runtime.password_threads = ThreadRunner(reactor, PASSWORD_THREADS, "passwords")
            runtime.checker = PasswordChecker(
                lambda: runtime.passwords, runtime.password_threads.run
            )
        if config.tls_reports.enabled:
            # Read at start-up (blocking, before anything listens); written behind, in order.
            runtime.tls_counts = TLSCounts(
                reactor, Path(config.queue.path) / "tlsrpt.json",
                ThreadRunner(reactor, 1, "tlsrpt").run)
        runtime.relayer = relayer(runtime)
        return runtime

    @property
    def passwords(self) -> Mapping[str, str | None]:
        """Lower-case address -> bcrypt hash (None: no login), from the current users file."""
        return self.directory.passwords

    @property
    def incoming_dir(self) -> Path:
        return Path(self.config.queue.path) / "incoming"

    def new_session(self, client_ip: str, submission: bool = False) -> "SessionDelivery":
        from mailsrv.inbound.session_intake import SessionDelivery  # it imports this module

        return SessionDelivery(self, client_ip, submission)

    def may_relay(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(address in network for network in self.config.relay.trusted_networks)

    def notify_send_limit(self, user: str, reason: str, client: str) -> defer.Deferred:
        """Tell the postmaster that ``user`` reached a send limit (a notice stored in a
        delivery thread, as bounces are; a failure is logged, the refusal stands anyway)."""
        def stored(result: Any) -> None:
            to, where = result
            log.info('send limit notice user={user} to=<{to}> reason="{reason}"',
                     user=user, to=to, reason=reason)
            for entry in where.entries if self.relayer is not None else ():
                self.relayer.add(entry)

        def failed(failure: Any) -> None:
            log.failure("send limit notice user={user}: not stored", failure, user=user)

        d = self.in_thread(send_limit_notice, self.config, self.directory, user, reason,
                           client, None, self.dkim)
        return d.addCallbacks(stored, failed)

    def in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run blocking disk work in a delivery thread, never on the reactor thread."""
        if self.workers is None:
            self.workers = ThreadRunner(IReactorThreads(self.reactor), DELIVERY_THREADS, "delivery")
        return self.workers.run(f, *args)
