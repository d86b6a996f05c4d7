"""
Every SMTP reply mailsrv sends, with its RFC 3463 enhanced status code.

Kept in one table so that the codes stay consistent across the protocol, the policy and the
delivery code, and so that an administrator can read in one place what a client will be told.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_STATUS_RE = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class Reply(NamedTuple):
    """An SMTP reply: one we send, one a remote server sent us, or our verdict in that shape."""

    code: int
    status: str  # enhanced status code, e.g. "5.1.1"
    #: the reply text, lines joined with "\n", without the code (and, for our own replies,
    #: without the enhanced status; a remote server's text is kept as it sent it)
    text: str

    @classmethod
    def from_wire(cls, code: int, text: bytes | str) -> "Reply":
        """A remote server's reply; the enhanced status is derived from the code when absent."""
        raw = text.encode("utf-8", "replace") if isinstance(text, str) else (text or b"")
        found = _STATUS_RE.match(raw)
        if found and found.group(1) == str(code)[:1].encode():
            status = found.group(0).decode("ascii")
        else:
            status = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")
        return cls(code, status, raw.decode("utf-8", "replace"))

    def format(self, **values: str) -> "Reply":
        """This reply with its {placeholders} filled in (for raising, where no values travel)."""
        return self._replace(text=self.text.format(**values))

    @property
    def permanent(self) -> bool:
        return 500 <= self.code <= 599

    @property
    def success(self) -> bool:
        return 200 <= self.code <= 299

    def __str__(self) -> str:
        """One line, with the enhanced code even when the server gave none (for logs, DSNs)."""
        text = " ".join(self.text.split())
        if not text.startswith(self.status):
            text = f"{self.status} {text}".strip()
        return f"{self.code} {text}"


class Refusal(Exception):
    """A command, recipient or message refused: the protocol answers with ``reply``.

    The one exception that carries a reply, raised by the address parser, the relay policy
    and the delivery code alike, so that the protocol has one thing to catch.
    """

    def __init__(self, reply: Reply, check: str | None = None, reason: str | None = None) -> None:
        super().__init__(f"{reply.code} {reply.status} {reply.text}")
        self.reply = reply
        #: The check that refused (mailsrv.checks), None for a protocol or storage refusal.
        self.check = check
        #: What the log line says of why, when the reply alone does not tell an administrator.
        self.reason = reason

    def describe(self) -> str:
        """``check=NAME reason="..."`` for a refusal's log line: the layer and why, in one grep."""
        reason = self.reason or f"{self.reply.code} {self.reply.status} {self.reply.text}"
        reason = reason.replace('"', "'")
        return f'check={self.check or "smtp"} reason="{reason}"'

    @property
    def code(self) -> int:
        return self.reply.code

    @property
    def status(self) -> str:
        return self.reply.status

    @property
    def text(self) -> str:
        return self.reply.text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Refusal):
            return NotImplemented
        return self.reply == other.reply

    def __hash__(self) -> int:
        return hash(self.reply)

    def __repr__(self) -> str:
        return f"Refusal({self.reply!r})"


# Positive replies
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(
    214, "2.0.0",
    "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT. See RFC 5321",
)
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_CHALLENGE = Reply(334, "", "{challenge}")
BYE = Reply(221, "2.0.0", "Bye")

