"""Who may send where: local domains, trusted networks, relay disguises, unsafe local parts."""

import socket

import pytest


def rcpt_reply(server, address, source="127.0.0.1"):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                    source_address=(source, 0))
    f = sock.makefile("rb")

    def reply():
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode().strip()

    reply()
    for command in (b"EHLO c.test", b"MAIL FROM:<a@c.test>", b"RCPT TO:" + address.encode()):
        sock.sendall(command + b"\r\n")
        result = reply()
    sock.close()
    return result


DISGUISES = [
    "<alice%evil.test@example.org>",
    "<evil.test!alice@example.org>",
    '<"alice@evil.test"@example.org>',
    '<"alice%evil.test"@example.org>',
    "<@example.org:alice@evil.test>",
    "<@example.org,@example.net:alice@example.org>",
    "<alice@[127.0.0.1]>",
    "<alice@[IPv6:::1]>",
    "<alice@evil.test>",
    "<alice@evil.test.>",
]


@pytest.fixture(scope="module")
def untrusting_server(tmp_path_factory, dns_server):
    from support.harness import MailServer

    server = MailServer(tmp_path_factory.mktemp("untrusting"), dns_server.port,
                        overrides={"relay": {"trusted_networks": ["127.0.0.2/32"]}}).start()
    yield server
    server.stop()


@pytest.mark.parametrize("address", DISGUISES)
def test_relay_disguises_are_refused_for_untrusted_clients(untrusting_server, address):
    assert rcpt_reply(untrusting_server, address) == (554, "5.7.1 Relay access denied")


@pytest.mark.parametrize("address", ["<alice@example.org>", "<ALICE@EXAMPLE.ORG>",
                                     "<alice@example.org.>", "<alice+news@example.org>",
                                     "<postmaster@example.net>", "<postmaster>",
                                     "<PostMaster@Example.Org>"])
def test_local_recipients_are_accepted_from_anyone(untrusting_server, address):
    assert rcpt_reply(untrusting_server, address)[0] == 250


def test_trusted_network_may_relay(untrusting_server):
    assert rcpt_reply(untrusting_server, "<someone@remote.test>", source="127.0.0.2")[0] == 250
    assert rcpt_reply(untrusting_server, "<someone@remote.test>")[0] == 554


@pytest.mark.parametrize(
    "address, expected",
    [
        ('<"../../etc"@example.org>', 553),
        ('<"a/b"@example.org>', 553),
        ("<.hidden@example.org>", 553),
        ('<"x\\\\y"@example.org>', 553),
        ("<" + "a" * 65 + "@example.org>", 553),
        ("<" + "a" * 64 + "@example.org>", 550),   # long but valid: just unknown
        ("<nobody@example.org>", 550),
    ],
)
def test_unsafe_local_parts_never_become_paths(untrusting_server, address, expected):
    code, text = rcpt_reply(untrusting_server, address)
    assert code == expected, text
    assert sorted(p.name for p in untrusting_server.root.iterdir()) in ([], ["example.org"])


def test_remote_recipient_from_trusted_client_is_queued_then_relayed(mail_server):
    """Queued, then handed to the relayer: remote.test does not exist here, so it bounces."""
    import email
    import email.policy

    from support.harness import wait_for
    from support.mail import send_mail

    send_mail(mail_server.port, "alice@example.org", ["friend@remote.test", "bob@example.org"],
              b"Subject: out\r\n\r\nto the world\r\n")
    [local] = [m for m in mail_server.messages("bob@example.org") if m["Subject"] == "out"]
    queue_id = local["Received"].split(" id ")[1].split()[0].rstrip(";")
    log = mail_server.log_text()
    assert f"queued id={queue_id} to=<friend@remote.test>" in log

    def bounce():
        for m in mail_server.messages("alice@example.org"):
            parsed = email.message_from_bytes(m.as_bytes(), policy=email.policy.default)
            if parsed.get_content_type() == "multipart/report" and queue_id in parsed.as_string():
                return parsed
        return None

    dsn = wait_for(bounce, 15, "the bounce for the unknown domain")
    assert "Domain remote.test not found" in dsn.as_string()
    assert f"relay id={queue_id} from=<alice@example.org> to=<friend@remote.test>" in (
        mail_server.log_text())


def test_alias_forwarding_to_a_remote_address_is_queued_even_for_strangers(untrusting_server):
    """A local alias may forward off-site: the relay decision is about the RCPT, not the target."""
    assert rcpt_reply(untrusting_server, "<outside@example.org>")[0] == 250
