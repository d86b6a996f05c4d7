"""``mailsrv doctor``'s DNS lookups: each local domain's records as ``mailsrv dns --check``
looks them up (mailsrv.tools.cli_dns), and our own addresses in the configured blocklists
as the server looks its clients up (mailsrv.inbound.blocklists).  Everything goes through
``twisted.names`` with ``relay.dns_servers``: when it is set, the machine's resolver is never
asked.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.names import dns

from mailsrv.config import Config, ConfigError
from mailsrv.dnsutil import make_resolver
from mailsrv.inbound.blocklists import Blocklists
from mailsrv.tools import cli_dns, dnsrecords, tlsrecords
from mailsrv.tools.doctor.evaluate_mail import (
    blocklist_findings,
    dane_resolver_finding,
    dns_finding,
)
from mailsrv.tools.doctor.findings import Finding

__all__ = ["dns_findings"]


def _records(config: Config) -> list[dnsrecords.Record]:
    """Every local domain's records; the host name's A and PTR once, with the first domain."""
    records: list[dnsrecords.Record] = []
    for domain in config.domains.local:
        try:
            keys = cli_dns.dkim_keys_of(config, domain)
        except ConfigError:
            keys = []  # check-config names the bad key file
        for record in dnsrecords.needed_records(domain, config.hostname, keys):
            if record.kind in ("A", "PTR") and any(r.kind == record.kind for r in records):
                continue
            records.append(record)
        records += tlsrecords.tls_records(domain, config.hostname, config.mta_sts.mode,
                                          config.mta_sts.max_age, config.tls_reports.rua)
    return records


@defer.inlineCallbacks
def dns_findings(config: Config, reactor: Any) -> Any:
    """A Deferred: the DNS findings, then the blocklist ones."""
    resolver = make_resolver(config.relay.dns_servers, reactor)
    verdicts, ours = yield defer.gatherResults([
        cli_dns.check(resolver, _records(config), config.hostname),
        cli_dns.addresses(resolver, config.hostname),
    ])
    found: list[Finding] = [dns_finding(record, verdict, config.hostname)
                            for record, verdict in verdicts]
    zones = dict(config.dnsbl.zones)
    if zones and ours:
        lists = Blocklists(resolver, reactor, zones, (), config.dnsbl.timeout)
        listings = yield defer.gatherResults([lists.lookup(ip) for ip in ours])
        found += blocklist_findings(dict(zip(ours, listings)), zones, config.dnsbl.threshold)
    if config.relay.dane:
        found.append((yield _dane_resolver(config, reactor)))
    return found


@defer.inlineCallbacks
def _dane_resolver(config: Config, reactor: Any) -> Any:
    """relay.dane's resolvers asked about the root zone as DANE asks (AD and DO set)."""
    from mailsrv.outbound.danelookup import make_secure_resolver

    servers = ", ".join(f"{host}:{port}" for host, port in config.relay.dns_servers)
    try:
        answer = yield make_secure_resolver(config.relay.dns_servers, reactor).answer(
            ".", dns.NS, (2, 5))
    except Exception:
        return dane_resolver_finding(servers, None)
    return dane_resolver_finding(servers, answer.secure and answer.rcode == dns.OK)