# Sequencing and syntax
COMMAND_UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: command line too long")
BAD_CHARACTERS = Reply(500, "5.5.2", "Error: invalid characters in command")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
NO_ARGUMENTS_ALLOWED = Reply(501, "5.5.4", "Syntax: {verb} takes no arguments")
BANNER = Reply(220, "", "{hostname} ESMTP mailsrv")
HELLO = Reply(250, "", "{hostname} Hello {helo} [{ip}]")  # EHLO: the extensions follow
HELO_NEEDS_DOMAIN = Reply(501, "5.5.4", "Syntax: {verb} domain-or-address-literal")
HELO_BAD_DOMAIN = Reply(501, "5.5.4", "Error: invalid {verb} domain")
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
UNSUPPORTED_PARAMETER = Reply(501, "5.5.4", "Error: unsupported parameter {name}")
PARAMETER_NEEDS_EHLO = Reply(501, "5.5.4", "Error: parameter {name} needs EHLO")
BAD_PARAMETER_VALUE = Reply(501, "5.5.4", "Error: bad value for parameter {name}")
DUPLICATE_PARAMETER = Reply(501, "5.5.4", "Error: parameter {name} given twice")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
# CHUNKING (RFC 3030): the replies to BDAT, and to DATA where BDAT rules it out
CHUNK_RECEIVED = Reply(250, "2.0.0", "Ok: {size} octets received")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA after BDAT in one transaction; send RSET")
# RFC 3030 §3: a BODY=BINARYMIME message comes with BDAT only; the transaction is over.
DATA_AFTER_BINARYMIME = Reply(503, "5.5.1", "Error: DATA after BODY=BINARYMIME; send RSET")
BDAT_AFTER_FAILURE = Reply(503, "5.5.1", "Error: an earlier chunk failed; send RSET")

# Addresses and their parameters (mailsrv.routing.address: the parser knows why a path is wrong)
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
BAD_PARAMETER_SYNTAX = Reply(501, "5.5.4", "Bad parameter syntax")
#: A non-ASCII path in a transaction whose MAIL had no SMTPUTF8 (RFC 6531 section 3.4).
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address without the SMTPUTF8 parameter")
BAD_SENDER = Reply(553, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(553, "5.1.3", "Bad recipient address syntax")
SENDER_TOO_LONG = Reply(
    553, "5.1.7", "Bad sender address syntax: {part} longer than {limit} octets"
)
RECIPIENT_TOO_LONG = Reply(
    553, "5.1.3", "Bad recipient address syntax: {part} longer than {limit} octets"
)

# Recipients (mailsrv.checks.policy)
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
MAILBOX_NOT_ALLOWED = Reply(553, "5.1.3", "Mailbox name not allowed")
USER_UNKNOWN = Reply(550, "5.1.1", "User unknown in local recipient table")
#: A client that sent before the greeting (mailsrv.inbound.session, postscreen's pregreet).
EARLY_TALKER = Reply(554, "5.5.1", "Error: protocol error: talked before the greeting")
#: An unknown (client network, sender, recipient) triplet's first attempt (greylisting).
GREYLISTED = Reply(451, "4.7.1", "Greylisted: please try again in {seconds} seconds")
#: An authenticated user past [limits] messages_per_day / recipients_per_hour (a stolen
#: password?): deferred, so nothing is lost if it is a person (mailsrv.checks.ratelimits).
SEND_LIMIT_MESSAGES = Reply(
    451, "4.7.0", "Error: sending limit reached ({limit} messages in 24 hours); try again later"
)
SEND_LIMIT_RECIPIENTS = Reply(
    451, "4.7.0", "Error: sending limit reached ({limit} recipients in an hour); try again later"
)
#: A client address past [limits] connections_per_minute.
TOO_MANY_CONNECTIONS_RATE = Reply(
    421, "4.7.0", "Error: too many connections from your address in a minute; try again later"
)
#: A client a DNS blocklist lists (mailsrv.checks.dnsbl), as Postfix words it.
DNSBL_LISTED = Reply(554, "5.7.1", "Service unavailable; client [{ip}] blocked using {zones}")
#: A bounce to an SRS address we did not make, or made more than srs.max_age days ago.
SRS_INVALID = Reply(550, "5.7.1", "Error: {reason}: not a sender address this server forwarded for")

# TLS and AUTH (RFC 3207, RFC 4954)
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "Error: REQUIRETLS needs a TLS session")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "Error: TLS not available")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
AUTH_ALREADY_DONE = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Error: encryption required for authentication (STARTTLS)")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Error: unrecognized authentication type")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Error: cannot decode response")
AUTH_CANCELLED = Reply(501, "5.7.0", "Error: authentication cancelled")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
AUTH_LOCKED_OUT = Reply(
    454, "4.7.0", "Error: too many failed authentication attempts; try again later"
)
AUTH_TEMPORARY = Reply(454, "4.7.0", "Error: temporary authentication failure")
AUTH_REQUIRED = Reply(530, "5.7.0", "Error: authentication required")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Error: sender address <{sender}> not owned by user {user}")
FROM_NOT_OWNED = Reply(
    553, "5.7.1", "Error: {field}: header address <{address}> not owned by user {user}"
)
HEADER_AMBIGUOUS = Reply(
    554, "5.6.0", "Error: malformed header section ({reason}); message refused"
)
HEADER_TOO_LONG = Reply(
    552, "5.3.4", "Error: header section longer than {limit} octets; message refused"
)

