"""``sendmail``'s submission: the message handed to the local mailsrv over SMTP on loopback.

The I/O edge of the command: which listener to submit to (from ``smtp.listen``), the SMTP
dialogue (smtplib), and the ``sysexits.h`` status every outcome maps to, which callers of
sendmail interpret.  A server that is down, busy or answers 4xx gives ``EX_TEMPFAIL``: nothing
was queued, and the calling program (cron logs it) knows the message was not sent.
"""

from __future__ import annotations

import smtplib

from mailsrv.config import endpoint_options

__all__ = ["SendError", "SMTP_TIMEOUT", "choose_listener", "refusal", "submit"]

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

#: Seconds each SMTP reply may take (the server replies to DATA after fsync).
SMTP_TIMEOUT = 120.0


class SendError(Exception):
    """The message could not be sent; ``status`` is the sysexits code to exit with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
        raise refusal(refused, "no recipient accepted the message")
    return refused


def refusal(refused: list[tuple[str, int, str]], headline: str) -> SendError:
    """One SendError for refused recipients: EX_NOUSER if any refusal is permanent."""
    codes = [code for _, code, _ in refused]
    status = EX_NOUSER if any(500 <= c < 600 for c in codes) else _reply_status(max(codes))
    lines = "".join(f"\n  <{rcpt}>: {code} {reply}" for rcpt, code, reply in refused)
    return SendError(status, headline + ":" + lines)
