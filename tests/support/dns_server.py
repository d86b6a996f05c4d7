"""
A small authoritative DNS server for the tests, built on twisted.names.

Run as ``python dns_server.py ZONE.json [PORT]``; it listens on 127.0.0.1 (UDP and TCP, same
port, chosen by the kernel unless PORT is given), prints ``PORT <n>`` on stdout and serves the
zone until killed. The zone file: ``{"records": {"name": [["MX", 10, "mx.name"],
["A", "127.0.0.2"], ["AAAA", "::1"], ["PTR", "host.name"], ["TXT", "string", "string"]]},
"servfail": ["name"], "secure": ["name"]}`` (a TXT string longer than 255 octets is sent as several strings of
one record, as DKIM keys are). Names not listed are NXDOMAIN; listed names without records
of the asked type answer NOERROR with no answer (NODATA), or their CNAME and its target's
records.  ``["TLSA", usage, selector, mtype, "hex"]`` is a TLSA record (RFC 6698).  Answers
about a name in "secure" (records, NODATA or NXDOMAIN alike) have the AD bit set, as a
DNSSEC-validating resolver's would for a signed zone; all others have it clear.  A UDP
answer larger than the query's EDNS0 payload size (512 without EDNS0) comes with the TC bit
and no records, as from a real server; the same question over TCP gets the whole answer.
"""

import json
import sys

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server


def _payload(record):
    kind, *args = record
    if kind == "MX":
        return dns.MX, dns.Record_MX(preference=args[0], name=args[1].encode(), ttl=60)
    if kind == "A":
        return dns.A, dns.Record_A(args[0], ttl=60)
    if kind == "AAAA":
        return dns.AAAA, dns.Record_AAAA(args[0], ttl=60)
    if kind == "PTR":
        return dns.PTR, dns.Record_PTR(args[0].encode(), ttl=60)
    if kind == "CNAME":
        return dns.CNAME, dns.Record_CNAME(args[0].encode(), ttl=60)
    if kind == "TXT":  # one or more character-strings, as a zone file's ( "..." "..." )
        strings = []
        for text in (a.encode() for a in args):
            strings += [text[i:i + 255] for i in range(0, len(text), 255)] or [b""]
        return dns.TXT, dns.Record_TXT(*strings, ttl=60)
    if kind == "TLSA":  # twisted.names has no TLSA class: its RDATA as an unknown record
        usage, selector, mtype, data = args
        return TLSA, dns.UnknownRecord(bytes([usage, selector, mtype]) + bytes.fromhex(data),
                                       ttl=60)
    raise ValueError(f"unsupported record type {kind}")


TLSA = 52


class ZoneServerFactory(server.DNSServerFactory):
    """Sets the AD bit of the answers about the zone's "secure" names."""

    def __init__(self, zone):
        server.DNSServerFactory.__init__(self, authorities=[ZoneResolver(zone)])
        self.secure = {name.lower().rstrip(".") for name in zone.get("secure", [])}

    def sendReply(self, protocol, message, address):
        if message.queries:
            name = message.queries[0].name.name.decode("ascii").lower().rstrip(".")
            message.authenticData = name in self.secure
        if address is None:
            message.maxSize = 0  # TCP: never truncated
        elif len(_untruncated(message)) > (message.maxSize or 512):
            # As a real server: the TC bit and no records, not Twisted's cut-off message.
            message.answers, message.authority, message.additional = [], [], []
            message.trunc = True
        server.DNSServerFactory.sendReply(self, protocol, message, address)


def _untruncated(message):
    whole = dns.Message(maxSize=0)
    whole.queries = message.queries
    whole.answers, whole.authority, whole.additional = (
        message.answers, message.authority, message.additional)
    return whole.toStr()


class ZoneResolver(common.ResolverBase):
    def __init__(self, zone):
        common.ResolverBase.__init__(self)
        self.records = {
            name.lower().rstrip("."): [_payload(r) for r in records]
            for name, records in zone.get("records", {}).items()
        }
        self.servfail = {name.lower().rstrip(".") for name in zone.get("servfail", [])}

    def _lookup(self, name, cls, qtype, timeout):
        key = name.decode("ascii").lower().rstrip(".")
        if key in self.servfail:
            # Any error that is not a DomainError makes DNSServerFactory answer SERVFAIL.
            return defer.fail(RuntimeError(f"configured SERVFAIL for {key}"))
        if key not in self.records:
            return defer.fail(error.AuthoritativeDomainError(key))
        answers = [
            dns.RRHeader(name=name, type=rtype, payload=payload, ttl=60, auth=True)
            for rtype, payload in self.records[key]
            if rtype == qtype or qtype == dns.ALL_RECORDS
        ]
        aliases = [p for t, p in self.records[key] if t == dns.CNAME]
        if not answers and aliases:
            # A name with a CNAME: the CNAME, then the target's records (as servers answer).
            target = aliases[0].name.name
            answers = [dns.RRHeader(name=name, type=dns.CNAME, payload=aliases[0], ttl=60,
                                    auth=True)]
            answers += [
                dns.RRHeader(name=target, type=rtype, payload=payload, ttl=60, auth=True)
                for rtype, payload in self.records.get(target.decode().lower().rstrip("."), [])
                if rtype == qtype
            ]
        return defer.succeed((answers, [], []))


def main():
    with open(sys.argv[1]) as f:
        zone = json.load(f)
    factory = ZoneServerFactory(zone)
    # The kernel picks a free UDP port; the same TCP port may be taken (by any client socket),
    # so try again with another pair, a bounded number of times.
    wanted = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    for _attempt in range(50):
        udp = reactor.listenUDP(wanted, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface="127.0.0.1")
            break
        except CannotListenError:
            udp.stopListening()
    else:
        raise SystemExit("no port free for both UDP and TCP after 50 tries")
    print(f"PORT {port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
