"""
Local parts as names: the form they are compared in, and whether one is safe as a directory.

Split from :mod:`mailsrv.routing.address` for SMTPUTF8 (RFC 6531): a UTF-8 local part must
obey the same traversal rules as an ASCII one, on code points, and look like what it is.
Pure.
"""

from __future__ import annotations

import unicodedata

__all__ = ["MAX_LOCAL_PART", "fold_local", "is_safe_local_part", "printable_utf8"]

#: RFC 5321 section 4.5.3.1.1: a local part is at most 64 octets (of UTF-8, RFC 6531).
MAX_LOCAL_PART = 64


def printable_utf8(text: str) -> bool:
    """No non-ASCII character that is a control, format (bidi overrides, zero-width joiners),
    surrogate, private-use, unassigned or separator code point (``str.isprintable``): such
    characters make one address look like another, or hide text in logs and headers."""
    return text.isascii() or all(c.isascii() or c.isprintable() for c in text)


def fold_local(local: str) -> str:
    """The form local parts are compared in: lower case, Unicode NFC (RFC 6530 section 10.1).

    The users file, the aliases and a recipient's local part all go through this, so that a
    name written with a combining diaeresis finds the mailbox written with ``ö``.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", local).lower())


# Slashes without a compatibility decomposition to '/' or '\\' (division and fraction slash,
# big solidus, box-drawing diagonals ...): they read as a path separator all the same.
_SLASH_LIKE = frozenset("\u2044\u2215\u2216\u29f8\u29f9\u27cb\u27cd\u2571\u2572\u244a\u1735")


def is_safe_local_part(local: str) -> bool:
    """True when ``local`` can be used as one directory name under a Maildir root.

    Mailboxes live at ``<root>/<domain>/<user>``: a local part with '/', '..' or a leading
    dot could escape the root or hide as a dot-file, and control characters or NUL break
    file-system calls and logs.  Length is limited to RFC 5321's 64 octets (of UTF-8).

    The same rules hold on code points for a UTF-8 name (SMTPUTF8): it must be in NFC (one
    name, one directory), hold no character that ``printable_utf8`` refuses (bidi overrides,
    zero-width and other invisible characters), and no character whose compatibility form
    holds a '/', '\\' or '.' (the fullwidth solidus ``／``, the one-dot leader ``․``, the
    division slash ...): they would make a directory name that reads as a path.
    """
    if not local:
        return False
    if not local.isascii():
        if unicodedata.normalize("NFC", local) != local or not printable_utf8(local):
            return False
        for c in local:
            if c in _SLASH_LIKE or not c.isascii() and any(
                    d in unicodedata.normalize("NFKC", c) for d in "/\\.\0"):
                return False
    try:
        if len(local.encode("utf-8")) > MAX_LOCAL_PART:
            return False
    except UnicodeEncodeError:  # lone surrogates
        return False
    if local.startswith(".") or ".." in local:
        return False
    for c in local:
        if c in "/\\\0" or ord(c) < 0x20 or ord(c) == 0x7F:
            return False
    return True
