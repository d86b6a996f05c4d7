"""The ``sendmail`` command line: sendmail's flags and the recipients given as arguments.

Pure: no I/O.  Flags follow sendmail's ``getopt`` string, as Postfix and Exim do, so that every
caller's habits work: harmless ones (``-odi``, ``-oem``, ``-bm``, ``-B8BITMIME``, ``-N``, ``-v``
...) are accepted; modes mailsrv does not have (``-bs``, ``-bd``, ``-bv``, queue intervals) are
refused (``UsageError``, which ``mailsrv.tools.sendmail`` turns into ``EX_USAGE``) rather than
silently doing something else.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass, field

__all__ = ["Invocation", "UsageError", "check_address", "parse_args", "parse_recipients"]

#: sendmail's getopt string "B:b:C:cd:e:F:f:Gh:IiL:M:mN:nO:o:p:q:R:r:sTtUV:vX:" split up.
_WITH_VALUE = frozenset("BbCdeFfhLMNOopRrVX")
_FLAGS = frozenset("cGIimnsTtUv")
#: -b modes: m (deliver, the default), p (list the queue), i (aliases); the rest are refused.
_MODES = {"m": "deliver", "p": "list-queue", "i": "check-aliases"}


class UsageError(Exception):
    """Bad command line: EX_USAGE."""


@dataclass
class Invocation:
    """What the command line asked for."""

    mode: str = "deliver"  # "deliver", "list-queue", "flush-queue" or "check-aliases"
    recipients: list[str] = field(default_factory=list)  # as given (maybe unqualified)
    from_headers: bool = False  # -t: recipients from To:, Cc:, Bcc:
    ignore_dots: bool = False  # -i / -oi: a line with a single "." does not end the input
    sender: str | None = None  # -f / -r; "" is the null sender <>
    full_name: str | None = None  # -F
    config: str | None = None  # -C
    verbose: bool = False  # -v: show the SMTP dialogue on stderr


def check_address(text: str, what: str) -> str:
    """Refuse what could break an SMTP command (whitespace, controls) or needs SMTPUTF8."""
    if not text.isascii() or re.search(r"[\x00-\x20\x7f<>]", text):
        raise UsageError(f"invalid {what} address {text!r}")
    return text


def _sender(value: str) -> str:
    value = value.strip()
    if value in ("", "<>"):
        return ""
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return check_address(value, "sender")


def _apply(inv: Invocation, letter: str, value: str) -> None:
    if letter in "fr":
        inv.sender = _sender(value)
    elif letter == "F":
        inv.full_name = value
    elif letter == "C":
        inv.config = value
    elif letter == "b":
        if value not in _MODES:
            raise UsageError(f"-b{value} is not supported by mailsrv (only -bm, -bp and -bi)")
        inv.mode = _MODES[value]
    elif letter == "o" and value == "i":
        inv.ignore_dots = True
    elif letter == "O" and value.split("=", 1)[0].strip().lower() == "ignoredots":
        inv.ignore_dots = value.partition("=")[2].strip().lower() in ("", "true", "t", "yes", "y")
    elif letter == "q":
        if value:
            raise UsageError(f"-q{value}: mailsrv has no queue runner to start; use -q alone")
        inv.mode = "flush-queue"
    elif letter == "i":
        inv.ignore_dots = True
    elif letter == "t":
        inv.from_headers = True
    elif letter == "v":
        inv.verbose = True
    elif letter == "I":
        inv.mode = "check-aliases"
    # Everything else is accepted and has no effect here: other -o/-O options (-odi, -oem),
    # -B (body type: 8-bit bodies are declared anyway), -N/-R/-V (DSN requests, which the
    # server does not offer), -d, -e, -h, -L, -M, -p, -X, -c, -G, -m, -n, -s, -T, -U.


def parse_args(argv: list[str], program: str = "sendmail") -> Invocation:
    """Parse sendmail's command line (without the program name).

    Options may be grouped (``-ti``), values attached or separate (``-fme`` / ``-f me``), and
    appear before or after recipients, as with GNU getopt; ``--`` ends the options.  ``-q``
    takes an optional attached value.  Raises UsageError.
    """
    inv = Invocation(mode="list-queue" if program == "mailq" else "deliver")
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            inv.recipients += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            inv.recipients.append(arg)
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            if letter == "q":
                _apply(inv, letter, arg[j + 1:])
                break
            if letter in _WITH_VALUE:
                value = arg[j + 1:]
                if not value:
                    if i >= len(args):
                        raise UsageError(f"option -{letter} needs a value")
                    value = args[i]
                    i += 1
                _apply(inv, letter, value)
                break
            if letter not in _FLAGS:
                raise UsageError(f"unknown option -{letter}")
            _apply(inv, letter, "")
            j += 1
    return inv


def parse_recipients(texts: list[str], domain: str) -> list[str]:
    """Addresses from command-line arguments or header values, unqualified ones @``domain``.

    One argument may hold several addresses (``"a@x, Bob <b@y>"``); group syntax and empty
    entries (``undisclosed-recipients:;``) yield nothing.  Duplicates are dropped, order kept.
    Raises UsageError for an address that cannot go into an SMTP command.
    """
    found: dict[str, None] = {}
    for _, address in email.utils.getaddresses(texts):
        if not address:
            continue
        if "@" not in address:
            address = f"{address}@{domain}"
        found.setdefault(check_address(address, "recipient"), None)
    return list(found)
