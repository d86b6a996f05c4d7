"""
What the real peer programs can do here: a test that needs a capability a peer lacks is
skipped with the reason (and the Debian package that brings it), never failed.

Debian's swaks does TLS only with its recommended ``libnet-ssleay-perl``; without it,
``swaks --tls`` exits with "TLS not available: requires Net::SSLeay".  ``swaks --support``
lists every capability, one a line: ``=== TLS supported`` or
``*** TLS not available: requires Net::SSLeay``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

SWAKS = shutil.which("swaks")

#: The Debian package that gives swaks a capability it can lack (.ci/run installs them).
SWAKS_PACKAGES = {"TLS": "libnet-ssleay-perl", "AUTH DIGEST-MD5": "libauthen-sasl-perl"}

_SUPPORT_LINE = re.compile(r"^(?:===|\*\*\*) (.+?) (?:(supported)|not available: (.*))$")


@functools.lru_cache(maxsize=None)
def _swaks_support(perl5lib: str | None) -> tuple[dict[str, str | None], str]:
    env = None if perl5lib is None else dict(os.environ, PERL5LIB=perl5lib)
    result = subprocess.run(
        [SWAKS, "--support"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=60,
    )
    found: dict[str, str | None] = {}
    for line in result.stdout.splitlines():
        m = _SUPPORT_LINE.match(line.strip())
        if m:
            found[m.group(1)] = None if m.group(2) else m.group(3).rstrip(".")
    return found, result.stdout


def swaks_lacks(*features: str, env: dict[str, str] | None = None) -> str | None:
    """Why swaks (run with ``env``'s PERL5LIB) cannot do every one of ``features`` (names as
    ``swaks --support`` prints them: "TLS", "Basic AUTH"), or None when it can."""
    if SWAKS is None:
        return "swaks is not installed (apt install swaks)"
    support, output = _swaks_support((env or {}).get("PERL5LIB"))
    for feature in features:
        if feature not in support:
            return f"swaks --support does not list {feature!r}: {output.strip()!r}"
        if support[feature] is not None:
            package = SWAKS_PACKAGES.get(feature)
            hint = f" (apt install {package})" if package else ""
            return f"swaks has no {feature}: {support[feature]}{hint}"
    return None
