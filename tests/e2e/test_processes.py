"""[server] processes = 2: the parent hands connections to two receiving processes; mail is
delivered and relayed through both, limits hold across them, SIGHUP reaches them, and a
killed receiving process (or parent) loses nothing that got 250."""

import os
import re
import signal
import smtplib
import socket
import stat
import struct
import threading
import time

import pytest

from support.harness import DNSServer, MailServer, SMTPSink, wait_for
from support.mail import connect, send_mail

PROCS = {"server": {"processes": 2}}


def procs_of(server):
    """proc number -> set of pids seen in the log's ``proc=N pid=P`` lines."""
    seen: dict[str, set] = {}
    for proc, pid in re.findall(r"proc=(\d+) pid=(\d+) ", server.log_text()):
        seen.setdefault(proc, set()).add(pid)
    return seen


def child_pids(server):
    """The receiving processes' pids now (children of the twistd process)."""
    parent = server.process.pid
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry))
    return sorted(pids)


def ready(server, count=2):
    return wait_for(lambda: len(re.findall(r"receiving process proc=\d+ ready",
                                           server.log_text())) >= count, 30,
                    "receiving processes ready")


@pytest.mark.parametrize("logfile_option", [False, True], ids=["log-stdout", "log-file"])
def test_mail_is_delivered_through_both_processes(make_server, logfile_option):
    """Logging to twistd's standard output (the Debian unit), the receiving processes write
    their lines there themselves; with --logfile (twistd's LogFile, which twistd rotates)
    they go to the parent on a pipe. The same lines either way."""
    server = make_server(overrides=PROCS)
    server.logfile_option = logfile_option
    server.start()
    ready(server)
    stdout = server.workdir / "twistd.out" if logfile_option else server.log_path
    assert os.path.samefile(f"/proc/{server.process.pid}/fd/1", stdout)
    for pid in child_pids(server):
        if logfile_option:
            assert stat.S_ISFIFO(os.stat(f"/proc/{pid}/fd/1").st_mode)
        else:
            assert os.path.samefile(f"/proc/{pid}/fd/1", stdout)
    # The parent answers connections once every process said ready, and says so.
    log = server.log_text()
    assert "accepting connections: 2 of 2 receiving processes ready" in log
    assert log.index("accepting connections") > max(
        m.start() for m in re.finditer(r"receiving process proc=\d+ ready", log))
    # Held open together: the parent gives the second to the process with fewer.
    first, second = connect(server.port), connect(server.port)
    for n, client in enumerate((first, second)):
        client.sendmail("a@c.test", ["alice@example.org"], f"Subject: p{n}\r\n\r\ntoken-proc-{n}\r\n")
    first.quit()
    second.quit()
    assert wait_for(lambda: len(server.messages("alice@example.org")) == 2, 10, "both delivered")
    # The processes' lines reach the parent's log just after the replies: waited for.
    wait_for(lambda: set(re.findall(r"proc=(\d+) pid=\d+ delivered", server.log_text()))
             == {"1", "2"}, 10, "a delivery logged by each process")
    assert len(child_pids(server)) == 2
    # Each a line of its own, as twistd writes its own, naming a process that runs.
    lines = re.findall(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[mailsrv#info\] "
                       r"proc=\d pid=(\d+) delivered id=\w+ ", server.log_text(), re.M)
    assert len(lines) == 2 and set(map(int, lines)) == set(child_pids(server))


def test_relayed_mail_goes_out_at_once(tmp_path):
    dns = DNSServer(tmp_path, {"records": {"remote.test": [["MX", 10, "mx1.remote.test"]],
                                           "mx1.remote.test": [["A", "127.0.0.2"]]}})
    sink = SMTPSink(tmp_path / "sink", "127.0.0.2", hostname="mx1.remote.test")
    (tmp_path / "srv").mkdir()
    server = MailServer(tmp_path / "srv", dns.port, overrides={
        **PROCS, "relay": {"port": sink.port}})
    try:
        server.start()
        ready(server)
        for n in range(3):
            started = time.monotonic()
            send_mail(server.port, "a@example.org", ["someone@remote.test"],
                      f"Subject: relay\r\n\r\ntoken-relay-procs-{n}\r\n".encode())
            sink.wait_for_messages(n + 1, timeout=10)
            # Told over the channel, the relayer sends at once (its scan is only at start-up).
            assert time.monotonic() - started < 3
        wait_for(lambda: re.search(r"proc=\d pid=\d+ queued id=(\w+)", server.log_text()), 10,
                 "the queued line")
    finally:
        server.stop()
        sink.stop()
        dns.stop()


def test_connection_limits_hold_across_processes(make_server):
    server = make_server(overrides={**PROCS, "smtp": {
        "listen": ["tcp:0:interface=127.0.0.1"], "max_connections": 3,
        "max_connections_per_ip": 3}}).start()
    ready(server)
    held = [connect(server.port) for _ in range(3)]  # spread over both processes
    try:
        with __import__("pytest").raises(smtplib.SMTPConnectError) as refused:
            connect(server.port)
        assert refused.value.smtp_code == 421
        held.pop().quit()  # one released: the parent learns it from the process
        wait_for(lambda: _can_connect(server), 10, "a connection admitted again")
    finally:
        for client in held:
            client.close()


def test_clients_resetting_at_once_neither_kill_processes_nor_leak_limits(make_server):
    """A client that connects and resets at once (SO_LINGER 0) leaves the parent a socket
    whose peer is gone by the time a process adopts it. That closed the descriptor twice and
    ended the receiving process (a flood of them kept both restarting), and the connection was
    never released: its address's slots stayed taken."""
    server = make_server(overrides={**PROCS, "smtp": {
        "listen": ["tcp:0:interface=127.0.0.1"], "max_connections": 5,
        "max_connections_per_ip": 5}}).start()  # loopback is held to the total only
    ready(server)
    before = child_pids(server)
    gone = "connection gone before its session"
    deadline = time.monotonic() + 20
    for _ in range(50):  # up to 1000 resets, bounded in time; stops once the race was seen
        if gone in server.log_text() or time.monotonic() > deadline:
            break
        for _ in range(20):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.connect(("127.0.0.1", server.port))
            s.close()
        time.sleep(0.05)
    time.sleep(0.5)  # a process that failed would have ended by now
    assert "Bad file descriptor" not in server.log_text()
    assert "ended after" not in server.log_text()
    assert child_pids(server) == before
    # Every slot is free again once the processes have said so; the limit is still exact.
    held = wait_for(lambda: _hold(server, 5), 10, "5 connections admitted")
    try:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            connect(server.port)
        assert refused.value.smtp_code == 421
    finally:
        for client in held:
            client.close()
    if gone not in server.log_text():
        pytest.skip("no reset connection reached a receiving process before its adoption")


def _hold(server, count):
    """``count`` connections admitted at once, or None (some still counted: retry)."""
    held = []
    try:
        for _ in range(count):
            held.append(connect(server.port))
    except smtplib.SMTPConnectError:
        for client in held:
            client.close()
        return None
    return held


def _can_connect(server):
    try:
        connect(server.port).quit()
        return True
    except smtplib.SMTPConnectError:
        return False


def test_sighup_reaches_every_process(make_server):
    server = make_server(overrides=PROCS).start()
    ready(server)
    before = server.log_text().count("reload (SIGHUP)")
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: set(re.findall(r"proc=(\d) pid=\d+ reload \(SIGHUP\): \d+ mailboxes",
                                    server.log_text())) == {"1", "2"},
             15, "both receiving processes reloaded")
    # The parent's own reload (in a thread of its own) may come after the processes'.
    wait_for(lambda: len(re.findall(r"\] reload \(SIGHUP\): \d+ mailboxes",
                                    server.log_text())) == 1, 15, "the parent reloaded")
    assert server.log_text().count("reload (SIGHUP)") >= before + 3


