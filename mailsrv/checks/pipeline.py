"""
The checks pipeline: what a check sees at each stage of a session, what it may answer, and how
the answers of several checks combine.

Every rule that decides whether a message is taken (relay access, unknown recipients, who may
use which sender, the hop limit, and later DNSBL, SPF, DKIM, DMARC, greylisting, rate limits)
is a *check*: an object with a ``name``, the ``stage`` it runs at, and ``check(facts)``, which
returns a *verdict*.  The protocol and the delivery code run the checks of a stage through a
:class:`Pipeline` and act on its :class:`Outcome`; they hold no rule of their own.  So a rule
is tested as a function of its facts, without a server, and a new one is added by writing one
class and putting it in the list.

Stages, in the order a session reaches them (see docs/design.md for when each runs):

- ``CONNECT``: the client (address, verified reverse name, trusted network);
- ``HELO``: the name the client gave;
- ``MAIL``: the envelope sender;
- ``RCPT``: one recipient, with where it routes to;
- ``HEADER``: the message's header section, read as readers read it;
- ``MESSAGE``: the whole message (its spool file and size, the authentication results,
  rspamd's verdict).

Verdicts: :data:`ACCEPT` (no objection), :class:`Reject` (a 5xx reply), :class:`TempFail` (a
4xx reply), :class:`AddHeaders` (accept, adding header fields to the stored message) and
:class:`FileInto` (accept, into a Maildir++ folder of each local recipient).  The first
``Reject`` or ``TempFail`` of a stage is the answer and stops the stage; ``AddHeaders`` of
every check that ran accumulate in order; the first ``FileInto`` stands.

*Modifiers* (:class:`mailsrv.interfaces.IModifier`) run after the last stage accepted, in the
delivery thread, and may rewrite what is stored or queued (the trace fields before the body,
the envelope sender): signing and sender rewriting belong there.

Pure: no I/O, no reactor.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsrv.interfaces import ICheck, IModifier, IPipeline
from mailsrv.message.headsection import HeaderFacts
from mailsrv.replies import Reply
from mailsrv.routing.address import Mailbox
from mailsrv.routing.router import Target

if TYPE_CHECKING:
    from mailsrv.checks.auth.results import AuthResults
    from mailsrv.checks.dnsbl import Listing
    from mailsrv.checks.rspamd.protocol import Scan, ScanFailure
    from mailsrv.routing.router import Directory

__all__ = [
    "ACCEPT", "Accept", "AddHeaders", "Client", "Draft", "Facts", "FileInto", "Outcome",
    "Pipeline", "Reject", "Stage", "TempFail", "Verdict",
]


class Stage(enum.Enum):
    """Where in the session a check runs; the members are in the order a session reaches them."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    HEADER = "header"
    MESSAGE = "message"


# -- verdicts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accept:
    """No objection."""


#: The one Accept there needs to be.
ACCEPT = Accept()


@dataclass(frozen=True)
class Reject:
    """Refuse for good: ``reply`` is a 5xx reply (from mailsrv.replies).

    ``reason`` is what the log line says instead of the reply, where the reply alone would
    not tell an administrator which rule refused (``"sender not owned"``).
    """

    reply: Reply
    reason: str | None = None

    def __post_init__(self) -> None:
        if not 500 <= self.reply.code <= 599:
            raise ValueError(f"a rejection needs a 5xx reply, not {self.reply.code}")


@dataclass(frozen=True)
class TempFail:
    """Refuse for now (the client tries again later): ``reply`` is a 4xx reply."""

    reply: Reply
    reason: str | None = None

    def __post_init__(self) -> None:
        if not 400 <= self.reply.code <= 499:
            raise ValueError(f"a temporary failure needs a 4xx reply, not {self.reply.code}")


# A header field as stored: a name of printable characters other than colon, a value without
# CR or NUL, continuation lines starting with white space, LF-terminated (the spool's line end).
_FIELD = re.compile(rb"[!-9;-~]+:[^\r\n\0]*\n(?:[ \t][^\r\n\0]*\n)*\Z")


@dataclass(frozen=True)
class AddHeaders:
    """Accept, and add these fields (each one ``b"Name: value\\n"``, LF-terminated, folded
    lines allowed, no CR or NUL) after our ``Received:``."""

    fields: tuple[bytes, ...]

    def __post_init__(self) -> None:
        for field in self.fields:
            if not _FIELD.match(field):
                raise ValueError(f"not one LF-terminated header field: {field!r}")


