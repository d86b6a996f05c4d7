"""The former name of :mod:`mailsrv.datascan`, still imported by smtp.py (being rewritten).

"Spool" names the DATA spool file only; remove this module once smtp.py imports
``mailsrv.datascan``.
"""

from mailsrv.datascan import MAX_TEXT_LINE, DataError, DataScanner

__all__ = ["MAX_TEXT_LINE", "DataError", "DataScanner"]
