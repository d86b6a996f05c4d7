"""
Every SMTP reply mailsrv sends, with its RFC 3463 enhanced status code.

Kept in one table so that the codes stay consistent across the protocol, the policy and the
delivery code, and so that an administrator can read in one place what a client will be told.
"""

from __future__ import annotations

from typing import NamedTuple


class Reply(NamedTuple):
    code: int
    status: str  # enhanced status code, e.g. "5.1.1"
    text: str

    def format(self, **values: str) -> "Reply":
        """This reply with its {placeholders} filled in (for raising, where no values travel)."""
        return self._replace(text=self.text.format(**values))


class SMTPReplyError(Exception):
    """Raised by policy and delivery code to make the protocol answer with ``reply``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.status} {reply.text}")
        self.reply = reply


# Positive replies
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(
    214, "2.0.0",
    "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT. See RFC 5321",
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
HELO_NEEDS_DOMAIN = Reply(501, "5.5.4", "Syntax: {verb} domain-or-address-literal")
HELO_BAD_DOMAIN = Reply(501, "5.5.4", "Error: invalid {verb} domain")
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
UNSUPPORTED_PARAMETER = Reply(501, "5.5.4", "Error: unsupported parameter {name}")
PARAMETER_NEEDS_EHLO = Reply(501, "5.5.4", "Error: parameter {name} needs EHLO")
BAD_PARAMETER_VALUE = Reply(501, "5.5.4", "Error: bad value for parameter {name}")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")

# TLS and AUTH (RFC 3207, RFC 4954)
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

# Limits
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
SIZE_EXCEEDS_LIMIT = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: message line longer than 1000 octets")
BARE_LINE_END = Reply(554, "5.6.0", "Error: bare CR or LF in message; message refused")
BARE_LINE_END_COMMAND = Reply(421, "4.5.2", "Error: bare CR or LF in command; closing connection")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many Received: headers (mail loop?)")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded; closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections; try again later")
TOO_MANY_CONNECTIONS_FROM_IP = Reply(
    421, "4.7.0", "Error: too many connections from your address; try again later"
)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors; closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Error: server shutting down; try again later")

# Delivery
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing; try again later")
DISK_FULL = Reply(452, "4.3.1", "Error: insufficient system storage; try again later")


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
