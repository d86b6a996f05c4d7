"""
smtplib clients for the tests that talk to a running mailsrv over loopback: one way to connect
and send, instead of a copy of the same three lines in each test file.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Sequence

__all__ = ["CLIENT_NAME", "HOST", "connect", "connect_tls", "send_mail"]

HOST = "127.0.0.1"
#: The name the client gives in EHLO: given, so that smtplib does not ask the resolver for ours.
CLIENT_NAME = "client.test"
#: What send_mail sends when the test does not care.
MESSAGE = b"Subject: t\r\n\r\nbody\r\n"


def connect(
    port: int, *, host: str = HOST, timeout: float = 15, source: str | None = None,
) -> smtplib.SMTP:
    """A plain client to ``port`` naming itself client.test (from ``source`` when given)."""
    return smtplib.SMTP(host, port, local_hostname=CLIENT_NAME, timeout=timeout,
                        source_address=(source, 0) if source else None)


def connect_tls(
    port: int, context: ssl.SSLContext, *, host: str = HOST, timeout: float = 15,
) -> smtplib.SMTP_SSL:
    """A client over implicit TLS (the submissions port), checked against ``context``."""
    return smtplib.SMTP_SSL(host, port, local_hostname=CLIENT_NAME, timeout=timeout,
                            context=context)


def send_mail(
    port: int, sender: str, recipients: Sequence[str], data: bytes | str = MESSAGE, *,
    host: str = HOST, tls: ssl.SSLContext | None = None, login: tuple[str, str] | None = None,
    timeout: float = 15, mail_options: Sequence[str] = (),
) -> dict:
    """One message sent as smtplib sends it (after STARTTLS with ``tls``, AUTH with ``login``):
    the refused recipients, or smtplib's exception."""
    with connect(port, host=host, timeout=timeout) as client:
        if tls is not None:
            client.starttls(context=tls)
            client.ehlo()
        if login is not None:
            client.login(*login)
        return client.sendmail(sender, list(recipients), data, mail_options=list(mail_options))
