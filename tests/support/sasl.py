"""SASL responses as a client writes them, for the AUTH tests (in-process and over sockets)."""

from __future__ import annotations

import base64

__all__ = ["b64", "plain"]


def b64(text: str) -> str:
    """``text`` (UTF-8) in base64: one AUTH LOGIN line, or any SASL response."""
    return base64.b64encode(text.encode()).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    """The AUTH PLAIN response (RFC 4616): authzid NUL authcid NUL password, in base64."""
    return b64(f"{authzid}\0{user}\0{password}")
