"""The DATA scanner, fed every way a client (or an attacker) can split and shape the bytes."""

import pytest

from mailsrv.inbound.datascan import DataError, DataScanner, line_error


def scan(chunks, max_size=10_000_000):
    out = []
    scanner = DataScanner(out.append, max_size)
    after = None
    for chunk in chunks:
        if after is None:
            after = scanner.feed(chunk)
        else:
            after += chunk  # after the end, bytes are commands again: the protocol's business
    return scanner, b"".join(out), after


def every_split(data):
    """The data cut in two at every position, and as single bytes."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


def test_simple_message_is_unstuffed_and_lf_normalised():
    data = b"Subject: hi\r\n\r\n..leading dot\r\n.x\r\nend\r\n.\r\nQUIT\r\n"
    for chunks in every_split(data):
        scanner, body, after = scan(chunks)
        assert scanner.error is None
        assert body == b"Subject: hi\n\n.leading dot\nx\nend\n"
        assert after == b"QUIT\r\n"


def test_empty_message():
    scanner, body, after = scan([b".\r\n"])
    assert (scanner.error, body, after) == (None, b"", b"")


def test_end_marker_alone_after_lines():
    scanner, body, after = scan([b"a\r\n", b".\r\n"])
    assert (body, after) == (b"a\n", b"")


def test_message_not_ended_returns_none():
    scanner, body, after = scan([b"a\r\nb\r\n.", b"x\r\n"])
    assert after is None
    assert body == b"a\nb\nx\n"


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r"],
)
def test_smuggling_sequences_never_end_the_message(smuggle):
    """Only CRLF.CRLF ends DATA; the smuggled part stays inside a refused message."""
    data = b"Subject: a\r\n\r\nbody" + smuggle + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n"
    data += b"smuggled\r\n.\r\nNOOP\r\n"
    for chunks in every_split(data):
        scanner, body, after = scan(chunks)
        assert scanner.error is DataError.BARE_LINE_END
        assert body == b"" or b"smuggled" not in body
        assert after == b"NOOP\r\n"


def test_bare_lf_refuses_even_when_first_chunk_was_fine():
    scanner, body, after = scan([b"good\r\n", b"bad\nline\r\n.\r\n"])
    assert scanner.error is DataError.BARE_LINE_END
    assert after == b""


def test_line_of_998_octets_passes_and_999_fails():
    ok = b"x" * 998 + b"\r\n.\r\n"
    for chunks in ([ok], [ok[:500], ok[500:]], [ok[:998], ok[998:]], [ok[:999], ok[999:]]):
        scanner, body, after = scan(chunks)
        assert scanner.error is None, chunks
        assert body == b"x" * 998 + b"\n"
    long = b"x" * 999 + b"\r\n.\r\n"
    for chunks in ([long], [long[:500], long[500:]], [long[:999], long[999:]],
                   [long[:1000], long[1000:]]):
        scanner, body, after = scan(chunks)
        assert scanner.error is DataError.LINE_TOO_LONG, chunks
        assert after == b""


@pytest.mark.parametrize("lines, error", [
    (b"a\r\n" + b"x" * 998 + b"\r\nb\r\n", None),
    (b"a\r\n" + b"x" * 999 + b"\r\nb\r\n", DataError.LINE_TOO_LONG),  # one past, mid-chunk
    (b"x" * 999 + b"\r\n", DataError.LINE_TOO_LONG),
    (b"\r\n" * 1000, None),
    (b"a\rb\r\n", DataError.BARE_LINE_END),
    (b"a\nb\r\n", DataError.BARE_LINE_END),
    (b"a\n\rb\r\n", DataError.BARE_LINE_END),  # as many CRs and LFs, but not paired
    (b"x" * 999 + b"\rb\r\n", DataError.BARE_LINE_END),  # the bare CR counts first
])
def test_line_error_of_complete_lines(lines, error):
    assert line_error(lines, 998) is error


def test_endless_line_is_discarded_not_buffered():
    out = []
    scanner = DataScanner(out.append, 10**9)
    for _ in range(1000):
        assert scanner.feed(b"y" * 65536) is None
        assert len(scanner._pending) <= 1
    assert scanner.error is DataError.LINE_TOO_LONG
    assert scanner.feed(b"\r\n.\r\nRSET\r\n") == b"RSET\r\n"
    assert out == []


def test_long_line_skip_keeps_looking_for_crlf_split_across_chunks():
    scanner, body, after = scan([b"z" * 2000 + b"\r", b"\n.\r", b"\nNOOP\r\n"])
    assert scanner.error is DataError.LINE_TOO_LONG
    assert after == b"NOOP\r\n"


def test_dot_at_start_of_chunk_after_skipped_line_is_not_the_end():
    scanner, body, after = scan([b"z" * 1500, b".\r\n", b"more\r\n.\r\n"])
    assert scanner.error is DataError.LINE_TOO_LONG
    assert after == b""


def test_size_limit_one_past_edge():
    body = b"a" * 98 + b"\r\n"  # 100 octets per line
    scanner, out, after = scan([body * 10 + b".\r\n"], max_size=1000)
    assert scanner.error is None and scanner.size == 1000
    scanner, out, after = scan([body * 10 + b"b\r\n.\r\n"], max_size=1000)
    assert scanner.error is DataError.TOO_BIG
    assert after == b""


def test_sink_not_called_after_error():
    out = []
    scanner = DataScanner(out.append, 10)
    scanner.feed(b"0123456789\r\n")
    scanner.feed(b"more\r\n")
    assert scanner.error is DataError.TOO_BIG
    assert out == []
