"""
CHUNKING (RFC 3030) on the session core in process: every BDAT rule of the README's reply
table, with the real SessionDelivery and Transaction on a tmp_path configuration (deliveries run
at once), and the chunk scanner alone. The transport's side (the chunk deadline) is at the end.
"""

from __future__ import annotations

import errno
import os
import re

import pytest
from twisted.internet import task

from mailsrv.inbound import message_intake
from mailsrv.inbound.chunkscan import ChunkScanner, parse_bdat
from mailsrv.inbound.datascan import DataError
from support.inprocess import Connection, Core, make_runtime
from support.queue_runtime import maildir_of

QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as [0-9A-Za-z]{14}$")
ENVELOPE = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<alice@example.org>\r\n"
MESSAGE = b"Subject: chunked\r\n\r\nline one\r\n.line with a dot\r\n"
BAD_SEQUENCE_AFTER_FAILURE = "503 5.5.1 Error: an earlier chunk failed; send RSET"
TOO_BIG = "552 5.3.4 Error: message size exceeds fixed limit"


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def runtime(tmp_path, clock):
    return make_runtime(tmp_path, clock)


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def stored(tmp_path) -> list:
    """The messages in alice's Maildir, in no order (none before the first delivery)."""
    if not (tmp_path / "mail" / "example.org" / "alice").exists():
        return []
    return list(maildir_of(tmp_path))


def incoming(tmp_path) -> list:
    return list((tmp_path / "queue" / "incoming").iterdir())


def core_for(runtime) -> Core:
    core = Core(runtime)
    core.greet()
    return core


# -- accepted ------------------------------------------------------------------------------


def test_ehlo_offers_chunking_and_binarymime_with_it(runtime):
    [ehlo] = Core(runtime).send("EHLO client.test")
    assert ehlo.split("\r\n")[-2:] == ["250-CHUNKING", "250 BINARYMIME"]


def test_one_chunk_last_is_stored_before_250_without_dot_unstuffing(tmp_path, runtime):
    core = core_for(runtime)
    replies = core.send_bytes(ENVELOPE + bdat(MESSAGE, last=True))
    assert replies[:2] == ["250 2.1.0 Ok", "250 2.1.5 Ok"]
    assert QUEUED.match(replies[2])
    [message] = stored(tmp_path)
    assert message["Subject"] == "chunked"
    # Counted octets: a leading dot is the message's own, never stuffing.
    assert message.get_payload() == "line one\n.line with a dot\n"
    assert incoming(tmp_path) == []


def test_pipelined_chunks_each_answered_in_order_crlf_split_between_chunks(tmp_path, runtime):
    core = core_for(runtime)
    parts = [b"Subject: parts\r", b"\n\r\nfirst ", b"", b"half\r", b"\n.\r\n"]
    data = ENVELOPE + b"".join(bdat(p) for p in parts) + bdat(b"", last=True) + b"NOOP\r\n"
    replies = core.send_bytes(data)
    sizes = [15, 24, 24, 29, 33]  # the octets received so far, after each chunk
    assert replies[2:7] == [f"250 2.0.0 Ok: {n} octets received" for n in sizes]
    assert QUEUED.match(replies[7]) and replies[8] == "250 2.0.0 Ok"
    [message] = stored(tmp_path)
    assert message.get_payload() == "first half\n.\n"  # "." alone ends nothing under BDAT


def test_chunk_octets_arriving_in_pieces_are_never_read_as_commands(tmp_path, runtime):
    core = core_for(runtime)
    body = b"Subject: x\r\n\r\nQUIT\r\nRSET\r\n"
    assert core.send_bytes(ENVELOPE + b"BDAT %d LAST\r\n" % len(body))[:2] == [
        "250 2.1.0 Ok", "250 2.1.5 Ok"]
    for octet in body[:-1]:
        assert core.send_bytes(bytes([octet])) == []
    assert core.core.mode == "CHUNK"
    assert QUEUED.match(core.send_bytes(body[-1:])[0])
    assert stored(tmp_path)[0].get_payload() == "QUIT\nRSET\n"


