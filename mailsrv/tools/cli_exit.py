"""How a ``mailsrv`` admin command ends: its exit statuses, and ``Failed``, which every
subcommand raises for an operational failure (``mailsrv.tools.cli.main`` prints it to stderr)."""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "Failed"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Failed(Exception):
    """An operational failure: the message goes to stderr, the exit status is 1."""