class _Load:
    """Four clients sending to bob@ until stopped; the tokens answered 250."""

    def __init__(self, server):
        self.server, self.accepted, self.stop = server, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(4)]
        for t in self.threads:
            t.start()

    def _run(self, n):
        i = 0
        while not self.stop.is_set():
            token = f"token-kill-{n}-{i}"
            try:
                send_mail(self.server.port, "a@c.test", ["bob@example.org"],
                          f"Subject: {token}\r\n\r\n{token}\r\n".encode(), timeout=10)
            except (smtplib.SMTPException, OSError):
                time.sleep(0.05)  # the server is down: try again
            else:
                self.accepted.append(token)
            i += 1

    def wait(self, more):
        count = len(self.accepted)
        wait_for(lambda: len(self.accepted) >= count + more, 60, f"{more} more accepted")

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        stored = "".join(m.as_string() for m in self.server.messages("bob@example.org"))
        return [token for token in self.accepted if token + "\n" not in stored]


def test_a_killed_process_comes_back_and_loses_nothing(make_server):
    server = make_server(overrides=PROCS).start()
    ready(server)
    load = _Load(server)
    load.wait(20)
    victim = child_pids(server)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(child_pids(server)) == 2 and victim not in child_pids(server), 15,
             "the process started again")
    load.wait(20)
    assert load.finish() == []
    assert "ended after" in server.log_text()


