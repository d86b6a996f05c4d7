"""How a receiving process's log events reach the server's log, one line per event line,
each saying ``proc=<n> pid=<pid>``.

Two ways, chosen by the parent (:func:`logs_to_stdout`):

- **straight**: when twistd logs to its standard output (``twistd -n`` without
  ``--logfile``, or ``--logfile=-``: the systemd unit, a terminal), the receiving process
  inherits that descriptor and writes its lines there itself, formatted exactly as twistd's
  text observer formats the parent's lines. Relaying them cost the parent, the one process
  every connection passes through, 40 % of its time with a connection per message.
- **relayed**: otherwise (a log file twistd rotates, syslog, a ``--logger`` of the
  administrator's) the lines go to a pipe as ``<level>\\t<text>`` and the parent logs them
  (mailsrv.procs.pool): only the parent knows where its log goes.

A line up to the pipe's atomic size (4 KiB) is one ``write``, never interleaved with the
parent's or another process's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.logger import eventAsText, formatTime

__all__ = ["RelayedLines", "StraightLines", "event_text", "logs_to_stdout"]


def logs_to_stdout(twistd_options: Mapping[str, Any]) -> bool:
    """Whether twistd, run with *twistd_options* (its ServerOptions), writes its log to its
    standard output with its own text observer (twisted's ``UnixAppLogger``)."""
    if twistd_options.get("syslog") or twistd_options.get("logger"):
        return False
    logfile = twistd_options.get("logfile")
    return logfile == "-" or (bool(twistd_options.get("nodaemon")) and not logfile)


def event_text(event: dict) -> str:
    """The event's text. A plain format (every line mailsrv writes) is filled in by
    ``str.format_map``, in C: twisted.logger's own formatting, a parser written in Python
    that also calls ``{f()}``, took 10 us of the reactor thread per line, two lines per
    message. Anything else (a call, a failure's traceback, a legacy event, a field
    missing) goes to twisted.logger, which says what it could not format."""
    text = event.get("log_format")
    if text is not None and "log_failure" not in event:
        try:
            return text.format_map(event)
        except Exception:
            pass
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


def _lines(event: dict) -> tuple[str, list[str]]:
    level = event.get("log_level")
    return (level.name if level is not None else "info"), event_text(event).rstrip("\n").split("\n")


def _write(fd: int, head: str, lines: list[str]) -> None:
    """The event's lines in one write, each after *head* (continuation lines indented)."""
    data = "".join(f"{head}{'  ' if i else ''}{line}\n" for i, line in enumerate(lines))
    try:
        os.write(fd, data.encode("utf-8", "replace"))
    except OSError:
        pass


class RelayedLines:
    """An observer writing ``<level>\\t<text>`` lines to *fd* for the parent to log
    (continuation lines indented by two spaces, each a line of its own)."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd

    def __call__(self, event: dict) -> None:
        name, lines = _lines(event)
        _write(self.fd, f"{name}\t", lines)


class StraightLines:
    """An observer writing the lines the parent would have written for the relayed ones:
    ``<time> [mailsrv#<level>] proc=<n> pid=<pid> <text>``, the time as twistd's observer
    gives it (formatted once per second)."""

    def __init__(self, proc: int, pid: int, fd: int = 1) -> None:
        self.fd = fd
        self.prefix = f"proc={proc} pid={pid} "
        self._second: int | None = None
        self._stamp = ""

    def __call__(self, event: dict) -> None:
        name, lines = _lines(event)
        when = event.get("log_time")
        if when is None:
            stamp = "-"
        else:
            if int(when) != self._second:
                self._second, self._stamp = int(when), formatTime(when)
            stamp = self._stamp
        _write(self.fd, f"{stamp} [mailsrv#{name}] {self.prefix}", lines)
