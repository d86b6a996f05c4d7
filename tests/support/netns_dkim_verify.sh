#!/bin/sh
# Runs go-msgauth's dkim-verify (Debian go-msgauth) on MESSAGE with the keys of ZONE.json:
# dkim-verify asks the resolver of /etc/resolv.conf (port 53 only), so it runs in a network
# and mount namespace of its own (unshare, as root), where 127.0.0.1:53 is the tests' DNS
# server and /etc/resolv.conf names it: nothing reaches the machine's resolver or network.
# Usage: unshare --net --mount sh netns_dkim_verify.sh PYTHON DNS_SERVER.py ZONE.json MESSAGE
# Prints dkim-verify's lines ("Valid signature for example.org", one per signature).
set -eu
python=$1 dns_server=$2 zone=$3 message=$4
work=$(dirname "$zone")
ip link set lo up
echo "nameserver 127.0.0.1" > "$work/resolv.conf"
mount --bind "$work/resolv.conf" /etc/resolv.conf
"$python" "$dns_server" "$zone" 53 > "$work/dns.out" 2> "$work/dns.log" &
dns=$!
i=0
until grep -q '^PORT 53' "$work/dns.out" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then echo "the DNS server did not start" >&2; kill "$dns"; exit 1; fi
    sleep 0.05
done
status=0
dkim-verify < "$message" 2>&1 || status=$?
kill "$dns"
exit "$status"
