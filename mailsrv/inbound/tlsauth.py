"""
STARTTLS (RFC 3207) and AUTH (RFC 4954) in the session core: the rules that guard the
credentials.

A part of ``session.SMTPSession`` kept in a module of its own, without I/O like the rest of
it: every command returns its reply (the password check, which runs bcrypt in a thread and
waits out the growing delay after a failure, a Deferred of one). STARTTLS only says that TLS
is to start (``starting_tls``); the connection starts it. AUTH is offered only over TLS; a
failed login counts against the client's address in ``auth.FailureTracker`` (the delay, the
lockout), shared by all of its connections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Union

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsrv import replies
from mailsrv.accounts.auth import login_name
from mailsrv.inbound import sasl
from mailsrv.inbound.framing import CommandFramer
from mailsrv.replies import Reply

if TYPE_CHECKING:
    from mailsrv.inbound.message_intake import Transaction
    from mailsrv.inbound.session_intake import SessionDelivery
    from mailsrv.runtime import Runtime

AuthResult = Union[Reply, "defer.Deferred[Reply]"]

# The namespace these log lines have always had (see session.py).
log = Logger(namespace="mailsrv.smtp.MailsrvESMTP")


class TLSAndAuth:
    """STARTTLS and AUTH for ``SMTPSession``: the attributes below are the session's."""

    __slots__ = ()

    runtime: "Runtime"
    delivery: "SessionDelivery"
    client_ip: str
    submission: bool
    tls_active: bool
    starting_tls: bool
    _framer: CommandFramer
    _describe_tls: Callable[[], str | None]
    _abort_transaction: Callable[[], None]
    _helo_name: str | None
    _esmtp: bool
    _transaction: "Transaction | None"
    _sasl: sasl.Exchange | None
    _error: Callable[[Reply], Reply]

    # -- STARTTLS -------------------------------------------------------------------------

    def do_STARTTLS(self, rest: bytes) -> Reply:
        if self.runtime.tls is None:
            return self._error(replies.TLS_NOT_AVAILABLE)
        if rest:
            return self._error(replies.NO_ARGUMENTS_ALLOWED.format(verb="STARTTLS"))
        if self.tls_active:
            return self._error(replies.TLS_ALREADY_ACTIVE)
        if self._helo_name is None:
            return self._error(replies.NEED_HELO)
        # RFC 3207 §4.2: everything the client said before TLS is forgotten.  Above all,
        # what it pipelined behind STARTTLS in plain text is thrown away, never executed
        # inside the TLS session (CVE-2011-0411), and a new EHLO is required.
        self._framer.clear()
        self._abort_transaction()
        self._helo_name = None
        self._esmtp = False
        self.tls_active = True
        self.starting_tls = True
        log.info("starttls client={client}", client=self.client_ip)
        return replies.READY_FOR_TLS

    def _note_tls(self) -> None:
        """Record the negotiated version and cipher (known once the handshake is done)."""
        if self.tls_active and self.delivery.tls is None:
            self.delivery.tls = self._describe_tls()
            if self.delivery.tls:
                log.info(
                    "tls client={client} tls=\"{tls}\"", client=self.client_ip,
                    tls=self.delivery.tls,
                )
                self.runtime.metrics.tls("inbound", self.delivery.tls)

    # -- AUTH -----------------------------------------------------------------------------

    @property
    def _auth_offered(self) -> bool:
        return self.submission or self.runtime.config.smtp.auth

    def do_AUTH(self, rest: bytes) -> AuthResult:
        if not self._auth_offered:
            return self._error(replies.AUTH_NOT_ENABLED)
        if self._helo_name is None or not self._esmtp:
            return self._error(replies.AUTH_NEEDS_EHLO)
        if not self.tls_active:
            return self._error(replies.AUTH_NEEDS_TLS)
        if self.delivery.authenticated_as is not None:
            return self._error(replies.AUTH_ALREADY_DONE)
        if self._transaction is not None:
            return self._error(replies.AUTH_IN_TRANSACTION)
        failures = self.runtime.auth_failures
        if failures is not None and failures.locked(self.client_ip):
            log.info(
                "auth refused client={client}: locked out after too many failures",
                client=self.delivery.client,
            )
            self.runtime.metrics.auth("locked_out")
            return self._error(replies.AUTH_LOCKED_OUT)
        words = rest.split()
        if not words or len(words) > 2:
            return self._error(replies.AUTH_SYNTAX)
        mechanism = words[0].upper().decode("ascii")
        if mechanism not in sasl.MECHANISMS:
            return self._error(replies.AUTH_MECHANISM_UNKNOWN)
        self._sasl = sasl.Exchange(mechanism)
        if len(words) == 2:
            return self._sasl_response(words[1])  # the initial response (RFC 4954 §4)
        return replies.AUTH_CHALLENGE.format(challenge=self._sasl.first_challenge())

    def _sasl_response(self, line: bytes) -> AuthResult:
        """One response of the exchange in progress: the next challenge, or the check."""
        exchange = self._sasl
        assert exchange is not None
        try:
            challenge = exchange.step(sasl.decode_response(line.strip()))
        except sasl.SASLCancelled:
            self._sasl = None
            return self._error(replies.AUTH_CANCELLED)
        except sasl.SASLError as e:
            self._sasl = None
            log.info(
                "auth malformed client={client} mechanism={mechanism}: {why}",
                client=self.delivery.client, mechanism=exchange.mechanism, why=str(e),
            )
            self.runtime.metrics.auth("malformed")
            return self._error(replies.AUTH_BAD_RESPONSE)
        if challenge is not None:
            return replies.AUTH_CHALLENGE.format(challenge=challenge)
        self._sasl = None
        return self._check_credentials(exchange)

    def _check_credentials(self, exchange: sasl.Exchange) -> AuthResult:
        """Verify in the thread pool; answer 235, or 535 after the growing delay."""
        assert exchange.username is not None and exchange.password is not None
        session, runtime, client_ip = self.delivery, self.runtime, self.client_ip
        address = login_name(exchange.username)
        # Only a known account name is logged: a mistyped password in the user field is not.
        shown = address if address in runtime.passwords else "unknown"
        tracker = runtime.auth_failures
        # The check counts as a failure until it succeeds: parallel connections from one
        # address get no more than max_failures checks between them.
        if tracker is not None and not tracker.begin(client_ip):
            log.info(
                "auth refused client={client}: too many failures (failed or being checked)",
                client=session.client,
            )
            runtime.metrics.auth("locked_out")
            return self._error(replies.AUTH_LOCKED_OUT)
        credentials = UsernamePassword(exchange.username.encode(), exchange.password.encode())
        # maybeDeferred: whatever happens, the reservation ends in one of the callbacks.
        d = defer.maybeDeferred(runtime.checker.requestAvatarId, credentials)

        def succeeded(avatar: str) -> Reply:
            if tracker is not None:
                tracker.succeeded(client_ip)
            session.authenticated_as = avatar
            log.info(
                "auth ok client={client} user={user} mechanism={mechanism}",
                client=session.client, user=avatar, mechanism=exchange.mechanism,
            )
            runtime.metrics.auth("success")
            return replies.AUTH_OK

        def failed(failure: Failure) -> AuthResult:
            if not failure.check(UnauthorizedLogin):
                if tracker is not None:
                    tracker.abandoned(client_ip)
                log.failure("password check failed", failure)
                return replies.AUTH_TEMPORARY
            count = tracker.failed(client_ip) if tracker is not None else 1
            # fail2ban: failregex = auth failed client=\S*\[<HOST>\]
            log.info(
                "auth failed client={client} user={user} mechanism={mechanism} "
                "failures={count}",
                client=session.client, user=shown, mechanism=exchange.mechanism, count=count,
            )
            runtime.metrics.auth("failure")
            if tracker is not None and tracker.locked(client_ip):
                log.info(
                    "auth lockout client={client} seconds={seconds:g}",
                    client=session.client, seconds=tracker.lockout,
                )
                runtime.metrics.auth("lockout")
            delay = tracker.delay(count) if tracker is not None else 0.0
            return task.deferLater(runtime.reactor, delay, self._error, replies.AUTH_FAILED)

        return d.addCallbacks(succeeded, failed)
