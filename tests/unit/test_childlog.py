"""Tests for mailsrv.procs.childlog: a receiving process's lines written straight into the
server's log are the lines the parent writes when it relays them."""

from __future__ import annotations

import io
import os
import time

import pytest
from twisted.logger import Logger, LogLevel, textFileLogObserver
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from mailsrv.procs import pool as poolmodule
from mailsrv.procs.childlog import RelayedLines, StraightLines, logs_to_stdout
from mailsrv.procs.dispatch import Child


def written(observer_class, event: dict, *args: object) -> bytes:
    """What the observer writes for *event* (to a pipe standing for its standard output)."""
    read_end, write_end = os.pipe()
    try:
        observer_class(*args, fd=write_end)(event)
        os.close(write_end)
        write_end = -1
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def relayed_by_the_parent(event: dict, proc: int, pid: int, monkeypatch) -> bytes:
    """The relayed lines as the parent's _ChildProtocol logs them, through twistd's own text
    observer (the one ``twistd -n`` writes its standard output with)."""
    out = io.StringIO()
    text_observer = textFileLogObserver(out)
    # The parent stamps its events when it logs them: the child's time here, to compare.
    monkeypatch.setattr(poolmodule, "log", Logger(namespace="mailsrv", observer=lambda e: (
        text_observer({**e, "log_time": event["log_time"]}))))

    class Pool:
        _pids = {proc - 1: pid}

    protocol = poolmodule._ChildProtocol(Pool(), Child(proc - 1))  # type: ignore[arg-type]
    protocol.childDataReceived(1, written(RelayedLines, event))
    return out.getvalue().encode("utf-8")


def failure() -> Failure:
    try:
        raise ValueError("a traceback of several lines")
    except ValueError:
        return Failure()


@pytest.mark.parametrize("event", [
    {"log_format": "delivered id={id} to={to} size={size}", "id": "1xZ", "to": "<a@b.test>",
     "size": 5065},
    {"log_format": "refused {who}", "who": "grüße <ü@例え.jp>", "log_level": LogLevel.warn},
    {"log_format": "", "log_level": LogLevel.debug},
    {"log_format": "delivery failed: {what}", "what": "disk", "log_failure": failure(),
     "log_level": LogLevel.critical},
    {"log_format": "two\nlines", "log_level": LogLevel.error},
])
def test_a_line_written_straight_is_the_line_the_parent_writes_for_it(event, monkeypatch):
    event = {"log_level": LogLevel.info, "log_namespace": "mailsrv.inbound", "log_source": None,
             "log_time": time.time(), **event}
    straight = written(StraightLines, event, 2, 4321)
    assert straight == relayed_by_the_parent(event, 2, 4321, monkeypatch)
    assert straight.startswith(b"20") and b" proc=2 pid=4321 " in straight


def test_the_time_is_formatted_again_in_each_second():
    lines = StraightLines(1, 7)  # one observer: the second event is in the first's second
    for when, day in ((86400.0, b"1970-01-02T"), (86400.5, b"1970-01-02T"),
                      (2 * 86400.0, b"1970-01-03T")):
        read_end, write_end = os.pipe()
        lines.fd = write_end
        lines({"log_format": "a", "log_time": when})
        os.close(write_end)
        assert day in os.read(read_end, 4096)
        os.close(read_end)


@pytest.mark.parametrize(("argv", "straight"), [
    (["-n"], True),  # the Debian unit, a terminal
    (["-n", "--logfile", "-"], True),
    (["-n", "--logfile", "mailsrv.log"], False),  # twistd's LogFile, which it rotates
    ([], False),  # a daemon: twistd.log
    (["--logfile", "mailsrv.log"], False),
    (["-n", "--syslog"], False),
    (["-n", "--logger", "twisted.logger.jsonFileLogObserver"], False),
])
def test_processes_write_straight_only_where_twistd_logs_to_standard_output(argv, straight):
    options = ServerOptions()
    options.parseOptions(argv)
    assert logs_to_stdout(options) is straight