def test_bdat_0_without_last_is_legal_bdat_0_last_ends_the_message(tmp_path, runtime):
    core = core_for(runtime)
    replies = core.send_bytes(ENVELOPE + bdat(b"") + bdat(b"Subject: z\r\n\r\nz\r\n") + bdat(b"", True))
    assert replies[2:4] == ["250 2.0.0 Ok: 0 octets received", "250 2.0.0 Ok: 17 octets received"]
    assert QUEUED.match(replies[4])
    assert len(stored(tmp_path)) == 1


def test_message_without_final_crlf_is_kept_as_sent(tmp_path, runtime):
    core = core_for(runtime)
    assert QUEUED.match(core.send_bytes(ENVELOPE + bdat(b"Subject: y\r\n\r\nno end", True))[2])
    assert stored(tmp_path)[0].get_payload() == "no end"


def test_bdat_and_data_in_one_session_in_different_transactions(tmp_path, runtime):
    core = core_for(runtime)
    assert QUEUED.match(core.send_bytes(ENVELOPE + bdat(MESSAGE, True))[2])
    replies = core.send("MAIL FROM:<a@client.test>", "RCPT TO:<alice@example.org>", "DATA",
                        "Subject: data", "", "x", ".")
    assert QUEUED.match(replies[-1])
    assert QUEUED.match(core.send_bytes(ENVELOPE + bdat(MESSAGE, True))[2])
    assert len(stored(tmp_path)) == 3


# -- sequence and syntax -------------------------------------------------------------------


def test_bdat_without_mail_or_rcpt_503_and_its_octets_are_read_and_discarded(tmp_path, runtime):
    core = core_for(runtime)
    chunk = bdat(b"RSET\r\nQUIT\r\n")
    assert core.send_bytes(chunk) == ["503 5.5.1 Error: need MAIL command"]
    assert core.send_bytes(b"MAIL FROM:<a@client.test>\r\n" + chunk) == [
        "250 2.1.0 Ok", "503 5.5.1 Error: need RCPT command"]
    # The transaction stands: RCPT and the message go on.
    replies = core.send_bytes(b"RCPT TO:<alice@example.org>\r\n" + bdat(MESSAGE, True))
    assert replies[0] == "250 2.1.5 Ok" and QUEUED.match(replies[1])
    assert not core.closing


@pytest.mark.parametrize("argument", [
    b"", b"x", b"-1", b"1 MORE", b"1 LAST x", b"1.5", b"9" * 21, b"+1",
])
def test_bad_size_argument_501_5_5_4(runtime, argument):
    core = core_for(runtime)
    core.send_bytes(ENVELOPE)
    assert core.send_bytes(b"BDAT " + argument + b"\r\n") == [
        "501 5.5.4 Syntax: BDAT chunk-size [LAST]"]
    # Nothing was read as a chunk: the next line is a command.
    assert core.send("NOOP") == ["250 2.0.0 Ok"]


def test_largest_size_argument_20_digits_is_a_size(runtime):
    core = core_for(runtime)
    core.send_bytes(ENVELOPE)
    assert core.send_bytes(b"BDAT " + b"9" * 20 + b"\r\n") == []
    assert core.core.mode == "CHUNK"
    core.core.connection_lost()


def test_bad_size_argument_fails_a_transaction_under_way(tmp_path, runtime):
    core = core_for(runtime)
    assert core.send_bytes(ENVELOPE + bdat(b"Subject: x\r\n"))[2].startswith("250 2.0.0 Ok: 12")
    assert core.send("BDAT ten") == ["501 5.5.4 Syntax: BDAT chunk-size [LAST]"]
    assert core.send_bytes(bdat(b"\r\nx", True)) == [BAD_SEQUENCE_AFTER_FAILURE]
    assert incoming(tmp_path) == []


