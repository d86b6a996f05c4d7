"""SMTP smuggling and bare line ends, end to end: nothing is delivered from a tainted message."""

import pytest

SEQUENCES = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]


@pytest.mark.parametrize("sequence", SEQUENCES, ids=repr)
def test_smuggled_second_message_is_never_delivered(mail_server, sequence):
    client = mail_server.connect()
    assert client.command("EHLO c.test")[0] == 250
    assert client.command("MAIL FROM:<a@c.test>")[0] == 250
    assert client.command("RCPT TO:<carol@example.net>")[0] == 250
    assert client.command("DATA")[0] == 354
    before = len(mail_server.messages("alice@example.org")), len(
        mail_server.messages("carol@example.net"))
    client.send(
        b"Subject: outer\r\n\r\nouter body" + sequence
        + b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        + b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    assert client.reply() == (554, "5.6.0 Error: bare CR or LF in message; message refused")
    # The session goes on, in command mode, with nothing left over from the message.
    assert client.command("NOOP") == (250, "2.0.0 Ok")
    assert client.command("RCPT TO:<alice@example.org>")[0] == 503
    after = len(mail_server.messages("alice@example.org")), len(
        mail_server.messages("carol@example.net"))
    assert after == before
    assert "reason=\"bare CR or LF\"" in mail_server.log_text()


@pytest.mark.parametrize(
    "line",
    [b"NOOP\n", b"NOOP\rNOOP\r\n", b"EHLO c.test\n", b"MAIL FROM:<a@c.test>\r\r\n", b"NO\rOP"],
    ids=repr,
)
def test_bare_cr_or_lf_in_a_command_closes_the_connection(mail_server, line):
    client = mail_server.connect()
    client.send(line)
    assert client.reply() == (421, "4.5.2 Error: bare CR or LF in command; closing connection")
    assert client.closed()


def test_bare_lf_after_a_valid_pipelined_command_is_still_refused(mail_server):
    client = mail_server.connect()
    client.send(b"EHLO c.test\r\nNOOP\nQUIT\r\n")
    assert client.reply()[0] == 250
    assert client.reply()[0] == 421
    assert client.closed()
