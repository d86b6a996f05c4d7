"""
The ``sendmail`` command every Unix program expects (cron, PHP's ``mail()``, ``mail(1)``, web
applications): ``sendmail [-t] [-i|-oi] [-f sender] [-F name] [recipient ...]`` reads one message
on standard input and hands it to the local mailsrv over SMTP.

Why SMTP on a loopback listener rather than writing into the queue: the queue belongs to the
``mailsrv`` user and is locked by the running server; going through the server gives every local
program the same checks, trace headers, fsync guarantee and log line as any other client, and
needs no set-uid helper.  The price is that nothing is queued while the server is down: the
command then fails with ``EX_TEMPFAIL`` (75) and says so, and the calling program (cron logs it)
knows the message was not sent.

Command-line flags follow sendmail's ``getopt`` string, as Postfix and Exim do, so that every
caller's habits work: harmless ones (``-odi``, ``-oem``, ``-bm``, ``-B8BITMIME``, ``-N``, ``-v``
...) are accepted; modes mailsrv does not have (``-bs``, ``-bd``, ``-bv``, queue intervals) are
refused with ``EX_USAGE`` rather than silently doing something else.  Invoked as ``mailq`` (or
with ``-bp``) it lists the queue, with ``-q`` it flushes it (``mailsrv queue list|flush``).

Exit statuses are those of ``sysexits.h``, which callers of sendmail interpret.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import re
import smtplib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mailsrv.config import DEFAULT_CONFIG_PATH, Config, ConfigError, endpoint_options, load_config
from mailsrv.headsection import field_name, is_field

__all__ = [
    "Invocation",
    "SendError",
    "UsageError",
    "add_missing_headers",
    "choose_listener",
    "default_domain",
    "header_recipients",
    "main",
    "normalise_line_ends",
    "parse_args",
    "parse_recipients",
    "read_message",
    "remove_bcc",
    "split_header",
]

# sysexits.h
EX_OK = 0
EX_USAGE = 64  # bad flags or addresses on the command line
EX_DATAERR = 65  # the message or an address cannot be sent as it is
EX_NOINPUT = 66  # standard input could not be read
EX_NOUSER = 67  # a recipient was refused for good
EX_UNAVAILABLE = 69  # the server refused the message for good
EX_SOFTWARE = 70
EX_TEMPFAIL = 75  # try again later: server down, busy or a 4xx reply
EX_PROTOCOL = 76  # the server said something that is not SMTP
EX_CONFIG = 78  # the configuration cannot be read

#: sendmail's getopt string "B:b:C:cd:e:F:f:Gh:IiL:M:mN:nO:o:p:q:R:r:sTtUV:vX:" split up.
_WITH_VALUE = frozenset("BbCdeFfhLMNOopRrVX")
_FLAGS = frozenset("cGIimnsTtUv")
#: -b modes: m (deliver, the default), p (list the queue), i (aliases); the rest are refused.
_MODES = {"m": "deliver", "p": "list-queue", "i": "check-aliases"}
#: Seconds each SMTP reply may take (the server replies to DATA after fsync).
SMTP_TIMEOUT = 120.0


class UsageError(Exception):
    """Bad command line: EX_USAGE."""


class SendError(Exception):
    """The message could not be sent; ``status`` is the sysexits code to exit with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


# --------------------------------------------------------------------------- command line


def _check_address(text: str, what: str) -> str:
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
    return _check_address(value, "sender")


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
        found.setdefault(_check_address(address, "recipient"), None)
    return list(found)


# --------------------------------------------------------------------------- the message