def test_data_after_bdat_503_and_the_transaction_is_over(tmp_path, runtime):
    core = core_for(runtime)
    core.send_bytes(ENVELOPE + bdat(b"Subject: x\r\n"))
    assert core.send("DATA") == ["503 5.5.1 Error: DATA after BDAT in one transaction; send RSET"]
    assert core.send_bytes(bdat(b"\r\nx\r\n", True)) == [BAD_SEQUENCE_AFTER_FAILURE]
    assert incoming(tmp_path) == [] and stored(tmp_path) == []
    assert core.send("RSET") == ["250 2.0.0 Ok"]
    assert QUEUED.match(core.send_bytes(ENVELOPE + bdat(MESSAGE, True))[2])


def test_rset_between_chunks_drops_what_was_sent(tmp_path, runtime):
    core = core_for(runtime)
    core.send_bytes(ENVELOPE + bdat(b"Subject: dropped\r\n"))
    assert incoming(tmp_path) != []
    assert core.send("RSET") == ["250 2.0.0 Ok"]
    assert incoming(tmp_path) == []
    assert core.send_bytes(bdat(b"x", True)) == ["503 5.5.1 Error: need MAIL command"]
    assert stored(tmp_path) == []


def test_connection_closed_mid_chunk_delivers_nothing(tmp_path, runtime):
    core = core_for(runtime)
    core.send_bytes(ENVELOPE + b"BDAT 100 LAST\r\n" + MESSAGE)
    assert core.core.mode == "CHUNK" and incoming(tmp_path) != []
    core.core.connection_lost()
    assert incoming(tmp_path) == [] and stored(tmp_path) == []


# -- limits and refusals -------------------------------------------------------------------


def test_size_limit_exact_passes_one_past_552_after_the_chunk_then_503_until_rset(
        tmp_path, clock):
    size = 1024
    core = core_for(make_runtime(tmp_path, clock, max_message_size=size))
    head = b"Subject: x\r\n\r\n"
    exact = head + b"y" * 98 + b"\r\n" + b"z" * (size - len(head) - 100)
    assert len(exact) == size
    assert QUEUED.match(core.send_bytes(ENVELOPE + bdat(exact, True))[2])
    over = exact + b"z"
    # One chunk over the limit: read to its end (nothing of it a command), then 552.
    replies = core.send_bytes(ENVELOPE + bdat(over[:10]) + bdat(over[10:]) + bdat(b"QUIT\r\n", True))
    assert replies[2:] == ["250 2.0.0 Ok: 10 octets received", TOO_BIG, BAD_SEQUENCE_AFTER_FAILURE]
    assert incoming(tmp_path) == [] and len(stored(tmp_path)) == 1
    assert core.send("RSET", "NOOP") == ["250 2.0.0 Ok"] * 2
    assert not core.closing


def test_a_chunk_announced_bigger_than_the_limit_is_consumed_then_552(tmp_path, clock):
    core = core_for(make_runtime(tmp_path, clock, max_message_size=1024))
    big = b"x" * 5000
    assert core.send_bytes(ENVELOPE + bdat(big, True) + b"NOOP\r\n")[2:] == [
        TOO_BIG, "250 2.0.0 Ok"]
    assert stored(tmp_path) == []


def test_mail_after_a_failed_chunk_starts_a_new_transaction(tmp_path, runtime):
    core = core_for(runtime)
    assert core.send_bytes(ENVELOPE + bdat(b"Subject: x\r\n\rx\r\n"))[2] == (
        "554 5.6.0 Error: bare CR or LF in message; message refused")
    assert QUEUED.match(core.send_bytes(ENVELOPE + bdat(MESSAGE, True))[2])


