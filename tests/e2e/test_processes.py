"""[server] processes = 2: the parent hands connections to two receiving processes; mail is
delivered and relayed through both, limits hold across them, SIGHUP reaches them, and a
killed receiving process (or parent) loses nothing that got 250."""

import os
import re
import signal
import smtplib
import threading
import time

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


def test_mail_is_delivered_through_both_processes(make_server):
    server = make_server(overrides=PROCS).start()
    ready(server)
    # Held open together: the parent gives the second to the process with fewer.
    first, second = connect(server.port), connect(server.port)
    for n, client in enumerate((first, second)):
        client.sendmail("a@c.test", ["alice@example.org"], f"Subject: p{n}\r\n\r\ntoken-proc-{n}\r\n")
    first.quit()
    second.quit()
    assert wait_for(lambda: len(server.messages("alice@example.org")) == 2, 10, "both delivered")
    delivering = set(re.findall(r"proc=(\d+) pid=\d+ .*delivered", server.log_text()))
    assert delivering == {"1", "2"}, server.log_text()[-3000:]
    assert len(child_pids(server)) == 2


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
        assert re.search(r"proc=\d pid=\d+ queued id=(\w+)", server.log_text())
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
    wait_for(lambda: len(re.findall(r"proc=\d pid=\d+ .*reload \(SIGHUP\)", server.log_text()))
             >= 2, 15, "both receiving processes reloaded")
    text = server.log_text()
    assert set(re.findall(r"proc=(\d) pid=\d+ .*reload \(SIGHUP\)", text)) == {"1", "2"}
    assert text.count("reload (SIGHUP)") >= before + 3  # and the parent


def test_a_killed_process_comes_back_and_loses_nothing(make_server):
    server = make_server(overrides=PROCS).start()
    ready(server)
    accepted, stop = [], threading.Event()

    def load(n):
        i = 0
        while not stop.is_set():
            token = f"token-kill-{n}-{i}"
            try:
                send_mail(server.port, "a@c.test", ["bob@example.org"],
                          f"Subject: {token}\r\n\r\n{token}\r\n".encode(), timeout=10)
            except (smtplib.SMTPException, OSError):
                pass
            else:
                accepted.append(token)
            i += 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(accepted) >= 20, 30, "load")
    victim = child_pids(server)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(child_pids(server)) == 2 and victim not in child_pids(server), 15,
             "the process started again")
    count = len(accepted)
    wait_for(lambda: len(accepted) >= count + 20, 30, "load after the restart")
    stop.set()
    for t in threads:
        t.join()
    assert "ended after" in server.log_text()
    stored = "".join(m.as_string() for m in server.messages("bob@example.org"))
    missing = [token for token in accepted if token not in stored]
    assert not missing


def test_children_die_with_a_killed_parent(make_server):
    server = make_server(overrides=PROCS).start()
    ready(server)
    children = child_pids(server)
    assert len(children) == 2
    send_mail(server.port, "a@c.test", ["alice@example.org"], b"Subject: x\r\n\r\ntoken-pk\r\n")
    server.kill()
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in children),
             10, "the receiving processes to die with the parent")
    server.start()
    ready(server, 4)
    send_mail(server.port, "a@c.test", ["alice@example.org"], b"Subject: y\r\n\r\ntoken-pk2\r\n")
    stored = "".join(m.as_string() for m in server.messages("alice@example.org"))
    assert "token-pk\n" in stored and "token-pk2" in stored


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
