"""A real SMTP client, Debian's ``swaks``, against ``twistd -n mailsrv``."""

import os
import re
import subprocess

import pytest

from support.peers import SWAKS, swaks_lacks

pytestmark = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (apt install swaks)")

BODY = "Hello Alice, this came through swaks."


@pytest.fixture(scope="module")
def swaks_env(tmp_path_factory):
    """The environment swaks runs in: it must not ask the machine's resolver anything.

    swaks always calls gethostbyname(hostname()) (for its default HELO, sender and Message-Id)
    when Perl's Sys::Hostname loads.  A Sys/Hostname.pm that refuses to load, first on
    PERL5LIB, makes swaks skip that lookup; --helo, --from and a Message-Id header give it the
    names it would have derived.  --server is an IP address, so no other lookup is made.
    """
    lib = tmp_path_factory.mktemp("perl5lib")
    (lib / "Sys").mkdir()
    (lib / "Sys" / "Hostname.pm").write_text(
        'die "mailsrv tests: no hostname lookups\\n";\n1;\n'
    )
    env = dict(os.environ)
    env["PERL5LIB"] = str(lib) + (os.pathsep + env["PERL5LIB"] if env.get("PERL5LIB") else "")
    return env


def swaks(env, port, *args, to="alice@example.org"):
    command = [
        SWAKS, "--server", "127.0.0.1", "--port", str(port), "--timeout", "20",
        "--helo", "client.test", "--from", "x@client.test", "--to", to,
        "--header", "Message-Id: <swaks-test@client.test>", *args,
    ]
    result = subprocess.run(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=60,
    )
    return result.returncode, result.stdout.decode(errors="replace")


def queued_message(server, address, output):
    """The message swaks was told was queued (by the id in its 250 reply) from the Maildir."""
    m = re.search(r"<-  250 2\.0\.0 Ok: queued as (\S+)", output)
    assert m, output
    queue_id = m.group(1)
    found = [
        msg for msg in server.maildir(address)
        if re.search(rf"\bid {queue_id}\b", " ".join(msg["Received"].split()))
    ]
    assert len(found) == 1, (queue_id, output)
    return found[0]


@pytest.mark.parametrize("extra", [[], ["--pipeline"]], ids=["plain", "pipeline"])
def test_swaks_delivers_into_the_maildir(mail_server, swaks_env, extra):
    code, output = swaks(
        swaks_env, mail_server.port,
        "--header", "Subject: swaks test", "--body", BODY, *extra,
    )
    assert code == 0, output
    if extra:
        # swaks really pipelined: MAIL, RCPT and DATA went out before the first reply.
        assert re.search(r" -> MAIL FROM:<x@client\.test>\n -> RCPT TO:<alice@example\.org>\n"
                         r" -> DATA\n", output), output
    msg = queued_message(mail_server, "alice@example.org", output)
    assert msg["Subject"] == "swaks test"
    assert msg["From"] == "x@client.test"
    assert msg["To"] == "alice@example.org"
    assert msg["Return-Path"] == "<x@client.test>"
    assert msg.get_payload().strip() == BODY
    assert msg.get_payload().startswith(BODY + "\n")
    assert " ".join(msg["Received"].split()).startswith(
        "from client.test (unknown [127.0.0.1]) by mx.example.org"
    )


def test_swaks_unknown_local_user_is_refused(mail_server, swaks_env):
    before = len(mail_server.messages("alice@example.org"))
    code, output = swaks(swaks_env, mail_server.port, "--body", BODY, to="nobody@example.org")
    assert code != 0, output
    assert "550 5.1.1" in output
    assert not (mail_server.root / "example.org" / "nobody").exists()
    assert len(mail_server.messages("alice@example.org")) == before


def test_swaks_relay_from_untrusted_network_is_refused(make_server, swaks_env):
    server = make_server(overrides={"relay": {"trusted_networks": ["192.0.2.0/24"]}}).start()
    code, output = swaks(swaks_env, server.port, "--body", BODY, to="x@remote.test")
    assert code != 0, output
    assert "554 5.7.1" in output
    messages = server.queue / "messages"
    assert not messages.exists() or not any(messages.glob("*.json"))


def test_swaks_without_net_ssleay_is_found_to_lack_tls(swaks_env, tmp_path):
    """As Debian's swaks installed without its recommended libnet-ssleay-perl: the tests that
    need TLS are skipped with this reason rather than failed."""
    lib = tmp_path / "perl5"
    (lib / "Net").mkdir(parents=True)
    (lib / "Net" / "SSLeay.pm").write_text('die "not installed\\n";\n1;\n')
    env = dict(swaks_env, PERL5LIB=f"{lib}{os.pathsep}{swaks_env['PERL5LIB']}")
    reason = swaks_lacks("TLS", env=env)
    assert reason == "swaks has no TLS: requires Net::SSLeay (apt install libnet-ssleay-perl)"
    assert swaks_lacks("Basic AUTH", env=env) is None
    assert swaks_lacks("No Such Feature", env=env).startswith("swaks --support does not list")
    # ... and that is what swaks itself says when asked for TLS.
    code, output = swaks(env, 9, "--tls")
    assert code != 0 and "TLS not available: requires Net::SSLeay" in output, output
