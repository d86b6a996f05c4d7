"""
Returning a message to its sender: the DSN is built, routed and stored (blocking I/O).

The bounce enters the system like any message, with the null sender ``<>``: a local sender
gets it in their Maildir, a remote one through the queue.  A message whose own sender is
``<>`` is never bounced to its sender: when it fails, the postmaster is told instead (a
"double bounce", as Postfix does), in a notice marked ``double_bounce`` whose own failure is
only logged, so bounces never loop.
The DSN is stored *before* the failed recipients are marked bounced in the original's state,
so a crash in between can at worst repeat a bounce, never lose one.
A report whose From: domain (this host's) has DKIM keys is signed (:func:`sign_report`).
The sender's DSN parameters (RFC 3461) are honoured: its ENVID quoted, and with ``RET=FULL``
a failure report returns the whole message when it is at most ``FULL_RETURN_LIMIT`` octets
(Postfix's ``bounce_size_limit``), else its headers, as without it.
A report about a message that came with REQUIRETLS is itself sent with REQUIRETLS (RFC 8689
§5: it holds the original's header), so it too goes only over verified TLS.
"""

from __future__ import annotations

import datetime
import os
import time
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

from twisted.logger import Logger

from mailsrv.checks.policy import recipient_targets
from mailsrv.config import Config
from mailsrv.message import dkimsign, headers
from mailsrv.message.dkimkeys import SigningKeys
from mailsrv.outbound import dsn, dsn_original
from mailsrv.replies import Refusal
from mailsrv.routing.address import host_domains, parse_rcpt_to
from mailsrv.routing.router import Directory
from mailsrv.storage import queue
from mailsrv.storage.envelope import BOUNCED, QueuedMessage, QueuedRecipient
from mailsrv.storage.store import Stored, store

__all__ = [
    "UnroutableBounce", "send_dsn", "send_double_bounce", "notify", "postmaster_address",
    "given_up_reports", "bounce_pending", "sign_report", "store_own",
]

log = Logger(namespace="mailsrv")

#: The largest original (trace and body) a RET=FULL failure report returns whole.
FULL_RETURN_LIMIT = 50_000


class UnroutableBounce(Exception):
    """The original sender cannot receive a bounce (unknown local user, bad address)."""


def _original_head(config: Config, message: QueuedMessage) -> bytes:
    """The original's header section: our trace lines, then the body's own headers."""
    try:
        with open(queue.body_path(Path(config.queue.path), message.id), "rb") as body:
            head = body.read(headers.HEAD_LIMIT)
    except OSError:
        head = b""
    return dsn_original.original_headers(message.prefix.encode("ascii") + head)


def _original_whole(config: Config, message: QueuedMessage) -> bytes | None:
    """The whole original for RET=FULL, None when it is over FULL_RETURN_LIMIT or gone."""
    prefix = message.prefix.encode("ascii")
    try:
        with open(queue.body_path(Path(config.queue.path), message.id), "rb") as body:
            data = body.read(FULL_RETURN_LIMIT + 1 - len(prefix))
    except OSError:
        return None
    return prefix + data if len(prefix) + len(data) <= FULL_RETURN_LIMIT else None


def send_dsn(
    config: Config,
    directory: Directory,
    message: QueuedMessage,
    reports: list[dsn.RecipientReport],
    now: float | None = None,
    dkim: SigningKeys | None = None,
    original: bytes | None = None,
) -> Stored:
    """Build the DSN about ``reports`` and store it for the original sender; return where.
    ``original`` is the original's header section when it is not in the queue (a message
    delivered here at once, its success report).

    Raises ValueError for a message with the null sender (never bounce a bounce),
    UnroutableBounce when the sender cannot be delivered to, and durable.DeliveryError when
    the disk refuses.
    """
    if not message.sender:
        raise ValueError(f"queue {message.id}: a message from <> is never bounced")
    return _store_report(config, directory, message, reports, message.sender, now, dkim,
                         original)


def postmaster_address(config: Config, directory: Directory) -> str:
    """Our postmaster: at the host name's domain (or its parent) if local, else RFC 5321's
    bare ``postmaster``, which the router gives to the first local domain's postmaster."""
    for domain in host_domains(config.hostname):
        if directory.is_local_domain(domain):
            return f"postmaster@{domain}"
    return "postmaster"


def send_double_bounce(
    config: Config,
    directory: Directory,
    message: QueuedMessage,
    reports: list[dsn.RecipientReport],
    now: float | None = None,
    dkim: SigningKeys | None = None,
) -> Stored:
    """Tell the postmaster that a message from ``<>`` failed; the notice is marked so that
    its own failure is only logged (raises ValueError for a message that is not from
    ``<>`` or is itself such a notice; otherwise as :func:`send_dsn`)."""
    if message.sender or message.double_bounce:
        raise ValueError(f"queue {message.id}: not a bounce the postmaster is told of")
    return _store_report(config, directory, message, reports, None, now, dkim)


def notify(
    config: Config,
    directory: Directory,
    message: QueuedMessage,
    reports: list[dsn.RecipientReport],
    dkim: SigningKeys | None = None,
) -> tuple[str, Stored]:
    """Whoever must hear of ``reports`` told: (their address, where the report went).

    The sender gets the DSN; for a message from ``<>`` the postmaster gets a double bounce.
    Either is DKIM-signed with ``dkim``'s keys for its From: (see :func:`sign_report`).
    """
    if message.sender:
        return message.sender, send_dsn(config, directory, message, reports, dkim=dkim)
    return postmaster_address(config, directory), send_double_bounce(
        config, directory, message, reports, dkim=dkim)


