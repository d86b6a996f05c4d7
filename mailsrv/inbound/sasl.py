"""
SASL for SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN mechanisms, as pure functions.

Both carry the password in the clear inside the TLS channel, which is why mailsrv offers AUTH
only after TLS; in exchange the server can keep one-way hashes on disk (no CRAM-MD5 or
SCRAM, which need the plain password or a password-equivalent stored).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

__all__ = [
    "MECHANISMS",
    "SASLError",
    "SASLCancelled",
    "Exchange",
    "decode_response",
    "parse_plain",
]

MECHANISMS = ("PLAIN", "LOGIN")

#: RFC 4954 §4: a SASL response line (and an AUTH command with an initial response) may be
#: up to 12288 octets long.
MAX_RESPONSE_LINE = 12288

# The LOGIN mechanism's challenges ("Username:", "Password:"), as every client expects them.
LOGIN_USERNAME = base64.b64encode(b"Username:").decode("ascii")
LOGIN_PASSWORD = base64.b64encode(b"Password:").decode("ascii")


class SASLError(Exception):
    """A response that cannot be decoded (malformed base64, missing NULs, non-UTF-8)."""


class SASLCancelled(Exception):
    """The client answered a challenge with ``*``."""


def decode_response(line: bytes) -> bytes:
    """One base64 response line; ``=`` is an empty initial response (RFC 4954 §4)."""
    if line == b"*":
        raise SASLCancelled()
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("malformed base64") from None


def _text(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"{what} is not UTF-8") from None
    if "\0" in text:
        raise SASLError(f"{what} holds a NUL")
    return text


def parse_plain(message: bytes) -> tuple[str, str, str]:
    """``authzid NUL authcid NUL passwd`` -> (authzid, authcid, password)."""
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise SASLError("PLAIN needs authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    if not authcid or not password:
        raise SASLError("PLAIN needs a user name and a password")
    return _text(authzid, "authzid"), _text(authcid, "user name"), _text(password, "password")


@dataclass
class Exchange:
    """One AUTH exchange in progress: which mechanism, and what the client has told so far.

    ``step`` returns the next challenge to send (base64 text for a ``334`` reply) or None
    when the credentials are complete (then ``username`` and ``password`` are set).
    """

    mechanism: str
    username: str | None = None
    password: str | None = None

    def first_challenge(self) -> str:
        return "" if self.mechanism == "PLAIN" else LOGIN_USERNAME

    def step(self, response: bytes) -> str | None:
        """Feed one decoded response; the next challenge, or None when done."""
        if self.mechanism == "PLAIN":
            authzid, authcid, password = parse_plain(response)
            if authzid and authzid.lower() != authcid.lower():
                raise SASLError("acting for another user (authzid) is not supported")
            self.username, self.password = authcid, password
            return None
        if self.username is None:
            self.username = _text(response, "user name")
            if not self.username:
                raise SASLError("empty user name")
            return LOGIN_PASSWORD
        self.password = _text(response, "password")
        if not self.password:
            raise SASLError("empty password")
        return None
