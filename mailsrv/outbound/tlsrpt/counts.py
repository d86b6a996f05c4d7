"""
The TLS-RPT counts (RFC 8460 §4): per policy domain and policy, the successful sessions and
the failed ones by result type, receiving MX and address, and reason.

:meth:`TLSCounts.record` is called on the reactor thread for every outbound host attempt:
it only adds to a dictionary.  Every :data:`FLUSH_INTERVAL` seconds, when something changed,
a copy is written to ``<queue>/tlsrpt.json`` (mode 0600, replaced atomically) in a thread of
its own, so a crash or a ``kill -9`` loses at most that many seconds of counts; a clean stop
writes them too.  The file is read back at start-up, so a restart continues the day.
:meth:`TLSCounts.take` hands the period's counts to the report and starts the next period.

Bounded: at most :data:`MAX_POLICIES` policies per period and :data:`MAX_DETAILS` distinct
failure details per policy; a session past either bound is still counted in its policy's
totals when it has one, and the drops are logged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from mailsrv.storage import durable

__all__ = ["FLUSH_INTERVAL", "MAX_DETAILS", "MAX_POLICIES", "Period", "PolicyKey",
           "PolicyTally", "TLSCounts", "read_state"]

log = Logger(namespace="mailsrv")

#: Seconds between writes of the counts (what a crash may lose).
FLUSH_INTERVAL = 120.0
#: Distinct policies (domain and policy) counted per period.
MAX_POLICIES = 10000
#: Distinct failure details (result type, MX, address, reason) kept per policy.
MAX_DETAILS = 100
#: A failure reason is cut to this many characters.
MAX_REASON = 200
_VERSION = 1


@dataclass(frozen=True)
class PolicyKey:
    domain: str
    policy_type: str
    policy_string: tuple[str, ...] = ()
    mx_host_patterns: tuple[str, ...] = ()


#: (result type, receiving MX hostname, receiving IP, failure reason)
Detail = tuple[str, str, str, str]


@dataclass
class PolicyTally:
    key: PolicyKey
    successes: int = 0
    failures: int = 0
    details: dict[Detail, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Period:
    """What one report covers: from ``since`` to ``until`` (Unix times)."""

    since: float
    until: float
    tallies: Sequence[PolicyTally]

    def by_domain(self) -> dict[str, list[PolicyTally]]:
        out: dict[str, list[PolicyTally]] = {}
        for tally in self.tallies:
            out.setdefault(tally.key.domain, []).append(tally)
        return out


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_REASON]


class TLSCounts:
    """The counts of the current period.  ``write(f, *args)`` runs ``f`` in the writer
    thread (a Deferred); ``path`` None keeps them in memory only."""

    def __init__(
        self, clock: Any, path: Path | None = None,
        write: Callable[..., defer.Deferred] | None = None, interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.clock = clock
        self.path = path
        self._write = write or (lambda f, *a: defer.maybeDeferred(f, *a))
        self.interval = interval
        self.since = clock.seconds()
        self.tallies: dict[PolicyKey, PolicyTally] = {}
        self.dropped = 0  # sessions not counted (past MAX_POLICIES)
        self._dirty = False
        self._loop: task.LoopingCall | None = None
        self._writing: defer.Deferred | None = None
        if path is not None:
            state = read_state(path)
            if state is not None:
                self.since, self.tallies = state

    def record(
        self, policy_domain: str, policy_type: str, policy_string: Sequence[str],
        mx_host_patterns: Sequence[str], receiving_mx_hostname: str, receiving_ip: str,
        result_type: str | None, reason: str = "",
    ) -> None:
        """Count one session (``result_type`` None: TLS succeeded).  Cheap: the reactor's."""
        key = PolicyKey(policy_domain.lower().rstrip("."), policy_type, tuple(policy_string),
                        tuple(mx_host_patterns))
        tally = self.tallies.get(key)
        if tally is None:
            if len(self.tallies) >= MAX_POLICIES:
                if not self.dropped:
                    log.warn("tlsrpt: more than {n} policies today: the rest are not counted",
                             n=MAX_POLICIES)
                self.dropped += 1
                return
            tally = self.tallies[key] = PolicyTally(key)
        self._dirty = True
        if result_type is None:
            tally.successes += 1
            return
        tally.failures += 1
        detail = (result_type, receiving_mx_hostname.rstrip("."), receiving_ip, _clean(reason))
        if detail in tally.details or len(tally.details) < MAX_DETAILS:
            tally.details[detail] = tally.details.get(detail, 0) + 1
        else:
            log.info("tlsrpt: {domain}: more than {n} failure details: {result} at {ip} "
                     "counted in the total only", domain=key.domain, n=MAX_DETAILS,
                     result=result_type, ip=receiving_ip)

    def take(self) -> Period:
        """The period's counts, until now; the next period starts empty (and is written)."""
        now = self.clock.seconds()
        period = Period(self.since, now, list(self.tallies.values()))
        self.since, self.tallies, self.dropped = now, {}, 0
        self._dirty = True
        self.flush()
        return period

    # --- durability ----------------------------------------------------------------------

    def start(self) -> None:
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("tlsrpt: counts no longer written", f))

    def stop(self) -> defer.Deferred:
        """Stop the timer and write what is unwritten; fires when written."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.flush()
        return self._writing if self._writing is not None else defer.succeed(None)

    def flush(self) -> None:
        """Write the counts when they changed (one write at a time: a later one waits)."""
        if self.path is None or not self._dirty or self._writing is not None:
            return
        self._dirty = False
        data = json.dumps(self.state()).encode("utf-8")

        def done(result: Any) -> None:
            self._writing = None
            if self._dirty and not (self._loop is not None and self._loop.running):
                self.flush()  # stopping: what came meanwhile is written now

        def failed(failure: Any) -> None:
            self._dirty = True
            log.error("tlsrpt: cannot write {path}: {error}", path=str(self.path),
                      error=failure.getErrorMessage())

        self._writing = self._write(durable.replace, self.path, data)
        self._writing.addErrback(failed).addBoth(done)

    def state(self) -> dict:
        """The counts as JSON data (what the file holds)."""
        return {"version": _VERSION, "since": self.since, "policies": [
            {"domain": t.key.domain, "type": t.key.policy_type,
             "string": list(t.key.policy_string), "mx": list(t.key.mx_host_patterns),
             "successes": t.successes, "failures": t.failures,
             "details": [list(d) + [n] for d, n in t.details.items()]}
            for t in self.tallies.values()]}


def read_state(path: Path) -> tuple[float, dict[PolicyKey, PolicyTally]] | None:
    """The counts written to ``path`` (blocking: start-up), None when there is no file; a
    file that cannot be read is logged and left for the administrator (counts restart)."""
    try:
        data = json.loads(Path(path).read_bytes())
        tallies = {}
        for p in data["policies"][:MAX_POLICIES]:
            key = PolicyKey(str(p["domain"]), str(p["type"]), tuple(map(str, p["string"])),
                            tuple(map(str, p["mx"])))
            details = {(str(d[0]), str(d[1]), str(d[2]), str(d[3])): int(d[4])
                       for d in p["details"][:MAX_DETAILS]}
            tallies[key] = PolicyTally(key, int(p["successes"]), int(p["failures"]), details)
        return float(data["since"]), tallies
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log.error("tlsrpt: {path} cannot be read ({error}): the counts start again",
                  path=str(path), error=e)
        return None
