"""
The smallest configuration the in-process tests build on: example.org local, the mailboxes
and the queue under the test's tmp_path, a listener that is never opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailsrv.config import Config, parse_config

__all__ = ["minimal_config"]


def minimal_config(tmp_path: Path, **tables: Any) -> Config:
    """That configuration, ``tables`` replacing whole tables of it (an ``smtp`` table given
    needs its own ``listen``)."""
    return parse_config({
        "hostname": "mx.example.org",
        "smtp": {"listen": ["tcp:2525"]},
        "domains": {"local": ["example.org"]},
        "mailboxes": {"root": str(tmp_path / "mail")},
        "queue": {"path": str(tmp_path / "queue")},
        **tables,
    }, None)