# A Maildir++ folder name below the INBOX: dot-separated levels of safe characters
# ("Junk", "Lists.python"); nothing that could leave the mailbox or hide a level.
_FOLDER = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z")


@dataclass(frozen=True)
class FileInto:
    """Accept, into the Maildir++ folder ``folder`` (``"Junk"``: ``<mailbox>/.Junk/``)."""

    folder: str

    def __post_init__(self) -> None:
        if not _FOLDER.match(self.folder):
            raise ValueError(f"not a Maildir++ folder name: {self.folder!r}")


Verdict = Union[Accept, Reject, TempFail, AddHeaders, FileInto]


# -- what a check sees ---------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """The client as known when the stage runs."""

    ip: str
    #: ``name[ip]`` as every log line names the client.
    name: str
    #: The forward-confirmed reverse DNS name, None when there is none (or none looked up).
    reverse_name: str | None = None
    #: The address is in relay.trusted_networks.
    trusted_network: bool = False
    #: A submission listener (AUTH required before MAIL).
    submission: bool = False
    #: The users-file address of the authenticated user.
    authenticated_as: str | None = None
    #: The TLS version and cipher, None over plain TCP.
    tls: str | None = None
    #: The HELO/EHLO argument, None before HELO.
    helo: str | None = None
    esmtp: bool = False
    #: What the DNS blocklists said of the address (None: not looked up: no [dnsbl], a
    #: trusted network, or no answer before MAIL).
    blocklist: Listing | None = None

    @property
    def may_relay(self) -> bool:
        """A trusted network, or an authenticated user, may send to any domain."""
        return self.trusted_network or self.authenticated_as is not None


@dataclass(frozen=True)
class Facts:
    """Everything known at a stage: later stages see what earlier ones saw, and more."""

    stage: Stage
    client: Client
    #: The users, aliases and local domains (read only: lookups are pure).
    directory: "Directory"
    #: MAIL and later: the envelope sender (None is the null sender ``<>``).
    sender: Mailbox | None = None
    #: RCPT: the recipient being decided, whether its domain is ours, and where it routes
    #: (mailsrv.checks.policy.route; None: an unknown or unsafe local recipient, or a foreign one
    #: for a client that may not relay).
    recipient: Mailbox | None = None
    recipient_is_local: bool = False
    targets: tuple[Target, ...] | None = None
    #: RCPT and later: the recipients accepted so far, as the client named them.
    recipients: tuple[Mailbox, ...] = ()
    #: RCPT: SPF's result for the sender when it was checked before MAIL's reply (a big
    #: provider's sender, which greylisting skips when it passes), None otherwise.
    sender_spf: str | None = None
    #: HEADER and MESSAGE: the header section as read.
    head: HeaderFacts | None = None
    #: MESSAGE: the spool file (the body as received, LF line ends) and its size.
    body_path: Path | None = None
    size: int = 0
    #: MESSAGE: SPF, DKIM and DMARC results for mail from another server (None: the client
    #: is ours, authenticated or in relay.trusted_networks, or no check is on).
    auth: "AuthResults | None" = None
    #: MESSAGE: rspamd's verdict (mailsrv.checks.rspamd), or why there is none; None: not
    #: scanned ([rspamd] url unset).
    spam: "Scan | ScanFailure | None" = None

    def at(self, stage: Stage, **changes: object) -> "Facts":
        """These facts at a later stage, with what that stage adds."""
        return replace(self, stage=stage, **changes)


# -- combining verdicts --------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the checks of one stage decided together."""

    #: The first Reject or TempFail, None when every check accepted.
    refusal: Reject | TempFail | None = None
    #: The check that refused.
    refused_by: str | None = None
    #: Fields every AddHeaders asked for, in the order the checks ran.
    headers: tuple[bytes, ...] = ()
    #: The first FileInto's folder, None for the INBOX.
    folder: str | None = None

    @property
    def accepted(self) -> bool:
        return self.refusal is None

    def then(self, later: "Outcome") -> "Outcome":
        """This outcome followed by a later stage's: headers accumulate, the first folder and
        the first refusal stand (a refused stage ends the sequence anyway)."""
        if self.refusal is not None:
            return self
        return Outcome(
            refusal=later.refusal, refused_by=later.refused_by,
            headers=self.headers + later.headers,
            folder=self.folder if self.folder is not None else later.folder,
        )