# Mail authentication of other servers' mail (mailsrv.checks.auth): answered after the final dot
DMARC_REJECTED = Reply(
    550, "5.7.1", "Error: refused by the DMARC policy of {domain} (p=reject): {reason}"
)
LOCAL_SENDER_FORGED = Reply(
    550, "5.7.1",
    "Error: sender address <{sender}> is in our domain {domain}, whose SPF record does not "
    "authorize [{ip}] (spf={result})",
)
LOCAL_FROM_FORGED = Reply(
    550, "5.7.1",
    "Error: From: address in our domain {domain}, but the message is neither DKIM- nor "
    "SPF-aligned with it",
)
AUTH_DNS_TEMPORARY = Reply(
    451, "4.7.1",
    "Error: cannot verify the sender of {domain} now (temporary DNS failure); try again later",
)

# The content filter (rspamd, mailsrv.checks.rspamd): answered after the final dot
SPAM_REJECTED = Reply(550, "5.7.1", "Error: message refused as spam: {message}")
SPAM_DEFERRED = Reply(451, "4.7.1", "Error: message deferred by the spam filter: {message}")
SPAM_FILTER_UNAVAILABLE = Reply(
    451, "4.7.1", "Error: the spam filter cannot check the message now; try again later"
)

# Limits
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
SIZE_EXCEEDS_LIMIT = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: message line longer than 1000 octets")
BARE_LINE_END = Reply(554, "5.6.0", "Error: bare CR or LF in message; message refused")
BINARYMIME_NOT_CONVERTED = Reply(
    554, "5.6.0", "Error: binary MIME message cannot be made into text ({reason}); message refused")
BARE_LINE_END_COMMAND = Reply(421, "4.5.2", "Error: bare CR or LF in command; closing connection")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many Received: headers (mail loop?)")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded; closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections; try again later")
TOO_MANY_CONNECTIONS_FROM_IP = Reply(
    421, "4.7.0", "Error: too many connections from your address; try again later"
)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors; closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Error: server shutting down; try again later")
#: [server] processes > 1: the receiving process this connection goes to is being restarted.
PROCESS_UNAVAILABLE = Reply(421, "4.3.2", "Error: service temporarily unavailable; try again later")

# Delivery
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing; try again later")
DISK_FULL = Reply(452, "4.3.1", "Error: insufficient system storage; try again later")

# Our own verdicts on outbound messages (mailsrv.outbound.smtpclient, mailsrv.outbound.outgoing), recorded per
# recipient in the same shape as a remote server's reply; session-level trouble defers.
GREETS_AS_OURSELVES = Reply(554, "5.4.6", "{name} greets with our own name: mail loop")
CANNOT_PREPARE = Reply(451, "4.3.0", "cannot prepare the message: {error}")
CANNOT_READ_QUEUED = Reply(451, "4.3.0", "cannot read the queued message: {error}")
CANNOT_CONVERT_8BIT = Reply(
    554, "5.6.3", "the message has 8-bit content, the receiving server does not accept "
    "8BITMIME, and it cannot be converted to 7 bits: {error}"
)
#: SMTPUTF8 (RFC 6531) needed and the next hop does not offer it (mailsrv.outbound.utf8).
UTF8_ADDRESS_NOT_OFFERED = Reply(
    553, "5.6.7", "{peer} does not offer SMTPUTF8, needed for the non-ASCII address <{address}>: "
    "not sent"
)
UTF8_HEADER_NOT_OFFERED = Reply(
    554, "5.6.9", "the message has UTF-8 header fields (SMTPUTF8) and {peer} does not offer "
    "SMTPUTF8; we do not downgrade it (RFC 6857): not sent"
)
TOO_BIG_FOR_PEER = Reply(
    552, "5.3.4", "message size {size} exceeds the size limit {limit} of {peer}: not sent"
)
SESSION_FAILED = Reply(451, "4.4.2", "{reason}")  # before the greeting, or no reply code
SESSION_REFUSED = Reply(451, "4.0.0", "{reason}")  # a permanent refusal after the greeting
RELAY_INTERRUPTED = Reply(451, "4.4.2", "{where}: {problem}")  # broken off after MAIL FROM
RELAY_UNREACHABLE = Reply(451, "4.4.1", "{problem}")  # no host of the destination answered
# DANE (RFC 7672): the last host tried failed its TLSA records (lookup, STARTTLS, certificate)
DANE_FAILED = Reply(451, "4.7.5", "{problem}")

