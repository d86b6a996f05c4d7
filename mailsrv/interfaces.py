"""
mailsrv's own interfaces: what each part of the server offers the others.

They say what the protocol may call on the intake of a message, what the delivery code may
ask of the thread runners, the relayer and the spare spool files, and what a check or a
modifier of the pipeline must provide.  Each implementation declares its interface with
``@implementer`` and is checked with ``zope.interface.verify.verifyObject`` in the tests
(the pipeline checks every check and modifier it is given), so a method renamed on one side
fails a test instead of a session.

Twisted's ``IMessageDelivery``/``IMessage`` are not used: the protocol never called them
through the interface, their ``helo`` argument was ignored and ``lineReceived`` was never
called (the body is written in blocks).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = [
    "ICheck", "IMessageIntake", "IModifier", "IPipeline", "IRelayer", "ISessionIntake",
    "ISpareSpoolFiles", "IThreadRunner",
]


# -- the intake of a message: what the protocol calls -------------------------------------


class ISessionIntake(Interface):
    """One connection's side of the intake: the client's facts, and MAIL and RCPT decided
    by the checks pipeline.  Refusals are raised as ``mailsrv.replies.Refusal``."""

    client_ip = Attribute("The client's address, as text.")
    submission = Attribute("True on a submission listener: AUTH is required before MAIL.")
    authenticated_as = Attribute("The users-file address once AUTH succeeded, else None.")
    tls = Attribute("The TLS version and cipher once TLS runs, else None.")
    helo = Attribute("The HELO/EHLO argument ('' before).")
    esmtp = Attribute("The client greeted with EHLO.")
    reverse_name = Attribute("The forward-confirmed reverse DNS name, once known, else None.")
    transaction = Attribute("The IMessageIntake MAIL started, or None.")
    client = Attribute("'name[ip]', as every log line names the client.")
    may_relay = Attribute("A trusted network or an authenticated user: any domain may be sent to.")
    protocol = Attribute("The Received: 'with' keyword (RFC 3848).")

    def client_known(timeout):
        """A Deferred that fires once the reverse and blocklist lookups ended, or after
        ``timeout`` seconds."""

    def close():
        """The connection is gone."""

    def greeted(helo, esmtp):
        """The client said HELO (``esmtp`` False) or EHLO with the argument ``helo``."""

    def owns(address):
        """Whether the authenticated user may use the Mailbox ``address`` as a sender."""

    def validateFrom(helo, origin):
        """MAIL: run the connection, HELO and MAIL checks; return the new IMessageIntake."""

    def sender_checked():
        """A Deferred that fires once what RCPT needs of the new transaction's sender beyond
        the MAIL checks is known (SPF, for greylisting's skip), or None when nothing is."""

    def validateTo(user):
        """RCPT: run the recipient checks; add the recipient to the current transaction."""

    def receivedHeader(helo, origin, recipients, *, queue_id=""):
        """Our Received: field for this session's message (bytes, LF-terminated)."""


class IMessageIntake(Interface):
    """One message: its envelope, its spool file while DATA arrives, and its delivery."""

    queue_id = Attribute("The queue id: the 250 reply, Received:, file names, log lines.")
    sender = Attribute("The envelope sender, a Mailbox, or None for <>.")
    recipients = Attribute("The accepted recipients as the client named them (list of Mailbox).")
    targets = Attribute("Where copies go (Target -> the recipient that named it), first first.")
    folders = Attribute("Local Target -> the Maildir++ folder a check filed its copy into.")
    size = Attribute("Octets spooled so far.")
    binary = Attribute("MAIL had BODY=BINARYMIME: spooled as received, made text at the end.")

    def add_recipient(recipient, targets, folder=None):
        """An accepted recipient and its targets (filed into ``folder`` when not None)."""

    def open_spool():
        """DATA: create the spool file; raise Refusal with the reply when refused."""

    def write(data):
        """Append received, dot-unstuffed, LF-terminated data to the spool."""

    def refuse(reason, size):
        """The protocol refused the message while receiving it: log it, keep nothing."""

    def connectionLost():
        """The client went away (or reset) before the end of the message: keep nothing."""

    def eomReceived():
        """The message is complete: a Deferred firing with the queue id once every copy is
        durable, or failing with Refusal (the header and message checks refused, or
        storage failed)."""


# -- the collaborators the runtime holds --------------------------------------------------


class IThreadRunner(Interface):
    """Threads of one role (deliveries, password checks) for blocking work."""

    name = Attribute("The role, in the threads' names ('delivery', 'passwords').")
    size = Attribute("At most this many jobs run at once.")

    def run(f, *args):
        """Call ``f(*args)`` in one of the threads; a Deferred fires with its result on the
        reactor thread (reactor thread only)."""

    def stop(timeout=30.0):
        """Let queued jobs finish (bounded by ``timeout``), then end the threads."""


class IRelayer(Interface):
    """Sends queued messages to their destinations."""

    def add(message):
        """A QueuedMessage just entered the queue (it is durable): deliver it soon."""


class ISpareSpoolFiles(Interface):
    """Spool files made ahead in a thread, so the reactor thread never creates one."""

    def take():
        """A ready (path, fd) open for writing, or None when none is ready right now."""

    def release(path):
        """A transaction is done with its spool file (any thread): reuse it or remove it."""

    def stop():
        """Close and remove the unused files."""


# -- the checks pipeline ------------------------------------------------------------------


class ICheck(Interface):
    """One rule of the checks pipeline (mailsrv.checks.pipeline): pure, fast, never blocking.

    Checks of the connection, HELO, MAIL and RCPT stages run on the reactor thread; those of
    the header and message stages in a delivery thread.
    """

    name = Attribute("A short name for the log lines ('relay_access').")
    stage = Attribute("The mailsrv.checks.pipeline.Stage it runs at.")

    def check(facts):
        """The mailsrv.checks.pipeline.Verdict on these mailsrv.checks.pipeline.Facts."""


class IModifier(Interface):
    """Changes what is stored or queued once every check accepted (signing, sender
    rewriting); runs in a delivery thread."""

    name = Attribute("A short name for the log lines.")

    def modify(draft):
        """The mailsrv.checks.pipeline.Draft to store instead of ``draft``."""


class IPipeline(Interface):
    """The checks of every stage and the modifiers, in order."""

    checks = Attribute("Every ICheck, in order.")
    modifiers = Attribute("Every IModifier, in order.")

    def run(facts):
        """The Outcome of the checks of ``facts.stage``: the first refusal stops them."""

    def run_stages(*stages):
        """The Outcome of several stages run in order, each given as its Facts."""

    def modify(draft):
        """The Draft after every modifier."""
