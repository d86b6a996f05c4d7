"""
The MTA-STS policies kept on disk: one JSON file per domain under ``<queue>/mta-sts/``.

RFC 8461 §5 depends on the cache: a policy once seen keeps applying for its ``max_age`` even
when the TXT record vanishes or the policy server is down (an attacker who blocks them must
not downgrade us), so it must survive a restart.  Files are mode 0600, written atomically
(mailsrv.storage.durable); a file that does not decode is ignored (as if nothing were
cached) and replaced at the next fetch.  Blocking: the caller runs these in a worker thread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mailsrv.outbound.mtasts.policy import Policy, PolicyError, parse_policy
from mailsrv.storage import durable

__all__ = ["PolicyCache"]


class PolicyCache:
    """The files of one queue directory's policy cache."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, domain: str) -> Path:
        # Domain names are LDH labels here (the relayer's destinations): safe as file names;
        # anything else is refused rather than turned into a path.
        name = domain.lower().rstrip(".")
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise ValueError(f"not a domain name: {domain!r}")
        return self.directory / f"{name}.json"

    def load(self, domain: str) -> Policy | None:
        """The cached policy of ``domain`` (expired or not), or None."""
        try:
            data = json.loads(self._path(domain).read_text("utf-8"))
            return parse_policy(data["text"], id=str(data["id"]), fetched=float(data["fetched"]))
        except (OSError, ValueError, KeyError, TypeError, PolicyError):
            return None

    def store(self, domain: str, policy: Policy) -> None:
        """Replace ``domain``'s cached policy (atomically, mode 0600)."""
        if not self.directory.is_dir():
            durable.ensure_dir(self.directory)
            os.chmod(self.directory, 0o700)
        data = {"id": policy.id, "fetched": policy.fetched, "text": policy.text}
        durable.replace(self._path(domain), json.dumps(data, indent=1).encode("utf-8"), mode=0o600)