# MTA-STS (RFC 8461, mailsrv.outbound.mtasts): a domain's "enforce" policy not met defers the
# message (4.7.x: never sent in clear nor to an impostor); the RFC names no codes: 4.7.0 for an
# MX the policy does not list, 4.7.4 for STARTTLS missing (RFC 3463 "security features not
# supported"), 4.7.5 for a certificate that fails (as Postfix).
STS_NO_MATCHING_MX = Reply(
    451, "4.7.0", "the MTA-STS policy of {domain} (enforce) allows none of its MX hosts "
    "({hosts}): not sent"
)
STS_NO_STARTTLS = Reply(
    451, "4.7.4", "{host} does not offer STARTTLS, required by the MTA-STS policy of {domain} "
    "(enforce): not sent"
)
STS_CERTIFICATE = Reply(
    451, "4.7.5", "the certificate of {host} fails the MTA-STS policy of {domain} (enforce): "
    "{result}: not sent"
)
# REQUIRETLS (RFC 8689): a message that must go over verified TLS to a server that offers
# REQUIRETLS too; bounced when no host of its destination does (5.7.30 is the RFC's code
# for the missing extension, 5.7.10 "encryption needed" for missing or unverified TLS).
REQUIRETLS_NOT_OFFERED = Reply(
    550, "5.7.30", "REQUIRETLS support required: {peer} does not offer REQUIRETLS, which the "
    "sender required: not sent"
)
REQUIRETLS_UNVERIFIED = Reply(
    550, "5.7.10", "the sender required verified TLS (REQUIRETLS) and {peer} has none "
    "({reason}): not sent"
)

# No host to deliver to (mailsrv.outbound.mx): 5xx bounces the recipients, 4xx keeps them queued.
BAD_ADDRESS_LITERAL = Reply(550, "5.1.2", "bad address literal {domain}")
LOOPS_BACK = Reply(550, "5.4.6", "mail for {domain} loops back to myself")
DOMAIN_NOT_FOUND = Reply(550, "5.1.2", "Domain {domain} not found (NXDOMAIN)")
MX_LOOKUP_FAILED = Reply(
    451, "4.4.3", "DNS lookup of MX for {domain} failed: {error}; will retry"
)
NULL_MX = Reply(550, "5.1.10", "Domain {domain} does not accept mail (null MX)")
NO_MX_ADDRESS_YET = Reply(
    451, "4.4.4", "no MX host for {domain} has an address (DNS failed); will retry"
)
NO_MX_NO_ADDRESS = Reply(550, "5.1.2", "Domain {domain} has no MX and no address")
NO_MX_ADDRESS = Reply(550, "5.4.4", "no MX host for {domain} has an address")
HOST_LOOKUP_FAILED = Reply(451, "4.4.3", "DNS lookup of {name} failed; will retry")
HOST_NO_ADDRESS = Reply(550, "5.4.4", "host {name} has no address")


def format_reply(reply: Reply, **values: str) -> bytes:
    """The reply as wire lines (without the final CRLF), multi-line when the text has newlines."""
    text = reply.text.format(**values) if values else reply.text
    lines = text.split("\n")
    out = []
    for index, line in enumerate(lines):
        sep = "-" if index < len(lines) - 1 else " "
        prefix = f"{reply.code}{sep}{reply.status} " if reply.status else f"{reply.code}{sep}"
        out.append((prefix + line).encode("ascii", "replace"))
    return b"\r\n".join(out)