def read_message(stream: BinaryIO, ignore_dots: bool) -> bytes:
    """Standard input up to end of file or, unless ``ignore_dots``, a line holding only "."."""
    if ignore_dots:
        return stream.read()
    lines = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def normalise_line_ends(data: bytes) -> bytes:
    """Every line end (LF, CRLF or a lone CR) as CRLF, and a final one.

    Local programs write LF; the server refuses bare LF and bare CR (the SMTP smuggling
    defence), and smtplib passes bytes through unchanged, so this is done here.  A lone CR
    (a progress bar in cron output) becomes a line break rather than a refused message.
    """
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def split_header(data: bytes) -> tuple[list[bytes], bytes]:
    """A CRLF message as (header fields, body).

    Each field keeps its continuation lines and line ends.  The header section ends at the
    blank line (which belongs to neither part) or at the first line that is not a field,
    which then starts the body: ``echo hi | sendmail bob`` is a body without header.
    """
    fields: list[bytes] = []
    position = 0
    while position < len(data):
        end = data.find(b"\r\n", position)
        end = len(data) if end < 0 else end + 2
        line = data[position:end]
        if line == b"\r\n":
            return fields, data[end:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif is_field(line):
            fields.append(line)
        else:
            break
        position = end
    return fields, data[position:]


def _name(field_bytes: bytes) -> str:
    """The lower-case name of a field from ``split_header``."""
    name = field_name(field_bytes)
    return name.decode("ascii").lower() if name is not None else ""


def _value(field_bytes: bytes) -> str:
    raw = field_bytes.split(b":", 1)[1]
    return re.sub(r"\r\n(?=[ \t])", "", raw.decode("utf-8", "replace")).strip()


def header_recipients(fields: list[bytes], domain: str) -> list[str]:
    """The recipients ``-t`` means: To:, Cc: and Bcc:, or the Resent- ones when present.

    A resent message (RFC 5322 section 3.6.6) goes to its Resent- recipients, not again to
    the original ones, as sendmail and Postfix do.
    """
    names = {_name(f) for f in fields}
    wanted = ("resent-to", "resent-cc", "resent-bcc")
    if not names.intersection(wanted):
        wanted = ("to", "cc", "bcc")
    return parse_recipients([_value(f) for f in fields if _name(f) in wanted], domain)


def remove_bcc(fields: list[bytes]) -> list[bytes]:
    """The fields without Bcc: and Resent-Bcc:, which must not reach any recipient."""
    return [f for f in fields if _name(f) not in ("bcc", "resent-bcc")]


def add_missing_headers(
    fields: list[bytes], sender: str, full_name: str | None, now: float | None = None
) -> list[bytes]:
    """Add the From: and Date: fields RFC 5322 requires when the program left them out.

    (The server adds Message-ID: itself.)  A non-ASCII full name is RFC 2047-encoded.
    """
    names = {_name(f) for f in fields}
    added = []
    if "from" not in names:
        added.append(f"From: {email.utils.formataddr((full_name or '', sender), 'utf-8')}\r\n")
    if "date" not in names:
        added.append(f"Date: {email.utils.formatdate(now, localtime=True)}\r\n")
    return fields + [line.encode("ascii") for line in added]


# --------------------------------------------------------------------------- the server


def default_domain(config: Config) -> str:
    """The domain of unqualified addresses: the hostname if it is local, else the first local domain.

    It must be a local domain so that replies and bounces to ``user@domain`` come back here.
    """
    if config.hostname in config.domains.local:
        return config.hostname
    return config.domains.local[0]


def choose_listener(listen: tuple[str, ...]) -> tuple[str, int]:
    """The loopback address and port to submit to, from ``smtp.listen``.

    The first TCP listener on a loopback address or on every address (no ``interface``,
    ``0.0.0.0``, ``::``) is used: loopback clients are trusted (``relay.trusted_networks``
    by default) and never leave the machine.  Raises SendError(EX_CONFIG) when none fits.
    """
    for text in listen:
        kind, options = endpoint_options(text)
        if kind not in ("tcp", "tcp6"):
            continue
        port = int(options["port"])
        interface = options.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
        if port == 0:
            continue
        if interface in ("0.0.0.0", "") or interface.startswith("127."):
            return ("127.0.0.1" if interface in ("0.0.0.0", "") else interface, port)
        if interface in ("::", "::1"):
            return ("::1", port)
    raise SendError(
        EX_CONFIG,
        "smtp.listen has no TCP listener on a loopback address or on all addresses "
        f"(with a fixed port) to submit to: {', '.join(listen)}",
    )


def _reply_status(code: int, recipient: bool = False) -> int:
    if 400 <= code < 500:
        return EX_TEMPFAIL
    if 500 <= code < 600:
        return EX_NOUSER if recipient else EX_UNAVAILABLE
    return EX_PROTOCOL  # not an SMTP reply code at all


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def submit(
    address: tuple[str, int],
    sender: str,
    recipients: list[str],
    data: bytes,
    max_recipients: int,
    verbose: bool = False,
) -> list[tuple[str, int, str]]:
    """Send ``data`` to ``recipients`` in transactions of at most ``max_recipients``.

    Returns (recipient, code, reply) for each recipient the server refused while taking the
    message for the others; raises SendError when nothing was sent.  The EHLO name is
    "localhost" so that smtplib never asks the resolver for this machine's name.
    """
    options = ["BODY=8BITMIME"] if any(b > 127 for b in data) else []
    refused: list[tuple[str, int, str]] = []
    try:
        with smtplib.SMTP(address[0], address[1], local_hostname="localhost",
                          timeout=SMTP_TIMEOUT) as client:
            client.set_debuglevel(1 if verbose else 0)
            for start in range(0, len(recipients), max_recipients):
                batch = recipients[start:start + max_recipients]
                try:
                    rejected = client.sendmail(sender, batch, data, mail_options=options)
                except smtplib.SMTPRecipientsRefused as exc:  # smtplib has sent RSET
                    rejected = exc.recipients
                refused += [(rcpt, code, _text(reply)) for rcpt, (code, reply) in rejected.items()]
    except smtplib.SMTPResponseException as exc:  # MAIL, DATA, the greeting (SMTPConnectError)
        raise SendError(_reply_status(exc.smtp_code),
                        f"mailsrv refused the message: {exc.smtp_code} {_text(exc.smtp_error)}")
    except smtplib.SMTPServerDisconnected as exc:
        raise SendError(EX_TEMPFAIL, f"mailsrv closed the connection: {exc}; message not sent")
    except smtplib.SMTPException as exc:
        raise SendError(EX_PROTOCOL, f"SMTP error talking to mailsrv: {exc}")
    except OSError as exc:
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        raise SendError(EX_TEMPFAIL, f"cannot reach mailsrv at {host}:{address[1]} ({exc}); "
                        "is it running? The message was not sent")
    if len(refused) == len(recipients):
        raise _refusal(refused, "no recipient accepted the message")
    return refused


def _refusal(refused: list[tuple[str, int, str]], headline: str) -> SendError:
    """One SendError for refused recipients: EX_NOUSER if any refusal is permanent."""
    codes = [code for _, code, _ in refused]
    status = EX_NOUSER if any(500 <= c < 600 for c in codes) else _reply_status(max(codes))
    lines = "".join(f"\n  <{rcpt}>: {code} {reply}" for rcpt, code, reply in refused)
    return SendError(status, headline + ":" + lines)


# --------------------------------------------------------------------------- main


def _login() -> tuple[str, str]:
    """The invoking user's login and full name (the first GECOS field)."""
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return str(os.getuid()), ""
    return entry.pw_name, entry.pw_gecos.split(",", 1)[0]


def _deliver(inv: Invocation, config: Config, stdin: BinaryIO) -> int:
    domain = default_domain(config)
    login, gecos = _login()
    sender = f"{login}@{domain}" if inv.sender is None else inv.sender
    recipients = parse_recipients(inv.recipients, domain)
    try:
        data = normalise_line_ends(read_message(stdin, inv.ignore_dots))
    except OSError as exc:
        raise SendError(EX_NOINPUT, f"cannot read the message from standard input: {exc}")
    fields, body = split_header(data)
    if inv.from_headers:
        recipients = list(dict.fromkeys(recipients + header_recipients(fields, domain)))
    if not recipients:
        raise UsageError("no recipients: name them as arguments, or use -t with To:, Cc: or Bcc:")
    fields = add_missing_headers(remove_bcc(fields), sender or f"{login}@{domain}",
                                 inv.full_name if inv.full_name is not None else gecos)
    message = b"".join(fields) + b"\r\n" + body
    host, port = choose_listener(config.smtp.listen)
    refused = submit((host, port), sender, recipients, message, config.smtp.max_recipients,
                     inv.verbose)
    if refused:
        raise _refusal(refused, "the message was sent, except to")
    return EX_OK


def main(argv: list[str] | None = None, stdin: BinaryIO | None = None) -> int:
    """Run as ``sendmail`` or ``mailq`` (by the name in ``argv[0]``); returns a sysexits status."""
    argv = sys.argv if argv is None else argv
    program = Path(argv[0]).name if argv else "sendmail"
    try:
        inv = parse_args(argv[1:], program)
        config_path = inv.config or str(DEFAULT_CONFIG_PATH)
        if inv.mode != "deliver":
            from mailsrv import cli

            command = {"list-queue": ["queue", "--config", config_path, "list"],
                       "flush-queue": ["queue", "--config", config_path, "flush"],
                       "check-aliases": ["check-config", "--config", config_path]}[inv.mode]
            status = cli.main(command)
            if inv.mode == "check-aliases" and status == EX_OK:
                print(f"{program}: mailsrv has no alias database to build; it reads the aliases "
                      "file at start-up and on reload (systemctl reload mailsrv)")
            return status
        config = load_config(config_path)
        return _deliver(inv, config, stdin if stdin is not None else sys.stdin.buffer)
    except UsageError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        print(f"usage: {program} [-t] [-i] [-f sender] [-F name] [-C config] [recipient ...]",
              file=sys.stderr)
        return EX_USAGE
    except ConfigError as exc:
        print(f"{program}: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except SendError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    raise SystemExit(main())
