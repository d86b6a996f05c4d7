"""
Mail coming in: the SMTP session (framing, the state machine without I/O, the Twisted
adapter, TLS and AUTH) and the intake that hands each accepted message to storage.
"""