def test_children_die_with_a_killed_parent_and_nothing_is_lost(make_server):
    server = make_server(overrides=PROCS).start()
    ready(server)
    children = child_pids(server)
    assert len(children) == 2
    load = _Load(server)
    load.wait(20)
    server.kill()  # SIGKILL of the parent under load
    wait_for(lambda: not any(_alive(pid) for pid in children), 10,
             "the receiving processes to die with the parent")
    server.start()
    ready(server, 4)
    load.wait(10)
    assert load.finish() == []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- what stays true across processes: AUTH failures, send limits, greylisting, the queue
# command, the counters ------------------------------------------------------------------

PASSWORDS = {"alice@example.org": "alice pw"}


def _submission_server(tmp_path, **tables):
    import sys

    from support.certs import make_ca
    from support.harness import REPO

    sys.path.insert(0, str(REPO))
    from mailsrv.accounts.auth import hash_password

    dns = DNSServer(tmp_path, {"records": {}})
    ca = make_ca(tmp_path)
    cert, key = ca.issue(["mx.example.org", "localhost"], tmp_path, ips=("127.0.0.1",))
    overrides = {**PROCS, "tls": {"cert": str(cert), "key": str(key)},
                 "submission": {"listen": ["tcp:0:interface=127.0.0.1"]},
                 "checks": {"spf": False, "dkim_verify": False, "dmarc": False,
                            "protect_local_domains": False}}
    for table, values in tables.items():
        overrides.setdefault(table, {}).update(values)
    (tmp_path / "s").mkdir()
    users = [f"{a}:{hash_password(p, cost=4)}" for a, p in PASSWORDS.items()] + ["pm@example.org"]
    server = MailServer(tmp_path / "s", dns.port, users=users,
                        aliases=["postmaster: pm@example.org"], overrides=overrides)
    return server, dns, ca


def _submit(server, ca):
    client = connect(server.port_of("submission"))
    client.starttls(context=ca.client_context())
    client.ehlo()
    return client


def test_auth_lockout_is_shared_by_parallel_connections(tmp_path):
    server, dns, ca = _submission_server(tmp_path, auth={"max_failures": 3, "failure_delay": 0})
    try:
        server.start()
        ready(server)
        clients = [_submit(server, ca) for _ in range(4)]  # open together
        def plain(client, password):
            client.user, client.password = "alice@example.org", password
            return client.auth("PLAIN", client.auth_plain)  # one try (login() tries more)

        for client in clients[:3]:
            with __import__("pytest").raises(smtplib.SMTPAuthenticationError) as failed:
                plain(client, "wrong")
            assert failed.value.smtp_code == 535
        # The fourth connection, one past max_failures: locked out, the right password too.
        with __import__("pytest").raises(smtplib.SMTPAuthenticationError) as locked:
            plain(clients[3], "alice pw")
        assert locked.value.smtp_code == 454
        for client in clients:
            client.close()
    finally:
        server.stop()
        dns.stop()


def test_send_limit_is_one_ledger_for_parallel_connections(tmp_path):
    server, dns, ca = _submission_server(tmp_path, limits={"messages_per_day": 3})
    try:
        server.start()
        ready(server)
        clients = [_submit(server, ca) for _ in range(4)]
        for client in clients:
            client.login("alice@example.org", "alice pw")
        for client in clients[:3]:
            client.sendmail("alice@example.org", ["pm@example.org"], b"Subject: n\r\n\r\nx\r\n")
        # One past messages_per_day, on the fourth connection.
        code, text = clients[3].mail("alice@example.org")
        assert (code, text.decode()) == (
            451, "4.7.0 Error: sending limit reached (3 messages in 24 hours); try again later")
        wait_for(lambda: len(re.findall(r"proc=\d pid=\d+ auth ok", server.log_text())) == 4,
                 10, "four logins logged")
        assert set(re.findall(r"proc=(\d) pid=\d+ auth ok", server.log_text())) == {"1"}
        for client in clients:
            client.close()
    finally:
        server.stop()
        dns.stop()