def _store_report(
    config: Config,
    directory: Directory,
    message: QueuedMessage,
    reports: list[dsn.RecipientReport],
    sender: str | None,
    now: float | None,
    dkim: SigningKeys | None = None,
    original: bytes | None = None,
) -> Stored:
    """Build and store the report for ``sender``, or (None) the postmaster's double bounce."""
    now = time.time() if now is None else now
    to = sender or postmaster_address(config, directory)
    try:  # before the report is built: one that cannot be routed is not
        mailbox, _ = parse_rcpt_to(f"TO:<{to}>".encode("utf-8"))
        recipient_targets(mailbox, directory, may_relay=True)
    except Refusal as exc:
        who = "sender" if sender else "postmaster"
        raise UnroutableBounce(f"the {who} <{to}> cannot receive mail: {exc}")
    dsn_id = queue.new_queue_id()
    data = dsn.build_dsn(
        hostname=config.hostname,
        dsn_id=dsn_id,
        queue_id=message.id,
        original_sender=message.sender,
        received_from=message.received_from,
        arrival=message.created,
        recipients=reports,
        original_headers=original if original is not None else _original_head(config, message),
        now=now,
        postmaster=None if sender else to,
        envid=message.envid,
        original_message=_original_whole(config, message) if (
            sender and message.ret == "FULL" and reports[0].action == "failed") else None,
    )
    return store_own(config, directory, dsn_id, to, data, now, dkim, double_bounce=not sender,
                     tls_required="yes" if message.tls_required == "yes" else None)


def store_own(
    config: Config, directory: Directory, message_id: str, to: str, data: bytes, now: float,
    dkim: SigningKeys | None = None, double_bounce: bool = False, tls_required: str | None = None,
) -> Stored:
    """Store a message the server wrote itself (a DSN, a notice, a report) for ``to``: routed
    as any recipient is, after our Received: field (DKIM-signed when ``dkim`` has keys for
    the host), through the queue's incoming/ directory like a received message.  Blocking (a
    worker thread).  Raises Refusal when ``to`` cannot receive mail, DeliveryError when the
    disk refuses."""
    mailbox, _ = parse_rcpt_to(f"TO:<{to}>".encode("utf-8"))
    targets = recipient_targets(mailbox, directory, may_relay=True)
    trace = headers.local_received_header(
        hostname=config.hostname, queue_id=message_id, recipient=to,
        when=datetime.datetime.fromtimestamp(now, datetime.timezone.utc),
    )
    if dkim is not None:
        trace = sign_report(dkim, config.hostname, message_id, trace, data)
    body = Path(config.queue.path) / "incoming" / message_id
    with open(body, "xb") as handle:
        handle.write(data)
    try:
        return store(
            config, message_id, sender=None, targets=list(targets), trace=trace, body_path=body,
            received_from="local", double_bounce=double_bounce, tls_required=tls_required,
        )
    finally:
        with suppress(FileNotFoundError):
            os.unlink(body)


def sign_report(keys: SigningKeys, hostname: str, dsn_id: str, trace: bytes, data: bytes) -> bytes:
    """``trace`` with the DKIM signatures of a report we wrote put first.

    Its From: is ``MAILER-DAEMON@<hostname>``: signed with the keys of ``hostname``, else
    with those of its parent domain (``mx.example.org`` -> ``example.org``: a parent's
    signature is aligned with the From: for DMARC's default relaxed alignment).  A signature
    that cannot be made is logged and the report goes unsigned: a bounce is never lost.
    """
    for domain in host_domains(hostname):
        signing = keys.for_domain(domain)
        if signing:
            break
    else:
        return trace
    try:
        return dkimsign.sign(trace + data, signing) + trace
    except Exception as e:  # dkimpy's errors; none is expected with keys checked at load
        log.error("dkim id={id}: report not signed for {domain}: {error}", id=dsn_id,
                  domain=domain, error=repr(e))
        return trace


def given_up_reports(message: QueuedMessage, reason: str) -> list[dsn.RecipientReport]:
    """DSN lines for every recipient still queued, when we give up on them for ``reason``
    (but those whose NOTIFY leaves FAILURE out, RFC 3461)."""
    return [
        dsn.RecipientReport(
            address=r.address, action="failed", status="5.0.0",
            diagnostic=reason + (f"; last error: {r.last_error}" if r.last_error else ""),
            remote_mta=r.remote_mta, last_attempt=r.last_attempt, original_recipient=r.orcpt,
        )
        for r in message.pending if r.wants("FAILURE")
    ]


def bounce_pending(
    config: Config,
    directory: Directory,
    message: QueuedMessage,
    reason: str,
    now: float | None = None,
    dkim: SigningKeys | None = None,
) -> tuple[QueuedMessage, Stored | None]:
    """Give up on every recipient still queued (``mailsrv queue bounce``, or expiry).

    Returns the message with those recipients marked bounced (the caller saves or removes
    it) and where the DSN went (None when the sender is ``<>``: nothing is sent).
    """
    now = time.time() if now is None else now
    pending = message.pending
    stored = None
    reports = given_up_reports(message, reason) if message.sender else []
    if reports:
        stored = send_dsn(config, directory, message, reports, now, dkim=dkim)
    changed: dict[str, QueuedRecipient] = {
        r.address: replace(r, status=BOUNCED, last_error=reason) for r in pending
    }
    return message.update(changed), stored
