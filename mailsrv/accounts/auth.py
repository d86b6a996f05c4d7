"""
Passwords and the guard against guessing them.

Password hashes live in the users file, Dovecot's passwd-file layout
(``alice@example.org:{BLF-CRYPT}$2y$12$…``), so that one file serves mailsrv for SMTP AUTH and
Dovecot for IMAP.  The one scheme is ``{BLF-CRYPT}`` (bcrypt): Debian's Dovecot verifies it,
pyca's ``bcrypt`` computes it, and it is slow on purpose.  Other Dovecot schemes are refused
at start-up rather than left to fail at the first login, and plain-text schemes never work.

Checking a password costs a bcrypt computation (a quarter of a second at cost 12), so it runs
in the thread pool; an unknown user costs the same as a known one, so timing tells nothing
about who has an account.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from mailsrv.routing.address import fold_local, normalise_domain

__all__ = [
    "SCHEME",
    "DEFAULT_COST",
    "FailureTracker",
    "PasswordChecker",
    "PasswordError",
    "check_password_field",
    "hash_password",
    "login_name",
    "verify_password",
]

SCHEME = "{BLF-CRYPT}"
DEFAULT_COST = 12
#: bcrypt reads at most 72 bytes of a password (crypt(3), and so Dovecot, ignore the rest).
MAX_PASSWORD_BYTES = 72


@functools.cache
def _dummy_hash() -> bytes:
    """Checked against when the user is unknown, so the answer takes as long as for a user."""
    return bcrypt.hashpw(b"mailsrv-no-such-user", bcrypt.gensalt(DEFAULT_COST))


class PasswordError(ValueError):
    """A password or a stored hash that cannot be used, with the reason."""


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    """``{BLF-CRYPT}$2y$…``: the form ``doveadm pw -s BLF-CRYPT`` writes and Dovecot verifies."""
    raw = password.encode("utf-8")
    if not raw:
        raise PasswordError("the password is empty")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise PasswordError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes "
                            "(bcrypt would ignore the rest)")
    if "\0" in password or "\n" in password or "\r" in password:
        raise PasswordError("the password holds a NUL or a line break")
    hashed = bcrypt.hashpw(raw, bcrypt.gensalt(cost)).decode("ascii")
    # $2b$ and $2y$ are the same algorithm; $2y$ is what Dovecot itself writes.
    return SCHEME + "$2y$" + hashed[4:]


def check_password_field(field: str) -> str | None:
    """The bcrypt hash in a users-file password field; None for no password; else PasswordError.

    The empty field means "no password" (the user receives mail but cannot log in).
    """
    if field == "":
        return None
    if not field.startswith("{"):
        raise PasswordError("a password field that starts with its scheme, e.g. {BLF-CRYPT}")
    scheme, _, value = field.partition("}")
    scheme += "}"
    if scheme.upper() != SCHEME:
        raise PasswordError(
            f"the {SCHEME} scheme (mailsrv verifies no other; {scheme} is not supported — "
            "set the password with 'mailsrv user passwd' or 'doveadm pw -s BLF-CRYPT')"
        )
    if not (value.startswith(("$2a$", "$2b$", "$2y$")) and len(value) == 60):
        raise PasswordError(f"a bcrypt hash after {SCHEME} ($2y$<cost>$<53 characters>)")
    return value


def verify_password(password: str, hashed: str | None) -> bool:
    """Blocking (bcrypt): whether ``password`` matches; always does the full work."""
    raw = password.encode("utf-8")[:MAX_PASSWORD_BYTES]
    if hashed is None or "\0" in password:
        bcrypt.checkpw(raw.replace(b"\0", b""), _dummy_hash())
        return False
    try:
        return bcrypt.checkpw(raw, hashed.encode("ascii"))
    except ValueError:
        return False


def login_name(username: str) -> str:
    """The users-file address a login name stands for: addresses compare case-insensitively,
    a UTF-8 local part in NFC and the domain in A-labels (SMTPUTF8: ``Jörg@bücher.example``
    logs in as ``jörg@xn--bcher-kva.example``), as the users file is read."""
    local, at, domain = username.strip().rpartition("@")
    if not at or username.isascii():
        return username.strip().lower()
    try:
        return f"{fold_local(local)}@{normalise_domain(domain)}"
    except ValueError:
        return username.strip().lower()


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Twisted's credentials checker over the users file's hashes, bcrypt in the thread pool.

    ``passwords`` is called for the current mapping of lower-case address to hash (or None),
    so that a reloaded users file takes effect for the next login.  The avatar id is the
    address as the users file has it.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        passwords: Callable[[], Mapping[str, str | None]],
        in_thread: Callable[..., defer.Deferred],
    ) -> None:
        self._passwords = passwords
        self._in_thread = in_thread

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        username = credentials.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        password = credentials.password
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        address = login_name(username)
        table = self._passwords()
        hashed = table.get(address)
        known = address in table

        def checked(ok: bool) -> str:
            if ok and known:
                return address
            raise UnauthorizedLogin()

        return self._in_thread(verify_password, password, hashed).addCallback(checked)


class FailureTracker:
    """Failed logins per client address, for the growing delay and the lockout.

    After ``max_failures`` failures within ``window`` seconds, the address is locked out for
    ``lockout`` seconds.  A password check counts as a failure from the moment it starts
    (``begin``) until it ends: checks run in parallel (one per connection), so counting only
    finished failures would let N connections get ``max_failures`` + N - 1 guesses in.
    At most ``max_addresses`` addresses are remembered (the oldest are forgotten first), so a
    flood of addresses cannot exhaust memory.
    """

    def __init__(
        self,
        max_failures: int,
        window: float,
        lockout: float,
        failure_delay: float,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = 10000,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.failure_delay = failure_delay
        self._clock = clock
        self._max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked_until: dict[str, float] = {}
        #: Checks under way per address (an entry only while there is one: bounded by the
        #: connections, which are limited per address and in total).
        self._checking: dict[str, int] = {}

    def locked(self, address: str) -> bool:
        until = self._locked_until.get(address)
        if until is None:
            return False
        if self._clock() >= until:
            del self._locked_until[address]
            self._failures.pop(address, None)
            return False
        return True

    def _recent(self, address: str) -> int:
        """Failures of ``address`` within the window (older ones are dropped)."""
        times = self._failures.get(address)
        if not times:
            return 0
        cutoff = self._clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        return len(times)

    def begin(self, address: str) -> bool:
        """Reserve a password check for ``address``; False (do not check) when locked out or
        when its failures and the checks under way already make ``max_failures``.

        Every reservation ends with exactly one of ``failed``, ``succeeded`` or ``abandoned``.
        """
        if self.locked(address):
            return False
        checking = self._checking.get(address, 0)
        if self._recent(address) + checking >= self.max_failures:
            return False
        self._checking[address] = checking + 1
        return True

    def _end(self, address: str) -> None:
        checking = self._checking.pop(address, 0) - 1
        if checking > 0:
            self._checking[address] = checking

    def failed(self, address: str) -> int:
        """End a check with a failure; the number of failures of ``address`` in the window."""
        self._end(address)
        now = self._clock()
        self._recent(address)
        times = self._failures.pop(address, None) or deque()
        times.append(now)
        self._failures[address] = times
        while len(self._failures) > self._max_addresses:
            old, _ = self._failures.popitem(last=False)
            self._locked_until.pop(old, None)
        if len(times) >= self.max_failures:
            self._locked_until[address] = now + self.lockout
        return len(times)

    def succeeded(self, address: str) -> None:
        """End a check with success: the address's failures are forgotten."""
        self._end(address)
        self._failures.pop(address, None)

    def abandoned(self, address: str) -> None:
        """End a check that could not be made (an internal error): no failure counted."""
        self._end(address)

    def delay(self, failures: int) -> float:
        """Seconds to wait before answering the ``failures``-th failure: 1, 2, 4 … 16 × base."""
        return self.failure_delay * (2 ** min(max(failures - 1, 0), 4))