def test_greylisting_retry_from_the_network_passes_whatever_else_is_open(tmp_path):
    delay = 3
    dns = DNSServer(tmp_path, {"records": {}})
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns.port, overrides={
        **PROCS, "relay": {"trusted_networks": ["10.0.0.0/8"]},
        "checks": {"spf": False, "dkim_verify": False, "dmarc": False,
                   "protect_local_domains": False},
        "greylist": {"enabled": True, "delay": delay}})

    def rcpt(source):
        with connect(server.port, source=source) as client:
            client.ehlo("client.test")
            client.mail("someone@sender.test")
            code = client.rcpt("alice@example.org")[0]
            if code == 250:
                client.data(b"Subject: g\r\n\r\nhello\r\n")
            return code

    try:
        server.start()
        ready(server)
        first = time.monotonic()
        assert rcpt("127.0.0.30") == 451
        # Connections held open from elsewhere: "the fewest" would now pick the other
        # process; the network's connections still go to the one that knows its triplets.
        held = [connect(server.port, source="127.0.1.1") for _ in range(3)]
        time.sleep(max(0.0, first + delay - time.monotonic()) + 0.3)
        assert rcpt("127.0.0.31") == 250  # same /24, another address, as a farm retries
        for client in held:
            client.close()
        pattern = r"proc=(\d) pid=\d+ connect client=127\.0\.0\.3"
        wait_for(lambda: len(re.findall(pattern, server.log_text())) == 2, 10, "both logged")
        assert len(set(re.findall(pattern, server.log_text()))) == 1
    finally:
        server.stop()
        dns.stop()


def test_counters_of_both_processes_are_in_the_parents_metrics(tmp_path):
    import urllib.request

    from support.harness import free_port

    port = free_port(["127.0.0.1"])
    dns = DNSServer(tmp_path, {"records": {}})
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns.port, overrides={
        **PROCS, "metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}})

    def accepted():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        found = re.search(rb'mailsrv_messages_accepted_total\{listener="smtp"\} (\S+)', text)
        return float(found.group(1)) if found else 0.0

    try:
        server.start()
        ready(server)
        clients = [connect(server.port) for _ in range(2)]  # one in each process
        for _ in range(3):
            for client in clients:
                client.sendmail("a@c.test", ["alice@example.org"], b"Subject: m\r\n\r\nm\r\n")
        for client in clients:
            client.quit()
        wait_for(lambda: set(re.findall(r"proc=(\d) pid=\d+ accepted", server.log_text()))
                 == {"1", "2"}, 10, "messages accepted by each process")
        wait_for(lambda: accepted() == 6, 10, "6 messages counted")
    finally:
        server.stop()
        dns.stop()


def test_queue_command_reaches_the_relayer_in_the_parent(tmp_path):
    import subprocess
    import sys

    from support.harness import REPO, _env, free_port

    # Nothing listens at remote.test's MX: the message is deferred and stays queued.
    dns = DNSServer(tmp_path, {"records": {"remote.test": [["MX", 10, "mx.remote.test"]],
                                           "mx.remote.test": [["A", "127.0.0.9"]]}})
    (tmp_path / "s").mkdir()
    server = MailServer(tmp_path / "s", dns.port, overrides={
        **PROCS, "relay": {"port": free_port(["127.0.0.9"])},
        "queue": {"retry_schedule": [3600]}})
    try:
        server.start()
        ready(server)
        send_mail(server.port, "a@example.org", ["someone@remote.test"],
                  b"Subject: q\r\n\r\nqueued\r\n")
        queue_id = wait_for(lambda: re.search(r"proc=\d pid=\d+ queued id=(\w+)",
                                              server.log_text()), 10, "queued").group(1)
        wait_for(lambda: "status=deferred" in server.log_text(), 30, "the deferral")
        done = subprocess.run(
            [sys.executable, "-m", "mailsrv.tools.cli", "queue", "--config",
             str(server.config_path), "delete", queue_id],
            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"deleted {queue_id}" in done.stdout + done.stderr
        assert not list((server.queue / "messages").iterdir())
    finally:
        server.stop()
        dns.stop()


def test_a_restarted_process_keeps_the_parents_users_when_the_file_broke(make_server):
    server = make_server(overrides=PROCS).start()
    ready(server)
    users = server.workdir / "users"
    users.write_text(users.read_text() + "not an address\n")
    wait_for(lambda: "reload (changed on disk) refused" in server.log_text(), 10, "the refusal")
    for pid in child_pids(server):
        os.kill(pid, signal.SIGKILL)
    ready(server, 4)
    # Both restarted with the users the parent kept: mail for alice is still delivered.
    clients = [connect(server.port), connect(server.port)]
    for client in clients:
        assert client.sendmail("a@c.test", ["alice@example.org"], b"Subject: k\r\n\r\nk\r\n") == {}
        client.quit()
    wait_for(lambda: len(re.findall(r"proc=\d pid=\d+ reload \(receiving process start\) refused",
                                    server.log_text())) == 2, 10, "each process refused the file")