#: Accepted with nothing added.
ACCEPTED = Outcome()


@dataclass(frozen=True)
class Draft:
    """The message as it is about to be stored: what a modifier may change.

    ``prefix`` is the header fields put before the spool body (our ``Received:``, fields the
    checks added, ``Message-ID:``/``Date:`` when missing); the blank line that separates a
    body without a header section is added after the modifiers ran.  ``sender`` is the
    envelope sender for the Return-Path: and the queue (None: ``<>``); ``queue_sender``, when
    set, the queued copy's instead (SRS: mail we forward off-site is sent from our domain,
    while local copies keep the original in Return-Path:).  ``directory`` is the one the
    message was routed with (who is local, the SRS secrets).  A modifier that adds
    a field over the message (a DKIM signature) puts it first in ``prefix``.
    """

    queue_id: str
    hostname: str
    sender: str | None
    prefix: bytes
    head: HeaderFacts
    authenticated_as: str | None = None
    directory: Directory | None = None
    queue_sender: str | None = None
    #: The client as the checks saw it (None: not from a session, or a test that needs none).
    client: Client | None = None
    #: The spool body that follows ``prefix`` (read only: a signer reads it).
    body_path: Path | None = None
    #: The DKIM signatures a modifier added, as ``domain/selector`` (for the log line).
    dkim: tuple[str, ...] = ()
    queue_prefix: bytes = b""
    queued: bool = False


#: What each kind of verdict is called in ``Pipeline.observe`` (the metrics' ``decision``).
DECISIONS: dict[type, str] = {
    Accept: "accept", Reject: "reject", TempFail: "tempfail", AddHeaders: "add_headers",
    FileInto: "file_into",
}


@implementer(IPipeline)
class Pipeline:
    """The checks of every stage, in the order given, and the modifiers, in the order given."""

    def __init__(
        self, checks: Sequence[ICheck] = (), modifiers: Sequence[IModifier] = ()
    ) -> None:
        for check in checks:
            verifyObject(ICheck, check)
            if not isinstance(check.stage, Stage):
                raise TypeError(f"check {check.name}: stage must be a Stage, not {check.stage!r}")
        for modifier in modifiers:
            verifyObject(IModifier, modifier)
        self.checks = tuple(checks)
        self.modifiers = tuple(modifiers)
        self._by_stage = {
            stage: tuple(c for c in self.checks if c.stage is stage) for stage in Stage
        }
        #: Told (check name, stage, decision) of every verdict, in the thread that ran it:
        #: the runtime counts them (mailsrv.metrics). None: nobody listens.
        self.observe: Callable[[str, str, str], None] | None = None

    def checks_at(self, stage: Stage) -> tuple[ICheck, ...]:
        return self._by_stage[stage]

    def run(self, facts: Facts) -> Outcome:
        """Run the checks of ``facts.stage`` in order until one refuses."""
        headers: list[bytes] = []
        folder: str | None = None
        observe = self.observe
        for check in self._by_stage[facts.stage]:
            verdict = check.check(facts)
            if observe is not None:
                observe(check.name, facts.stage.value, DECISIONS.get(type(verdict), "other"))
            if isinstance(verdict, (Reject, TempFail)):
                return Outcome(verdict, check.name, tuple(headers), folder)
            if isinstance(verdict, AddHeaders):
                headers.extend(verdict.fields)
            elif isinstance(verdict, FileInto):
                if folder is None:
                    folder = verdict.folder
            elif not isinstance(verdict, Accept):
                raise TypeError(f"check {check.name} returned {verdict!r}, not a verdict")
        return Outcome(None, None, tuple(headers), folder)

    def run_stages(self, *stages: Facts) -> Outcome:
        """Run several stages in order, each with its facts; the first refusal ends them."""
        outcome = ACCEPTED
        for facts in stages:
            outcome = outcome.then(self.run(facts))
            if not outcome.accepted:
                break
        return outcome

    def modify(self, draft: Draft) -> Draft:
        """Every modifier in turn, each given the previous one's result."""
        for modifier in self.modifiers:
            draft = modifier.modify(draft)
            if not isinstance(draft, Draft):
                raise TypeError(f"modifier {modifier.name} returned {draft!r}, not a Draft")
        return draft