@pytest.mark.parametrize("smuggled", [b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"x\r"])
def test_bare_cr_or_lf_554_5_6_0_in_a_text_body(tmp_path, runtime, smuggled):
    core = core_for(runtime)
    data = b"Subject: x\r\n\r\nx" + smuggled
    assert core.send_bytes(ENVELOPE + bdat(data, True))[2] == (
        "554 5.6.0 Error: bare CR or LF in message; message refused")
    assert incoming(tmp_path) == [] and stored(tmp_path) == []


def test_line_of_998_octets_passes_999_is_refused(tmp_path, runtime):
    core = core_for(runtime)
    head = b"Subject: x\r\n\r\n"
    assert QUEUED.match(core.send_bytes(ENVELOPE + bdat(head + b"y" * 998 + b"\r\n", True))[2])
    assert core.send_bytes(ENVELOPE + bdat(head + b"y" * 999, True))[2] == (
        "500 5.5.2 Error: message line longer than 1000 octets")
    assert len(stored(tmp_path)) == 1


def test_header_checks_run_at_last_too_many_received_554_5_4_6(tmp_path, clock):
    core = core_for(make_runtime(tmp_path, clock, max_received_headers=1))
    hop = b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    assert core.send_bytes(ENVELOPE + bdat(hop + hop + b"\r\nx\r\n", True))[2] == (
        "554 5.4.6 Error: too many Received: headers (mail loop?)")
    assert stored(tmp_path) == []


def test_disk_error_at_the_first_chunk_451_and_the_chunk_is_read(tmp_path, runtime, monkeypatch):
    core = core_for(runtime)
    real_open = os.open

    def failing_open(path, *args, **kwargs):
        if "incoming" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(message_intake.os, "open", failing_open)
    replies = core.send_bytes(ENVELOPE + bdat(b"QUIT\r\n") + bdat(b"x", True) + b"NOOP\r\n")
    assert replies[2:] == [
        "452 4.3.1 Error: insufficient system storage; try again later",
        BAD_SEQUENCE_AFTER_FAILURE, "250 2.0.0 Ok"]


# -- the client sends a wrong length -------------------------------------------------------


def test_more_octets_than_announced_the_rest_is_taken_as_commands(tmp_path, runtime):
    core = core_for(runtime)
    replies = core.send_bytes(ENVELOPE + b"BDAT 17 LAST\r\nSubject: x\r\n\r\nbody\r\nmore text\r\n")
    assert QUEUED.match(replies[2])
    assert replies[3:] == ["500 5.5.2 Error: command not recognized"] * 2
    assert stored(tmp_path)[0].get_payload() == "bod"


def test_fewer_octets_than_announced_the_server_waits_for_the_rest(tmp_path, runtime):
    core = core_for(runtime)
    assert core.send_bytes(ENVELOPE + b"BDAT 100 LAST\r\n" + MESSAGE + b"QUIT\r\n")[2:] == []
    assert core.core.mode == "CHUNK" and stored(tmp_path) == []


def test_chunk_deadline_421_when_the_octets_stop_coming(tmp_path, clock):
    runtime = make_runtime(tmp_path, clock, data_timeout=60, idle_timeout=300)
    connection = Connection.to(runtime)
    connection.output()
    connection.send("EHLO client.test")
    assert connection.send_bytes(ENVELOPE + b"BDAT 100 LAST\r\nSubject: x\r\n")[-1] == (
        "250 2.1.5 Ok")
    clock.advance(30)
    connection.send_bytes(b"a" * 10)  # octets keep coming, slowly: the deadline stands
    clock.advance(31)
    assert connection.output() == ["421 4.4.2 Error: timeout exceeded; closing connection"]
    assert connection.closing
    connection.lose()
    assert incoming(tmp_path) == []


# -- the scanner alone ---------------------------------------------------------------------


def test_parse_bdat():
    assert parse_bdat(b"0") == (0, False)
    assert parse_bdat(b"12 last") == (12, True)
    assert parse_bdat(b"1 LAST LAST") is None and parse_bdat(b"LAST") is None


