"""``mailsrv dns DOMAIN [--check]``: the DNS records a local domain needs, printed in zone-file
form, or compared with what the DNS says.

The lookups go through ``twisted.names`` with ``relay.dns_servers`` (the system's resolver when
that is empty), as the server's own do, each with a time limit; what the DNS answers is
judged by mailsrv.tools.dnsrecords.  Exit status 0 when every record is right, 1 when one is
missing or wrong or could not be looked up, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.names import dns, error

from mailsrv.config import Config
from mailsrv.dnsutil import make_resolver
from mailsrv.message import dkimkeys
from mailsrv.routing.address import normalise_domain
from mailsrv.tools import dnsrecords, tlsrecords
from mailsrv.tools.cli_exit import EXIT_FAILED, EXIT_OK, Failed
from mailsrv.tools.dnsrecords import Record

__all__ = ["add_parser", "addresses", "check", "cmd_dns", "dkim_keys_of", "run_on_reactor"]

#: Seconds for each try of a lookup (twisted.names retries with the next server).
TIMEOUT = (2, 4)
_ABSENT = (error.DNSNameError,)  # NXDOMAIN: nothing published


def add_parser(commands: Any, config_option: argparse.ArgumentParser) -> None:
    text = "print the DNS records a local domain needs, or --check what is published"
    sub = commands.add_parser("dns", help=text, description=text, parents=[config_option])
    sub.add_argument("domain", help="one of [domains] local")
    sub.add_argument("--check", action="store_true",
                     help="look the records up and say, per record, ok / missing / wrong")
    sub.add_argument("--mta-sts-policy", action="store_true",
                     help="print only the MTA-STS policy file to serve (with [mta_sts] mode)")
    sub.set_defaults(run=cmd_dns)


def dkim_keys_of(config: Config, domain: str) -> list[tuple[str, str, str]]:
    """(selector, algorithm, public key) of the domain's DKIM signing keys, read and checked
    as the server reads them (ConfigError for a bad key file)."""
    if not config.dkim.enabled:
        return []
    keys = dkimkeys.load_keys(config.dkim.directory, config.source,
                              required=config.dkim.keys is not None)
    found = []
    for key in keys.for_domain(domain):
        algorithm, public = dkimkeys.public_key(key.path.read_bytes())
        found.append((key.selector, algorithm, public))
    return found


def cmd_dns(config: Config, args: argparse.Namespace) -> int:
    try:
        domain = normalise_domain(args.domain)
    except ValueError as e:
        raise Failed(f"{args.domain!r} is not a domain name: {e}") from None
    if domain not in config.domains.local:
        raise Failed(f"{domain} is not one of [domains] local ({', '.join(config.domains.local)})")
    records = dnsrecords.needed_records(domain, config.hostname, dkim_keys_of(config, domain))
    sts = config.mta_sts
    records += tlsrecords.tls_records(domain, config.hostname, sts.mode, sts.max_age,
                                      config.tls_reports.rua)
    policy = tlsrecords.policy_text(sts.mode, config.hostname, sts.max_age)
    if getattr(args, "mta_sts_policy", False):
        if sts.mode == "none":
            raise Failed("[mta_sts] mode is \"none\": there is no policy to serve")
        sys.stdout.write(policy)
        return EXIT_OK
    if not args.check:
        sys.stdout.write(f"; the records {domain} needs, with {config.hostname} as its MX\n")
        sys.stdout.write(dnsrecords.zone_text(records))
        if sts.mode != "none":
            sys.stdout.write(
                f"; the MTA-STS policy, to serve as text/plain at {tlsrecords.policy_url(domain)}\n"
                f"; (a certificate valid for mta-sts.{domain}; mailsrv dns {domain} "
                "--mta-sts-policy prints it alone):\n"
                + "".join(f";   {line}\n" for line in policy.splitlines()))
        return EXIT_OK
    verdicts = run_on_reactor(lambda reactor: check(make_resolver(config.relay.dns_servers, reactor),
                                          records, config.hostname))
    bad = 0
    for record, verdict in verdicts:
        print(f"{verdict.status:8} {record.kind:5} {record.name}: {verdict.detail}")
        if verdict.status != dnsrecords.OK:
            bad += 1
            shown = dnsrecords.zone_text([record]).rstrip("\n")
            print("         publish: " + shown.replace("\n", "\n                  "))
    print(f"{len(verdicts) - bad} of {len(verdicts)} records ok")
    return EXIT_OK if bad == 0 else EXIT_FAILED


def run_on_reactor(work: Any) -> Any:
    """Run ``work(reactor)`` (a Deferred) on the reactor, for this one command (``dns``,
    ``doctor``): its result, or its failure raised."""
    from twisted.internet import reactor

    outcome: list[Any] = []

    def start() -> None:
        d = defer.maybeDeferred(work, reactor)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    result = outcome[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


@defer.inlineCallbacks
def check(resolver: Any, records: Sequence[Record], hostname: str) -> Any:
    """[(record, verdict)] for each record, in order; the lookups run side by side, so a
    DNS server that does not answer costs one time limit, not one per record."""
    found = yield defer.gatherResults([_published(resolver, r) for r in records])
    return [(r, dnsrecords.judge(r, f, hostname)) for r, f in zip(records, found)]


def _published(resolver: Any, record: Record) -> Any:
    """What the DNS has for ``record`` (see dnsrecords.judge)."""
    if record.kind == "MX":
        return _answers(resolver.lookupMailExchange, record.name, dns.MX, lambda p: str(p.name))
    if record.kind in ("A", "STS-WEB"):
        return _addresses(resolver, record.name)
    if record.kind == "PTR":
        return _reverse(resolver, record.name)
    return _answers(resolver.lookupText, record.name, dns.TXT,
                    lambda p: b"".join(p.data).decode("utf-8", "replace"))


@defer.inlineCallbacks
def _reverse(resolver: Any, hostname: str) -> Any:
    """``address=name`` for each PTR name of each address of ``hostname`` (``address=`` for
    an address without one)."""
    addresses = yield _addresses(resolver, hostname)
    if addresses is None:
        return None
    found: list[str] = []
    for address in addresses:
        names = yield _pointers(resolver, address)
        if names is None:
            return None
        found += [f"{address}={name}" for name in names or [""]]
    return found


@defer.inlineCallbacks
def _answers(lookup: Any, name: str, rtype: int, value: Any) -> Any:
    """The values of the ``rtype`` answers for ``name``; [] when there are none; None when
    the lookup failed."""
    try:
        answers, _, _ = yield lookup(name, timeout=TIMEOUT)
    except _ABSENT:
        return []
    except (error.DomainError, error.DNSServerError, error.DNSQueryRefusedError,
            error.DNSQueryTimeoutError, error.DNSUnknownError, error.DNSFormatError,
            defer.TimeoutError):
        return None
    return [value(a.payload) for a in answers if a.type == rtype]


def addresses(resolver: Any, hostname: str) -> Any:
    """A Deferred: the IPv4 and IPv6 addresses of ``hostname`` ([] for none), None when a
    lookup failed (``mailsrv doctor`` looks our own up in the blocklists)."""
    return _addresses(resolver, hostname)


@defer.inlineCallbacks
def _addresses(resolver: Any, hostname: str) -> Any:
    v4, v6 = yield defer.gatherResults([
        _answers(resolver.lookupAddress, hostname, dns.A, lambda p: p.dottedQuad()),
        _answers(resolver.lookupIPV6Address, hostname, dns.AAAA,
                 lambda p: str(ipaddress.IPv6Address(p.address))),
    ])
    if v4 is None or v6 is None:
        return None
    return v4 + v6


def _pointers(resolver: Any, address: str) -> Any:
    name = ipaddress.ip_address(address).reverse_pointer
    return _answers(resolver.lookupPointer, name, dns.PTR, lambda p: str(p.name))
