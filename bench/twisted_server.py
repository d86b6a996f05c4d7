"""
Twisted's own mail server for the benchmark: ``twisted.mail``'s ESMTP factory from a
``MailService`` with one ``MaildirDirdbmDomain`` — the classes ``twistd mail --maildirdbmdomain``
wires together — listening on 127.0.0.1 only.

    python bench/twisted_server.py ROOT DOMAIN USER [USER ...]

Prints ``PORT <n>`` once it listens. One fix is needed for Python 3: Twisted's
``MaildirDirdbmDomain.startMessage`` opens the tmp/ file in text mode and then writes bytes to
it, so every delivery fails (which is why ``twistd mail`` does not deliver on Python 3); here the
file is opened in binary mode, everything else is Twisted's own code. Twisted's Maildir writer
never fsyncs (file or directory): its figures are the ceiling of a *non-durable* server.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.mail import mail, maildir, protocols


class BinaryMaildirDomain(maildir.MaildirDirdbmDomain):
    """Twisted's Maildir domain with the tmp/ file opened in binary mode (see the docstring)."""

    def startMessage(self, user):  # noqa: N802 - Twisted's name
        if isinstance(user, str):
            name, domain = user.split("@", 1)
        else:
            name, domain = user.dest.local, user.dest.domain
        if isinstance(name, bytes):
            name = name.decode()
        if isinstance(domain, bytes):
            domain = domain.decode()
        # userDirectory() mixes the str root with the bytes key DirDBM wants: same check here.
        if name.encode() not in self.dbm:
            raise RuntimeError(f"no such user {name!r}")
        directory = os.path.join(os.fsdecode(self.root), name)
        fname = os.fsdecode(maildir._generateMaildirName())
        filename = os.path.join(directory, "tmp", fname)
        fp = open(filename, "wb")
        return maildir.MaildirMessage(
            f"{name}@{domain}".encode(), fp, filename, os.path.join(directory, "new", fname)
        )


def main() -> None:
    root, domain_name, *users = sys.argv[1:]
    service = mail.MailService()
    domain = BinaryMaildirDomain(service, root)
    for user in users:
        domain.addUser(user.encode(), b"unused")
    service.addDomain(domain_name.encode(), domain)
    service.addDomain(domain_name, domain)
    factory = service.getESMTPFactory()
    # Unauthenticated clients get the domain delivery that the mail service's anonymous
    # realm hands out (ESMTPDomainDelivery with no user): local domains only, no relaying.
    build = factory.buildProtocol

    def build_protocol(addr):
        p = build(addr)
        p.delivery = protocols.ESMTPDomainDelivery(service, None)
        return p

    factory.buildProtocol = build_protocol
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=4096)
    print(f"PORT {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
