"""
Real mail programs from Debian submitting through mailsrv: msmtp and swaks, with STARTTLS on
the submission port and with implicit TLS, AUTH PLAIN and LOGIN, the server's certificate
verified against the test CA; and Dovecot's doveadm verifying a hash that ``mailsrv user add``
wrote (one users file for both servers).  Each is skipped, with the reason, where the
program is not installed or lacks what the test needs (swaks without Net::SSLeay has no TLS;
.ci/run installs them all).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from test_submission import USERS_PASSWORDS, env, make_server, received_of, server  # noqa: F401

from support.harness import REPO, wait_for
from support.peers import SWAKS, swaks_lacks

MSMTP = shutil.which("msmtp")
DOVEADM = shutil.which("doveadm")


def message(marker: str, sender: str = "alice@example.org") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: bob@example.org\r\nSubject: {marker}\r\n"
            f"Message-Id: <{marker}@client.test>\r\n\r\n{marker}\r\n").encode()


@pytest.mark.skipif(MSMTP is None, reason="msmtp is not installed (apt install msmtp)")
@pytest.mark.parametrize("implicit, mechanism", [(False, "plain"), (False, "login"),
                                                 (True, "plain"), (True, "login")])
def test_msmtp(env, server, tmp_path, implicit, mechanism):  # noqa: F811
    marker = f"msmtp-{'465' if implicit else '587'}-{mechanism}"
    password_file = tmp_path / "password"
    password_file.write_text(USERS_PASSWORDS["alice@example.org"])
    rc = tmp_path / "msmtprc"
    rc.write_text("")  # no system or user configuration: everything is on the command line
    rc.chmod(0o600)
    command = [
        MSMTP, f"--file={rc}", "--host=127.0.0.1",
        f"--port={server.port_of('submission', tls=implicit)}", "--domain=client.test",
        "--tls=on", f"--tls-starttls={'off' if implicit else 'on'}",
        f"--tls-trust-file={env['ca'].cert_path}", f"--auth={mechanism}",
        "--user=alice@example.org", f"--passwordeval=cat {password_file}",
        "--from=alice@example.org", "--timeout=20", "--", "bob@example.org",
    ]
    result = subprocess.run(command, input=message(marker), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=60)
    assert result.returncode == 0, result.stdout.decode(errors="replace")
    found = wait_for(lambda: received_of(server, "bob@example.org", marker), 10, marker)
    assert "with ESMTPSA (TLSv1." in " ".join(found["Received"].split())


@pytest.mark.skipif(MSMTP is None, reason="msmtp is not installed (apt install msmtp)")
def test_msmtp_wrong_password_is_refused(env, server, tmp_path):  # noqa: F811
    rc = tmp_path / "msmtprc"
    rc.write_text("")
    rc.chmod(0o600)
    result = subprocess.run(
        [MSMTP, f"--file={rc}", "--host=127.0.0.1", f"--port={server.port_of('submission')}",
         "--domain=client.test", "--tls=on", "--tls-starttls=on",
         f"--tls-trust-file={env['ca'].cert_path}", "--auth=plain",
         "--user=alice@example.org", "--passwordeval=echo wrong", "--from=alice@example.org",
         "--timeout=20", "--", "bob@example.org"],
        input=message("msmtp-wrong"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=60,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode != 0
    assert "535 5.7.8" in output, output


@pytest.fixture(scope="module")
def swaks_env(tmp_path_factory):
    """swaks must not ask the resolver (see test_swaks.py): Sys::Hostname refuses to load."""
    lib = tmp_path_factory.mktemp("perl5lib")
    (lib / "Sys").mkdir()
    (lib / "Sys" / "Hostname.pm").write_text('die "mailsrv tests: no hostname lookups\\n";\n1;\n')
    environment = dict(os.environ)
    environment["PERL5LIB"] = str(lib) + (
        os.pathsep + environment["PERL5LIB"] if environment.get("PERL5LIB") else "")
    return environment


@pytest.mark.parametrize("implicit, mechanism", [(False, "LOGIN"), (True, "PLAIN")])
def test_swaks(env, server, swaks_env, implicit, mechanism):  # noqa: F811
    reason = swaks_lacks("TLS", "Basic AUTH", env=swaks_env)
    if reason is not None:
        pytest.skip(reason)
    marker = f"swaks-{'465' if implicit else '587'}-{mechanism}"
    command = [
        SWAKS, "--server", "127.0.0.1", "--port", str(server.port_of("submission", tls=implicit)),
        "--tlsc" if implicit else "--tls", "--tls-verify", "--tls-ca-path",
        str(env["ca"].cert_path), "--auth", mechanism, "--auth-user", "alice@example.org",
        "--auth-password", USERS_PASSWORDS["alice@example.org"], "--helo", "client.test",
        "--from", "alice@example.org", "--to", "bob@example.org", "--timeout", "20",
        "--header", f"Message-Id: <{marker}@client.test>", "--header", f"Subject: {marker}",
        "--body", marker,
    ]
    result = subprocess.run(command, env=swaks_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output
    assert "235 2.7.0 Authentication successful" in output
    queue_id = re.search(r"<[-~]  250 2\.0\.0 Ok: queued as (\S+)", output).group(1)  # ~: in TLS
    found = wait_for(lambda: received_of(server, "bob@example.org", marker), 10, marker)
    assert f"id {queue_id}" in " ".join(found["Received"].split())


def test_swaks_auth_without_tls_is_refused(server, swaks_env):  # noqa: F811
    reason = swaks_lacks("Basic AUTH", env=swaks_env)
    if reason is not None:
        pytest.skip(reason)
    result = subprocess.run(
        [SWAKS, "--server", "127.0.0.1", "--port", str(server.port_of("submission")),
         "--auth", "PLAIN", "--auth-user", "alice@example.org", "--auth-password", "x",
         "--helo", "client.test", "--from", "alice@example.org", "--to", "bob@example.org",
         "--timeout", "20"],
        env=swaks_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=60,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode != 0
    # AUTH is not even advertised before TLS, so swaks gives up before sending it.
    assert "Host did not advertise authentication" in output, output


@pytest.mark.skipif(DOVEADM is None, reason="doveadm is not installed (apt install dovecot-core)")
def test_doveadm_verifies_the_hash_mailsrv_user_add_wrote(env, tmp_path):  # noqa: F811
    s = make_server(env, tmp_path / "s")  # only its configuration and files are needed
    result = subprocess.run(
        [sys.executable, "-m", "mailsrv.tools.cli", "user", "--config", str(s.config_path), "add",
         "erin@example.org", "--password-stdin"],
        input="erin's pässword\n".encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60,
    )
    assert result.returncode == 0, result.stderr
    line = next(entry for entry in (s.workdir / "users").read_text().splitlines()
                if entry.startswith("erin@example.org:"))
    hashed = line.split(":")[1]
    assert hashed.startswith("{BLF-CRYPT}$2y$12$")
    ok = subprocess.run([DOVEADM, "pw", "-t", hashed, "-p", "erin's pässword"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert ok.returncode == 0 and b"(verified)" in ok.stdout, ok.stdout
    bad = subprocess.run([DOVEADM, "pw", "-t", hashed, "-p", "erin's password"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert bad.returncode != 0