def scan(*parts: bytes, max_size: int = 10**6) -> tuple[bytes, DataError | None]:
    out: list[bytes] = []
    scanner = ChunkScanner(out.append, max_size)
    for part in parts:
        scanner.feed(part)
    scanner.finish()
    return b"".join(out), scanner.error


def test_scanner_any_split_gives_the_same_text():
    data = b"a\r\n\r\n.b\r\nc" + b"d" * 990 + b"\r\nend"
    whole = scan(data)
    assert whole == (data.replace(b"\r\n", b"\n"), None)
    for cut in range(len(data)):
        assert scan(data[:cut], data[cut:]) == whole
    assert scan(*[data[i:i + 1] for i in range(len(data))]) == whole  # octet by octet


def test_scanner_limits_one_past():
    assert scan(b"x" * 998 + b"\r\n")[1] is None
    assert scan(b"x" * 999 + b"\r\n")[1] is DataError.LINE_TOO_LONG
    assert scan(b"x" * 999)[1] is DataError.LINE_TOO_LONG  # unfinished, already too long
    assert scan(b"x\r\n" * 10, max_size=30)[1] is None
    assert scan(b"x\r\n" * 10, b"y", max_size=30) == (b"x\n" * 10, DataError.TOO_BIG)
    assert scan(b"a\rb")[1] is DataError.BARE_LINE_END
    assert scan(b"a\r")[1] is DataError.BARE_LINE_END


def test_scanner_keeps_nothing_after_an_error_and_counts_every_octet():
    out: list[bytes] = []
    scanner = ChunkScanner(out.append, 100)
    scanner.feed(b"a\nb\r\n")
    scanner.feed(b"c\r\n" * 100)
    scanner.finish()
    assert out == [] and scanner.size == 305 and scanner.error is DataError.BARE_LINE_END


def test_half_close_after_a_pipelined_quit_answers_everything_then_closes(tmp_path, runtime):
    """Exim sends ``BDAT <n> LAST`` and QUIT together and closes its sending side."""
    connection = Connection.to(runtime)
    connection.output()
    connection.send("EHLO client.test")
    connection.protocol.dataReceived(ENVELOPE + bdat(MESSAGE, last=True) + b"QUIT\r\n")
    connection.protocol.readConnectionLost()
    out = connection.output()
    assert out[:2] == ["250 2.1.0 Ok", "250 2.1.5 Ok"] and QUEUED.match(out[2])
    assert out[3:] == ["221 2.0.0 Bye"] and connection.closing
    assert len(stored(tmp_path)) == 1


def test_half_close_mid_chunk_closes_and_keeps_nothing(tmp_path, runtime):
    connection = Connection.to(runtime)
    connection.output()
    connection.send("EHLO client.test")
    connection.protocol.dataReceived(ENVELOPE + b"BDAT 1000 LAST\r\n" + MESSAGE)
    connection.protocol.readConnectionLost()
    assert connection.output() == ["250 2.1.0 Ok", "250 2.1.5 Ok"] and connection.closing
    connection.lose()
    assert incoming(tmp_path) == [] and stored(tmp_path) == []


def test_chunks_pipelined_after_a_failure_are_no_errors_however_many(tmp_path, clock):
    from mailsrv.inbound.session import MAX_ERRORS

    core = core_for(make_runtime(tmp_path, clock, max_message_size=1024))
    many = MAX_ERRORS + 5
    replies = core.send_bytes(ENVELOPE + bdat(b"x" * 2000) + bdat(b"y" * 100) * many)
    assert replies[2:] == [TOO_BIG] + [BAD_SEQUENCE_AFTER_FAILURE] * many
    assert core.core.errors == 1 and not core.closing
    # A client making errors of its own is still dropped: BDAT without MAIL counts.
    assert core.send("RSET") == ["250 2.0.0 Ok"]
    replies = core.send_bytes(bdat(b"z") * MAX_ERRORS)
    assert replies[-1] == "421 4.7.0 Error: too many errors; closing connection"
