"""Inbound mail authentication: SPF, DKIM verification, DMARC, ARC, and the
Authentication-Results: field (RFC 7208, 6376, 7489, 8617, 8601) for mail from other servers.

- :mod:`.lookups`: DNS for a delivery thread, through twisted.names on the reactor, cached and
  time-limited (the only DNS the libraries below ever get);
- :mod:`.spfcheck`: pyspf on the envelope sender (or HELO);
- :mod:`.dkimcheck`: dkimpy on every DKIM-Signature;
- :mod:`.arccheck`: dkimpy on the ARC chain, and what a trusted sealer vouches for;
- :mod:`.dmarc`: the policy record, the organizational domain, alignment, the disposition (pure);
- :mod:`.results`: what was found (data) and the Authentication-Results: text (pure);
- :mod:`.evaluate`: all of it for one message, in a delivery thread;
- :mod:`.checks`: the pipeline checks that act on the results (pure).
"""
