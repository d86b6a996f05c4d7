"""
The intake of one connection: who the client is, and whether its MAIL and RCPT are accepted.

``SessionDelivery`` (``ISessionIntake``) is one connection's: it knows the client (address,
verified reverse name, whether it may relay) and runs the checks of the connection, HELO, MAIL
and RCPT stages (mailsrv.checks.pipeline) to decide MAIL and RCPT.  MAIL starts a
:class:`~mailsrv.inbound.message_intake.Transaction`, which takes the message itself.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailsrv.checks import policy
from mailsrv.checks.auth.spfcheck import SPFResult, check_spf
from mailsrv.checks.dnsbl import Listing
from mailsrv.checks.greylist import wants_sender_spf
from mailsrv.checks.pipeline import Client, Facts, Stage
from mailsrv.checks.policy import owns_address
from mailsrv.dnsutil import skips_reverse_lookup
from mailsrv.inbound.message_intake import Transaction, bracketed
from mailsrv.interfaces import IPipeline, ISessionIntake
from mailsrv.message import headers
from mailsrv.outbound.lmtpprobe import full_mailbox
from mailsrv.replies import Refusal, Reply
from mailsrv.routing.address import Mailbox
from mailsrv.routing.router import LocalTarget
from mailsrv.runtime import Runtime

__all__ = ["SessionDelivery"]

log = Logger(namespace="mailsrv")


def _fire(d: defer.Deferred) -> None:
    if not d.called:
        d.callback(None)


@implementer(ISessionIntake)
class SessionDelivery:
    """Decides MAIL and RCPT for one connection and remembers the client's facts."""

    def __init__(self, runtime: Runtime, client_ip: str, submission: bool = False) -> None:
        self.runtime = runtime
        self.client_ip = client_ip
        #: On a submission listener: AUTH is required before MAIL.
        self.submission = submission
        self.trusted_network = runtime.may_relay(client_ip)
        #: The users-file address of the authenticated user, once AUTH succeeded.
        self.authenticated_as: str | None = None
        #: "TLSv1.3 TLS_AES_256_GCM_SHA384" once the session runs over TLS.
        self.tls: str | None = None
        self.helo = ""
        self.esmtp = False
        #: The forward-confirmed reverse DNS name of the client, once known.
        self.reverse_name: str | None = None
        self._lookup: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        #: The transaction MAIL started, which RCPT adds to.
        self.transaction: Transaction | None = None
        #: The targets of the recipient validateTo added last (for probe_recipient).
        self._last_targets: tuple[Any, ...] = ()
        config = runtime.config
        if (
            config.smtp.reverse_dns and runtime.reverse_names is not None
            and not skips_reverse_lookup(client_ip, config.relay.trusted_networks)
        ):
            self._lookup = runtime.reverse_names.lookup(client_ip)
            self._lookup.addCallbacks(self._got_reverse_name, lambda failure: None)
        #: What the DNS blocklists say of the address (mailsrv.checks.dnsbl), once known.
        self.blocklist: Listing | None = None
        self._dnsbl: defer.Deferred | None = None
        if runtime.blocklists is not None and not self.trusted_network:
            self._dnsbl = runtime.blocklists.lookup(client_ip)
            self._dnsbl.addCallbacks(self._got_blocklist, lambda failure: None)

    def _got_reverse_name(self, name: str | None) -> None:
        self.reverse_name = name
        self._lookup = None
        self._wake()

    def _got_blocklist(self, listing: Listing) -> None:
        self.blocklist = listing
        self._dnsbl = None
        self._wake()

    def _wake(self) -> None:
        if self._lookup is None and self._dnsbl is None:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                _fire(d)

    def client_known(self, timeout: float) -> defer.Deferred:
        """Fires once the reverse and blocklist lookups have ended, or after ``timeout``
        seconds at most.

        The greeting waits for them (as Postfix's does for the reverse name), so that every
        log line and the Received: field name the client the same way, and a blocklisted
        client is known by MAIL; a slow DNS delays only the banner.
        """
        if self._lookup is None and self._dnsbl is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        timer = self.runtime.reactor.callLater(timeout, _fire, d)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(stop_timer)

    def close(self) -> None:
        """The connection is gone: stop waiting (other connections may still wait)."""
        for lookup in (self._lookup, self._dnsbl):
            if lookup is not None:
                lookup.cancel()
        self._lookup = self._dnsbl = None

    @property
    def client(self) -> str:
        return f"{self.reverse_name or 'unknown'}[{self.client_ip}]"

    @property
    def may_relay(self) -> bool:
        """A trusted network, or an authenticated user, may send to any domain."""
        return self.trusted_network or self.authenticated_as is not None

    @property
    def protocol(self) -> str:
        """The Received: ``with`` keyword (RFC 3848): ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.authenticated_as else "")

    def owns(self, address: Mailbox | None) -> bool:
        """Whether the authenticated user may use ``address`` as a sender."""
        assert self.authenticated_as is not None
        return owns_address(self.authenticated_as, address, self.runtime.directory)

    def greeted(self, helo: str, esmtp: bool) -> None:
        self.helo, self.esmtp = helo, esmtp

    def facts(self) -> Client:
        """The client as the checks see it now."""
        return Client(
            ip=self.client_ip, name=self.client, reverse_name=self.reverse_name,
            trusted_network=self.trusted_network, submission=self.submission,
            authenticated_as=self.authenticated_as, tls=self.tls,
            helo=self.helo or None, esmtp=self.esmtp, blocklist=self.blocklist,
        )

    @property
    def checks(self) -> IPipeline:
        assert self.runtime.checks is not None  # Runtime made the built-in pipeline
        return self.runtime.checks

    def receivedHeader(
        self, helo: Any, origin: Mailbox | None, recipients: list[Mailbox], *, queue_id: str = "",
        smtputf8: bool = False,
    ) -> bytes:
        """Our own Received: field (Twisted's default one is malformed and injectable);
        ``with UTF8SMTP``... (RFC 6531 section 4.3) for a transaction with SMTPUTF8."""
        protocol = self.protocol
        return headers.received_header(
            helo=self.helo,
            client_ip=self.client_ip,
            reverse_name=self.reverse_name,
            hostname=self.runtime.config.hostname,
            protocol=protocol.replace("ESMTP", "UTF8SMTP") if smtputf8 else protocol,
            queue_id=queue_id,
            recipient=str(recipients[0]) if len(recipients) == 1 else None,
            when=datetime.datetime.now(datetime.timezone.utc),
            tls=self.tls,
        )

    def validateFrom(self, helo: Any, origin: Mailbox | None) -> "Transaction":
        """MAIL: start a transaction, or raise the reply of the check that refused.

        The connection and HELO checks run here too, before the MAIL checks: their refusal
        is answered at MAIL (as Postfix's ``smtpd_delay_reject = yes`` does), and they see
        the client as it is by then (TLS, AUTH).
        """
        client = Facts(Stage.CONNECT, self.facts(), self.runtime.directory)
        outcome = self.checks.run_stages(
            client, client.at(Stage.HELO), client.at(Stage.MAIL, sender=origin))
        if outcome.refusal is not None:
            refusal = Refusal(outcome.refusal.reply, outcome.refused_by, outcome.refusal.reason)
            user = f" user={self.authenticated_as}" if self.authenticated_as else ""
            log.info(
                "refused sender client={client}{user} from={sender} {why}",
                client=self.client, user=user, sender=bracketed(origin),
                why=refusal.describe(), check=refusal.check,
            )
            self.runtime.metrics.refused("mail", outcome.refused_by)
            raise refusal
        self.transaction = Transaction(self, origin, outcome)
        return self.transaction

    def sender_checked(self) -> defer.Deferred | None:
        """SPF for a big provider's sender, before MAIL's reply, so that greylisting at RCPT
        can let it through when it passes (mailsrv.checks.greylist): in a delivery thread,
        within [checks] dns_timeout.  None for every other sender, or with no greylisting."""
        runtime, transaction = self.runtime, self.transaction
        authenticator = runtime.authenticator
        if runtime.greylist is None or authenticator is None or transaction is None:
            return None
        sender = str(transaction.sender) if transaction.sender else None
        if not wants_sender_spf(self.facts(), sender, runtime.config.greylist.spf_pass_domains):
            return None

        def found(result: SPFResult) -> None:
            transaction.sender_spf = result.result
            log.info("greylist spf id={id} client={client} from=<{sender}> spf={result}",
                     id=transaction.queue_id, client=self.client, sender=sender,
                     result=result.result)

        def failed(failure: Any) -> None:
            log.warn("greylist spf id={id} failed: {error}", id=transaction.queue_id,
                     error=failure.getErrorMessage())

        d = runtime.in_thread(check_spf, authenticator.dns, self.client_ip, sender,
                              self.helo or None)
        return d.addCallbacks(found, failed)

    def validateTo(self, user: Mailbox) -> Callable[[], "Transaction"]:
        """RCPT: add the recipient to the current transaction, or raise the reply of the check
        that refused (mailsrv.checks.builtin: relay access, unknown recipients)."""
        transaction = self.transaction
        assert transaction is not None, "RCPT before MAIL is refused by the protocol"
        directory = self.runtime.directory
        facts = Facts(
            Stage.RCPT, self.facts(), directory, sender=transaction.sender, recipient=user,
            recipient_is_local=policy.is_local(user, directory),
            targets=policy.route(user, directory, self.may_relay),
            recipients=tuple(transaction.recipients), sender_spf=transaction.sender_spf,
        )
        outcome = self.checks.run(facts)
        if outcome.refusal is not None:
            refusal = Refusal(outcome.refusal.reply, outcome.refused_by, outcome.refusal.reason)
            who = f" user={self.authenticated_as}" if self.authenticated_as else ""
            log.info(
                "refused recipient id={id} client={client}{user} from={sender} to=<{rcpt}> {why}",
                id=transaction.queue_id, client=self.client, user=who,
                sender=bracketed(transaction.sender), rcpt=user, why=refusal.describe(),
                check=refusal.check,
            )
            self.runtime.metrics.refused("rcpt", outcome.refused_by)
            raise refusal
        assert facts.targets is not None, "a recipient without targets is refused by a check"
        transaction.add_recipient(user, facts.targets, outcome)
        self._last_targets = facts.targets
        return lambda: transaction

    def probe_recipient(self, user: Mailbox) -> defer.Deferred | None:
        """With LMTP delivery, after validateTo: a Deferred firing with Dovecot's refusal of a
        full mailbox among the recipient's (the recipient is then withdrawn), or None; None
        at once when there is nothing to ask."""
        target = self.runtime.config.mailboxes.delivery
        transaction = self.transaction
        if target is None or transaction is None:
            return None
        local = [t.address for t in self._last_targets if isinstance(t, LocalTarget)]
        if not local:
            return None
        sender = str(transaction.sender) if transaction.sender else ""
        d = full_mailbox(self.runtime.reactor, target, self.runtime.config.hostname, sender,
                         local)

        def decided(refusal: Reply | None) -> Reply | None:
            if refusal is not None and self.transaction is transaction:
                transaction.withdraw_last_recipient()
                why = Refusal(refusal, check="lmtp_quota").describe()
                log.info(
                    "refused recipient id={id} client={client} from={sender} to=<{rcpt}> {why}",
                    id=transaction.queue_id, client=self.client,
                    sender=bracketed(transaction.sender), rcpt=user, why=why)
            return refusal

        return d.addCallbacks(decided, lambda f: None)
