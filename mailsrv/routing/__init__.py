"""
Addresses and where they lead: SMTP path parsing, aliases, plus-addressing, local or remote.
"""
