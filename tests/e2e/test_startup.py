"""Starting `twistd -n mailsrv`: configuration errors stop the start, the demo, restarts, --help.

Every process here is started with the harness's command line (``MailServer.command()``) or the
same ``twistd`` invocation without ``--config`` (the demo), with the checkout first on PYTHONPATH.
"""

import mailbox
import os
import signal
import socket
import subprocess
import time

import pytest

from mailsrv.config import DEFAULT_CONFIG_PATH, demo_config
from support.certs import make_ca, self_signed
from support.harness import START_TIMEOUT, TWISTD, _env, render_config, stop_process, wait_for
from support.mail import connect, connect_tls, send_mail

#: How long a start with a broken configuration may take to give up.
FAIL_TIMEOUT = 30.0
POLL = 0.05

#: The demo's fixed address (the one exception to "ports the kernel picked").
DEMO_PORT = 2525


MESSAGE = (
    b"From: Bob <bob@client.test>\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
)


def message(to: str, subject: str, body: str) -> bytes:
    return MESSAGE.replace(b"{to}", to.encode()).replace(
        b"{subject}", subject.encode()).replace(b"{body}", body.encode())


def free_port() -> int:
    """A loopback port the kernel picked (released again, for the server to bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- configuration errors


def unknown_key(server, tmp_path):
    server.set_config("smtp", "max_recipient", 5)
    return server.config_path, "smtp.max_recipient", "unknown key; allowed keys: listen,"


def wrong_type(server, tmp_path):
    server.set_config("smtp", "max_recipients", "ten")
    return server.config_path, "smtp.max_recipients", "expected an integer >= 1, got 'ten'"


def missing_config_file(server, tmp_path):
    server.config_path.unlink()
    return server.config_path, "(file)", "a readable TOML file: [Errno 2] No such file"


def toml_syntax_error(server, tmp_path):
    text = render_config(server.config)
    lines = len(text.splitlines())
    server.config_path.write_text(text + "this is not toml\n")
    return server.config_path, "(syntax)", f"line {lines + 1}"


def root_through_a_file(server, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("a regular file\n")
    server.set_config("mailboxes", "root", str(afile / "mailboxes"))
    return server.config_path, "mailboxes.root", "a directory mailsrv can write: "


def invalid_users_line(server, tmp_path):
    users = tmp_path / "users"
    users.write_text("alice@example.org\nthis is not an address\nbob@example.org\n")
    return users, "line 2", "an address local@domain at the start of the line"


def user_in_a_non_local_domain(server, tmp_path):
    users = tmp_path / "users"
    users.write_text("alice@example.org\nbob@example.org\ndave@other.net\n")
    return users, "line 3 (dave@other.net)", "expected an address in a local domain"


def hashes_readable_by_others(server, tmp_path):
    users = tmp_path / "users"
    users.write_text("alice@example.org:{BLF-CRYPT}$2y$05$" + "a" * 53 + "\nbob@example.org\n")
    users.chmod(0o644)
    return users, "mode 0644", "hashes that others cannot read: chmod 0640"


def alias_loop(server, tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text(
        "postmaster: alice@example.org\n"
        "a@example.org: b@example.org\n"
        "b@example.org: a@example.org\n"
    )
    return aliases, "a@example.org", "no alias loop: a@example.org -> b@example.org -> a@example.org"


def missing_postmaster(server, tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("sales@example.org: alice@example.org, bob@example.org\n")
    # The users file (alice, bob, carol) has no postmaster either.
    assert "postmaster" not in (tmp_path / "users").read_text()
    return aliases, "postmaster@example.org", "a mailbox or alias for the postmaster"


def alias_to_unknown_local_user(server, tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text(
        "postmaster: alice@example.org\n"
        "sales@example.org: alice@example.org, nosuch@example.org\n"
    )
    return aliases, "sales@example.org", "(nosuch@example.org is neither)"


@pytest.mark.parametrize(
    "breaker",
    [
        unknown_key,
        wrong_type,
        missing_config_file,
        toml_syntax_error,
        root_through_a_file,
        invalid_users_line,
        user_in_a_non_local_domain,
        hashes_readable_by_others,
        alias_loop,
        missing_postmaster,
        alias_to_unknown_local_user,
    ],
)
def test_configuration_error_stops_the_start(make_server, breaker):
    server = make_server()
    workdir = server.workdir
    port = free_port()
    server.set_config("smtp", "listen", [f"tcp:{port}:interface=127.0.0.1"])
    file, key, expectation = breaker(server, workdir)

    process = subprocess.Popen(
        server.command(), cwd=workdir, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        # While it runs (it should not for long), nothing may accept on the configured port.
        for _ in range(int(FAIL_TIMEOUT / POLL)):
            if process.poll() is not None:
                break
            assert not accepts(port), "mailsrv listened despite a configuration error"
            time.sleep(POLL)
        output = process.communicate(timeout=5)[0].decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    log = server.log_text()
    assert "listening on" not in output + log
    # "<file>: <dotted key>: <expectation>", on one line.
    assert f"configuration error: {file}: {key}: " in output, output
    line = output[output.index(f"{file}: {key}: "):].splitlines()[0]
    assert expectation in line, output
    assert process.returncode != 0, (
        f"twistd exited with status 0 after a configuration error:\n{output}"
    )


def test_broken_start_leaves_the_mailbox_root_path_alone(make_server):
    """The regular file in the way of mailboxes.root is neither replaced nor written to."""
    server = make_server()
    afile = server.workdir / "afile"
    afile.write_text("a regular file\n")
    server.set_config("mailboxes", "root", str(afile / "mailboxes"))
    result = subprocess.run(
        server.command(), cwd=server.workdir, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=FAIL_TIMEOUT,
    )
    assert b"mailboxes.root" in result.stdout
    assert afile.is_file() and afile.read_text() == "a regular file\n"


# --------------------------------------------------------------------------- the demo


def test_demo_configuration_does_no_dns_and_stays_on_loopback(tmp_path):
    config = demo_config(tmp_path)
    assert config.smtp.listen == (f"tcp:{DEMO_PORT}:interface=127.0.0.1",)
    assert config.domains.local == ("localhost",)
    assert config.mailboxes.root == tmp_path / "demo-mail" / "mailboxes"
    assert config.queue.path == tmp_path / "demo-mail" / "queue"
    # No DNS server is configured (so any lookup would go to the system resolver) ...
    assert config.relay.dns_servers == ()
    # ... and therefore the demo must not look up its clients' reverse names.
    assert config.smtp.reverse_dns is False
    # ... and nobody may relay, so the relayer never has anything to look up either.
    assert config.relay.trusted_networks == ()


@pytest.fixture
def demo(tmp_path):
    """``twistd -n mailsrv`` without --config, in an empty directory, on 127.0.0.1:2525."""
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists, so twistd mailsrv would not run the demo")
    if accepts(DEMO_PORT):
        pytest.skip(f"127.0.0.1:{DEMO_PORT} (the demo's fixed port) is in use by something else")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "log"
    env = _env()
    env["HOME"] = str(home)
    process = subprocess.Popen(
        TWISTD + ["-n", "--pidfile=", "--logfile", str(log), "mailsrv"],
        cwd=cwd, env=env, stdout=open(tmp_path / "twistd.out", "wb"), stderr=subprocess.STDOUT,
    )
    try:
        def listening():
            if process.poll() is not None:
                raise AssertionError(
                    f"the demo exited with {process.returncode}:\n"
                    + (tmp_path / "twistd.out").read_text()
                    + (log.read_text() if log.exists() else "")
                )
            text = log.read_text(errors="replace") if log.exists() else ""
            return f"(127.0.0.1 port {DEMO_PORT})" in text

        wait_for(listening, START_TIMEOUT, "the demo to listen")
        yield cwd, home, log
    finally:
        stop_process(process)


def test_demo_delivers_to_localhost_and_queues_relay_from_loopback(demo):
    cwd, home, log = demo
    send_mail(DEMO_PORT, "bob@client.test", ["someone@localhost"],
         message("someone@localhost", "demo test", "Hello demo."))

    new = cwd / "demo-mail" / "mailboxes" / "localhost" / "someone" / "new"
    assert len(os.listdir(new)) == 1
    [msg] = list(mailbox.Maildir(new.parent, create=False))
    assert msg["Subject"] == "demo test"
    assert msg["Return-Path"] == "<bob@client.test>"
    assert msg.get_payload() == "Hello demo.\n"
    received = " ".join(msg["Received"].split())
    # No reverse lookup was made: the client's name is "unknown", only its address is known.
    assert received.startswith("from client.test (unknown [127.0.0.1]) by localhost")

    # The demo trusts no one to relay: it never sends mail to the Internet.
    refused = send_mail(DEMO_PORT, "bob@client.test", ["someone@localhost", "someone@remote.test"],
                   message("someone@remote.test", "relay test", "Hello remote."))
    assert refused["someone@remote.test"][0] == 554
    assert list((cwd / "demo-mail" / "queue" / "messages").iterdir()) == []

    # Everything the demo wrote is under the current directory.
    assert sorted(os.listdir(cwd)) == ["demo-mail"]
    assert sorted(os.listdir(cwd / "demo-mail")) == ["mailboxes", "queue"]
    assert "built-in demo" in log.read_text()


# --------------------------------------------------------------------------- restart, --help


def test_restart_keeps_delivered_mail(make_server):
    server = make_server().start()
    send_mail(server.port, "bob@client.test", ["alice@example.org"],
         message("alice@example.org", "before restart", "First."))
    box = server.root / "example.org" / "alice"
    before = {name: (box / "new" / name).read_bytes() for name in os.listdir(box / "new")}
    assert len(before) == 1

    server.stop()
    assert not accepts(server.port)
    server.start()

    after = {name: (box / "new" / name).read_bytes() for name in os.listdir(box / "new")}
    assert after == before
    send_mail(server.port, "bob@client.test", ["alice@example.org"],
         message("alice@example.org", "after restart", "Second."))
    subjects = sorted(m["Subject"] for m in server.maildir("alice@example.org"))
    assert subjects == ["after restart", "before restart"]
    for name, data in before.items():
        assert (box / "new" / name).read_bytes() == data


def test_help_lists_config_option(tmp_path):
    result = subprocess.run(
        TWISTD + ["mailsrv", "--help"], cwd=tmp_path, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=FAIL_TIMEOUT,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output
    assert "--config" in output
    assert "Path to mailsrv.toml" in output


# --------------------------------------------------------------------------- a port in use


@pytest.fixture
def held_port():
    """A loopback port another socket listens on (as another server would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("daemonize", [False, True], ids=["nodaemon", "daemon"])
def test_port_in_use_is_one_line_and_status_2(make_server, held_port, daemonize):
    """Not a traceback (twistd -n) nor a daemon's message cut at 100 bytes (twistd): the
    listener's key, its endpoint and the reason, from the command that was run."""
    server = make_server()
    endpoint = f"tcp:{held_port}:interface=127.0.0.1"
    server.set_config("smtp", "listen", ["tcp:0:interface=127.0.0.1", endpoint])
    command = server.command()
    pidfile = server.workdir / "twistd.pid"
    if daemonize:
        command.remove("-n")
        command[command.index("--pidfile=")] = f"--pidfile={pidfile}"
    try:
        result = subprocess.run(
            command, cwd=server.workdir, env=_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=FAIL_TIMEOUT,
        )
    finally:
        if daemonize and pidfile.exists():  # a daemon that started after all: end it
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
    stderr = result.stderr.decode(errors="replace")
    assert stderr == f"mailsrv: smtp.listen[1] {endpoint}: address already in use\n", stderr
    assert result.stdout == b""
    assert result.returncode == 2
    assert not pidfile.exists()
    assert "Traceback" not in server.log_text()


def test_implicit_tls_port_in_use_names_its_key(make_server, held_port):
    server = make_server()
    cert, key = self_signed(["mx.example.org"], server.workdir)
    endpoint = f"ssl:{held_port}:interface=127.0.0.1"
    server.config["tls"] = {"cert": str(cert), "key": str(key)}
    server.set_config("submission", "listen", ["tcp:0:interface=127.0.0.1", endpoint])
    result = subprocess.run(
        server.command(), cwd=server.workdir, env=_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=FAIL_TIMEOUT,
    )
    assert result.returncode == 2
    assert result.stderr.decode() == (
        f"mailsrv: submission.listen[1] {endpoint}: address already in use\n"
    )


# --------------------------------------------------------------------------- TLS at start-up


def test_tls_start_and_handshakes_give_no_legacy_context_factory_warning(make_server):
    """Twisted 26 warns (LegacyContextFactoryWarning) about a TLS context factory that does
    not declare IOpenSSLServerConnectionCreator; mailsrv's does, on 22.4 as on 26."""
    server = make_server()
    ca = make_ca(server.workdir)
    cert, key = ca.issue(["mx.example.org"], server.workdir, ips=("127.0.0.1",))
    server.config["tls"] = {"cert": str(cert), "key": str(key)}
    server.set_config("submission", "listen",
                      ["tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"])
    server.start()
    context = ca.client_context()
    with connect(server.port) as client:
        client.starttls(context=context)
        assert client.ehlo()[0] == 250
    with connect_tls(server.port_of("submission", tls=True), context) as client:
        assert client.ehlo()[0] == 250
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    server.stop()
    output = (server.workdir / "twistd.out").read_text(errors="replace") + server.log_text()
    assert "LegacyContextFactoryWarning" not in output, output
    assert "does not explicitly provide" not in output, output
    assert "Warning" not in output, output
