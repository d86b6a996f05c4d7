"""
The DKIM signing modifier: mail our users and trusted networks send is signed with the keys
of its ``From:`` domain; and the ARC sealing modifier: mail from other servers that an alias
forwards off-site is sealed (RFC 8617) with the forwarding domain's key.

Signed: a message from an authenticated client or a client in ``relay.trusted_networks``
(local ``sendmail`` submits over loopback, which is one by default) whose header section
has a single ``From:`` address in a domain with keys (mailsrv.message.dkimkeys), whether it
is delivered here or relayed.  Not signed: mail from other servers (it is theirs to sign),
a message without a From: or with several addresses in it, a domain without keys.

The signature covers the message as stored and queued: the fields before the body that are
signed (``Message-ID:``, ``Date:`` a modifier added) and the body; so this modifier runs
last.  Its ``DKIM-Signature:`` fields go first in the prefix.  A signature that cannot be
made (which a key checked at start-up should never cause) refuses the message for now
(``451 4.3.0``, logged): the client keeps it and tries again, rather than our sending it
unsigned where receivers' DMARC may reject it.

Runs in the delivery thread (it reads the spool body and signs: CPU and disk).  dkimpy signs
a message held whole in memory, about 6.6 times its size at the peak; messages over 1 MiB are
signed one at a time, so signing holds at most that for one large message (166 MiB for the
default 25 MiB ``smtp.max_message_size``) plus the small ones of the other delivery threads.

ARC sealing (``arc_seal``): a message from another server (one the auth checks looked at)
with a queued copy whose sender SRS rewrote (``Draft.queue_sender``: an alias forwards it
off-site) gets an ARC set, so that the receiver can see what we found on arrival (our
``Authentication-Results:``, copied into ``ARC-Authentication-Results:``; its ``arc=`` is the
seal's ``cv=``) although our forwarding broke SPF and maybe DKIM.  It is sealed with an RSA
key (RFC 8617 allows rsa-sha256 only) of the SRS domain: the domain the forwarded copy is
sent from (its envelope), one per message whatever the aliases' domains, and the one
``mailsrv dns`` tells to publish keys for.  No RSA key for it: not sealed.  The set goes
before the queued copy only (``Draft.queue_prefix``): the local copies are not forwarded.
A seal that cannot be made (a chain of 50 sets, odd fields) is logged and the message
forwarded unsealed: ARC is a help to the receiver, not worth delaying other servers' mail.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import replace
from typing import Callable

from twisted.logger import Logger
from zope.interface import implementer

from mailsrv import replies
from mailsrv.checks.auth.evaluate import is_checked
from mailsrv.checks.pipeline import Draft
from mailsrv.interfaces import IModifier
from mailsrv.message import dkimsign
from mailsrv.message.dkimkeys import SigningKeys
from mailsrv.replies import Refusal

__all__ = ["ArcSeal", "DkimSign", "should_seal", "should_sign"]

log = Logger(namespace="mailsrv")


def should_sign(draft: Draft) -> bool:
    """Whether the message comes from one of ours: an authenticated user or a trusted
    network (local sendmail included), with a header section to sign."""
    client = draft.client
    ours = draft.authenticated_as is not None or (
        client is not None and (client.trusted_network or client.authenticated_as is not None))
    return ours and draft.head.has_header_section and draft.body_path is not None


def should_seal(draft: Draft) -> bool:
    """Whether the message comes from another server and is forwarded off-site with a
    rewritten sender (see the module's docstring)."""
    client = draft.client
    return (draft.queued and draft.queue_sender is not None and client is not None
            and draft.authenticated_as is None
            and is_checked(client.trusted_network, client.authenticated_as)
            and draft.head.has_header_section and draft.body_path is not None)


@implementer(IModifier)
class DkimSign:
    """Adds a ``DKIM-Signature:`` per key of the From: domain (see the module's docstring).

    ``keys`` is called for each message: a reload (SIGHUP) swaps the keys it returns.
    """

    name = "dkim_sign"

    #: Messages larger than this are signed one at a time (dkimpy holds about 6.6 times the
    #: message in memory): a burst of large messages costs one message's worth, not eight.
    LARGE = 1 << 20

    def __init__(self, keys: Callable[[], SigningKeys | None]) -> None:
        self.keys = keys
        self._large = threading.Lock()

    def modify(self, draft: Draft) -> Draft:
        if not should_sign(draft):
            return draft
        loaded = self.keys()
        domain = dkimsign.from_domain(draft.head.originators)
        if loaded is None or domain is None:
            return draft
        keys = loaded.for_domain(domain)
        if not keys:
            return draft
        assert draft.body_path is not None
        try:
            large = os.stat(draft.body_path).st_size + len(draft.prefix) > self.LARGE
            with self._large if large else contextlib.nullcontext():
                message = dkimsign.read_message(draft.prefix, b"", draft.body_path)
                fields = dkimsign.sign(message, keys)
                del message
        except Exception as e:  # dkimpy's errors, a vanished spool file: none is expected
            log.error("dkim id={id}: cannot sign for {domain}: {error}", id=draft.queue_id,
                      domain=domain, error=repr(e))
            raise Refusal(replies.LOCAL_ERROR) from e
        return replace(draft, prefix=fields + draft.prefix,
                       dkim=draft.dkim + tuple(f"{k.domain}/{k.selector}" for k in keys))


@implementer(IModifier)
class ArcSeal:
    """Adds an ARC set to the queued copy of a forwarded message (see the module's
    docstring).  ``keys`` is called for each message, as DkimSign's."""

    name = "arc_seal"

    def __init__(self, keys: Callable[[], SigningKeys | None]) -> None:
        self.keys = keys
        self._large = threading.Lock()

    def modify(self, draft: Draft) -> Draft:
        if not should_seal(draft):
            return draft
        loaded = self.keys()
        assert draft.queue_sender is not None and draft.body_path is not None
        domain = draft.queue_sender.rpartition("@")[2].lower()
        keys = [k for k in (loaded.for_domain(domain) if loaded else ()) if k.algorithm == "rsa"]
        if not keys:
            return draft
        key = keys[0]
        prefix = draft.queue_prefix + draft.prefix
        try:
            large = os.stat(draft.body_path).st_size + len(prefix) > DkimSign.LARGE
            with self._large if large else contextlib.nullcontext():
                message = dkimsign.read_message(prefix, b"", draft.body_path)
                fields = dkimsign.arc_seal(message, key, draft.hostname.lower())
                del message
        except Exception as e:  # dkimpy's errors on odd chains: forwarded unsealed
            log.warn("arc id={id}: not sealed for {domain}: {error}", id=draft.queue_id,
                     domain=domain, error=repr(e))
            return draft
        if not fields:
            return draft
        log.info("arc id={id}: sealed with {domain}/{selector}", id=draft.queue_id,
                 domain=key.domain, selector=key.selector)
        return replace(draft, queue_prefix=fields + draft.queue_prefix)
