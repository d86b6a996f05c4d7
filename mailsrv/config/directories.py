"""The two data directories, created and proved writable at start-up.

Apart from the rest of the package because it is the part that changes the file system:
everything else in :mod:`mailsrv.config` only reads.  A directory that cannot be written is a
:class:`~mailsrv.config.schema.ConfigError` naming its key, like any other mistake in the
file, so that the server refuses to start rather than accept mail it cannot keep.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from mailsrv.config.schema import Config, ConfigError

__all__ = ["prepare_directories"]


def prepare_directories(config: Config) -> None:
    """Create the mailbox root and the queue directory, and prove both can be written.

    Finding out at start-up is the point: otherwise the first message would be accepted
    up to DATA and then fail with 451.  Permission bits are not inspected (root ignores
    them); a probe file is created and removed instead.
    """
    directories = (("mailboxes.root", config.mailboxes.root), ("queue.path", config.queue.path))
    for key, path in directories:
        try:
            _make_directory(path)
            probe = path / f".mailsrv-probe-{os.getpid()}-{secrets.token_hex(4)}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                config.source, key, f"a directory mailsrv can write: {exc}"
            ) from None


def _make_directory(path: Path) -> None:
    """``mkdir -p`` where every directory created gets mode 0700 (parents included)."""
    try:
        path.mkdir(mode=0o700)
    except FileNotFoundError:
        if path.parent == path:
            raise
        _make_directory(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, "exists and is not a directory", str(path)
            ) from None
