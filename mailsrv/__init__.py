"""mailsrv: a mail server for small organizations, built on Twisted."""

__version__ = "0.1.0"
