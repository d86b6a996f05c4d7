"""
MTA-STS for outbound mail (RFC 8461): whether a destination domain asks for verified TLS to
the MX hosts it names.

- :mod:`.policy`: the ``_mta-sts`` TXT record and the policy text, parsed (pure), and the MX
  patterns matched (§4.1);
- :mod:`.fetch`: the TXT lookup and the HTTPS fetch of the policy (certificate verified, no
  redirects, 64 KiB at most);
- :mod:`.cache`: the policies kept on disk, one file per domain, so a restart (or a policy
  server that is down) does not lose them;
- :mod:`.source`: the three together, as the RFC's §5 says: which policy applies now;
- :mod:`.tlscheck`: the certificate of an MX host checked after the handshake, each failure
  named with the result types of TLS-RPT (RFC 8460 §4.3).
"""
