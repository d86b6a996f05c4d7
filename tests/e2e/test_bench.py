"""
The bench's own checks (bench/): the content check of delivered messages, the CPU load it
records with each figure, and its private Postfix starting from a directory outside /var with
Postfix's own words when it cannot start.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from bench import content, cpuload, freshfs
from support.mail import send_mail

STAT_BEFORE = """cpu  100 0 50 1000 20 0 5 0 0 0
cpu0 50 0 25 500 10 0 3 0 0 0
intr 1 2 3
"""
#: +60 user, +30 system, +80 idle, +10 iowait, +20 steal: 200 ticks.
STAT_AFTER = """cpu  160 0 80 1080 30 0 5 20 0 0
cpu0 80 0 40 540 15 0 3 10 0 0
intr 4 5 6
"""


def test_cpuload_shares_of_the_interval():
    load = cpuload.between(cpuload.parse(STAT_BEFORE), cpuload.parse(STAT_AFTER))
    assert load == {"idle": 45.0, "iowait": 5.0, "steal": 10.0, "ticks": 200}
    assert cpuload.summary([load]) == "idle 45%, steal 10%"
    assert cpuload.summary([load, dict(load, idle=12.0)]) == "idle 12-45%, steal 10%"


def test_cpuload_without_a_steal_column_and_over_no_time():
    old = cpuload.parse("cpu 10 0 10 100 0 0 0\n")  # kernels before 2.6.11
    assert old.ticks[-1] == 0
    assert cpuload.between(old, old)["ticks"] == 0
    assert cpuload.summary([cpuload.between(old, old)]) == ""


def test_cpuload_reads_this_machine():
    with cpuload.Interval() as load:
        sum(range(100_000))
    assert set(load.result) == {"idle", "iowait", "steal", "ticks"}


# ------------------------------------------------------------------------------- content

BODY = b"".join(b"%dXXXXXXXXXX\r\n" % i for i in range(1, 20))


def sent(subject: str = "bench mailsrv c10 abc", msgid: str = "<1.3.0001@vm>") -> bytes:
    return (f"From: <bench@client.test>\r\nTo: <alice@example.org>\r\n"
            f"Message-Id: {msgid}\r\nSubject: {subject}\r\n\r\n").encode() + BODY


def delivered(message: bytes) -> bytes:
    """As a Maildir server stores it: a trace header on top, LF line ends."""
    return (b"Received: from vm\r\n\tby mx; Wed, 2 Dec 2026\r\n" + message).replace(b"\r\n", b"\n")


EXPECTED = content.expected_from(sent())


def test_fresh_filesystem_for_a_turn(tmp_path):
    """A turn's directory becomes a new ext4 (same disk state for every peer), then goes."""
    why_not = freshfs.available()
    if why_not:
        pytest.skip(f"no fresh file system here: {why_not}")
    turn = tmp_path / "tp-mailsrv-0"
    try:
        freshfs.mount(turn, size="64M")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no loop device to mount an image (a container?): {e.stderr.strip()}")
    try:
        assert os.path.ismount(turn) and (turn / "lost+found").is_dir()
        assert (turn.stat().st_mode & 0o777) == 0o755  # Postfix's daemons reach their files
        assert os.statvfs(turn).f_blocks * os.statvfs(turn).f_frsize <= 64 << 20
        (turn / "mail").write_bytes(b"x")
    finally:
        assert freshfs.unmount(turn)
    assert not os.path.ismount(turn) and not (turn / "mail").exists()
    assert list(tmp_path.iterdir()) == [turn]  # the image went with it
    assert not freshfs.unmount(turn)  # not one of ours any more


def test_content_as_sent_passes():
    files = [("alice", "1", delivered(sent(msgid="<1@vm>"))),
             ("alice", "2", delivered(sent(msgid="<2@vm>"))),
             ("2alice", "3", delivered(sent(msgid="<1@vm>")))]  # one message, two mailboxes
    assert content.check(files, EXPECTED) == (3, [])
    assert EXPECTED.headers == {"From": "<bench@client.test>", "To": "<alice@example.org>",
                                "Subject": "bench mailsrv c10 abc"}
    assert EXPECTED.body_length == len(BODY.replace(b"\r\n", b"\n"))


@pytest.mark.parametrize("damage", [
    lambda m: m[:-5] + b"\r\n",                     # truncated
    lambda m: m.replace(b"7XXXX", b"7XXXY"),        # one octet changed
    lambda m: m + b"..\r\n",                         # a dot line not unstuffed
    lambda m: m.replace(b"\r\n\r\n1X", b"\r\n1X"),  # the body run into the header
])
def test_damaged_body_fails(damage):
    checked, problems = content.check([("alice", "1", delivered(damage(sent())))], EXPECTED)
    assert checked == 1 and problems
    assert "body of" in problems[0] or "Subject" in problems[0]


def test_file_of_another_run_fails():
    _, problems = content.check([("alice", "1", delivered(sent(subject="bench x c1 old")))],
                                EXPECTED)
    assert problems == ["alice/new/1: Subject: expected 'bench mailsrv c10 abc', "
                        "found ['bench x c1 old']"]


def test_message_delivered_twice_fails():
    files = [("alice", "1", delivered(sent())), ("alice", "2", delivered(sent()))]
    _, problems = content.check(files, EXPECTED)
    assert len(problems) == 1 and "also in 1" in problems[0]


def test_problems_are_bounded():
    files = [("alice", str(i), delivered(sent(msgid=f"<{i}@vm>"))[:-10]) for i in range(50)]
    checked, problems = content.check(files, EXPECTED, limit=3)
    assert checked == 50 and len(problems) == 4 and problems[-1] == "… and 47 more"


def each(n: int, body: bytes = b"") -> bytes:
    return (f"Subject: bench {n}\r\nMessage-ID: <bench{n}@client.test>\r\n\r\n".encode()
            + (body or b"body of message %d\r\n" % n))


SENT_EACH = {f"<bench{n}@client.test>": each(n) for n in range(3)}


def test_each_message_as_sent_passes():
    files = [("alice", str(n), delivered(each(n))) for n in (2, 0, 1)]
    assert content.check_each(files, SENT_EACH) == (3, [])


def test_each_message_bodies_swapped_fails():
    files = [("alice", "0", delivered(each(0, b"body of message 1\r\n"))),
             ("alice", "1", delivered(each(1, b"body of message 0\r\n"))),
             ("alice", "2", delivered(each(2)))]
    checked, problems = content.check_each(files, SENT_EACH)
    assert checked == 3 and len(problems) == 2
    assert problems[0].startswith("alice/new/0: Message-ID <bench0@client.test>: body of 18")


def test_each_message_twice_and_one_lost_fails():
    files = [("alice", "0", delivered(each(0))), ("alice", "0b", delivered(each(0))),
             ("alice", "1", delivered(each(1))), ("alice", "x", delivered(each(7)))]
    _, problems = content.check_each(files, SENT_EACH)
    assert problems == [
        "alice/new/0b: Message-ID <bench0@client.test> also in 0 (one message delivered twice)",
        "alice/new/x: Message-ID '<bench7@client.test>' was not sent",
        "1 message(s) sent but not delivered, e.g. <bench2@client.test>",
    ]


def test_capture_keeps_the_message_as_sent():
    message = sent() + b".starts with a dot\r\n..two dots\r\n"

    def send(port: int) -> None:
        send_mail(port, "bench@client.test", ["alice@example.org"], message, timeout=10)

    assert content.capture(send, timeout=10) == message


def test_capture_reports_a_client_that_never_came():
    with pytest.raises(RuntimeError, match="capturing the reference message"):
        content.capture(lambda port: None, timeout=0.5)


# ------------------------------------------------------------------------------- Postfix


def unpacked_postfix() -> Path | None:
    from bench import postfix

    root = postfix.POSTFIX_HOME / "root"
    if os.geteuid() != 0 or not (root / "usr/sbin/postfix").exists():
        return None
    return root


needs_postfix = pytest.mark.skipif(
    unpacked_postfix() is None,
    reason="needs root and the bench's unpacked Postfix (bench/run fetches it)")


@pytest.fixture
def outside_var():
    """A directory under /tmp (not /var) that Postfix's users can reach, as --workdir makes."""
    path = Path(tempfile.mkdtemp(prefix="bench-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_postfix
def test_postfix_starts_outside_var(outside_var):
    from bench import postfix

    server = postfix.Postfix(outside_var / "tp")
    try:
        port = server.start()
        assert postfix.greets(port)
        settings = server.non_default_settings()
        assert settings["maillog_file_prefixes"]["value"] == str(server.dir)
        assert settings["biff"] == {"value": "no", "default": "yes"}
        assert "mail_owner" not in settings  # set, but to the default
    finally:
        server.stop()
    assert readme_postfix_settings() == set(settings)


def readme_postfix_settings() -> set[str]:
    """The settings named in the first column of bench/README.md's "Postfix's settings" table."""
    text = (Path(__file__).resolve().parents[2] / "bench" / "README.md").read_text()
    section = text.split("### Postfix's settings", 1)[1].split("\n#", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    return names


@needs_postfix
def test_postfix_that_cannot_start_says_why(outside_var):
    from bench import postfix

    server = postfix.Postfix(outside_var / "tp", extra={"maillog_file_prefixes": "/var"})
    try:
        with pytest.raises(RuntimeError) as failed:
            server.start()
    finally:
        server.stop()
    assert "postfix did not start (postfix start: exit 1):\n  postfix: fatal: maillog_file " \
        "value" in str(failed.value)
    assert "does not match any prefix in maillog_file_prefixes" in str(failed.value)


# ------------------------------------------------------------------------ issue 13 checks


def sink_dump(message: bytes) -> bytes:
    """A message as Postfix's smtp-sink -d dumps it: its X- lines on top, LF line ends."""
    return (b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: mailsrv.bench\n"
            b"X-Mail-Args: <bench@example.org>\nX-Rcpt-Args: <u@sink.test>\n"
            + message.replace(b"\r\n", b"\n"))


def test_sink_message_is_the_message_as_relayed():
    from bench import mailauth

    assert mailauth.sink_message(sink_dump(sent())) == sent()


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_check_at_the_sink(tmp_path, algorithm):
    from bench import mailauth
    from mailsrv.message import dkimkeys, dkimsign

    pem = dkimkeys.generate(algorithm)
    record = dkimkeys.txt_value(*dkimkeys.public_key(pem))
    key_file = tmp_path / "bench.key"
    key_file.write_bytes(pem)
    key_file.chmod(0o600)
    key = dkimkeys.read_key(key_file, "example.org", "bench")
    message = sent().replace(b"client.test", b"example.org").replace(b"\r\n", b"\n")
    signed = dkimsign.sign(message, [key]) + message  # as mailsrv signs, LF line ends
    sink = tmp_path / "sink"
    sink.mkdir()
    (sink / "1").write_bytes(sink_dump(signed))
    assert mailauth.check_signed(sink, algorithm, record) == (1, [])
    _, problems = mailauth.check_signed(sink, "unsigned", None)
    assert problems == ["1: signed, though no key was configured"]
    (sink / "1").write_bytes(sink_dump(signed.replace(b"7XXXX", b"7XXXY")))
    _, problems = mailauth.check_signed(sink, algorithm, record)
    assert problems == ["1: the DKIM-Signature does not verify (dkimpy)"]
    (sink / "1").write_bytes(sink_dump(message))
    assert mailauth.check_signed(sink, "unsigned", None) == (1, [])
    _, problems = mailauth.check_signed(sink, algorithm, record)
    assert problems and "found 0" in problems[0]


def test_authentication_results_check():
    from bench import mailauth

    passed = (b"Authentication-Results: mailsrv.bench;\n\tspf=pass smtp.mailfrom=sender.test;"
              b"\n\tdkim=pass header.d=sender.test;\n\tdmarc=pass header.from=sender.test\n")
    failed = passed.replace(b"dmarc=pass", b"dmarc=fail")
    theirs = passed.replace(b"mailsrv.bench", b"mx.sender.test")
    assert mailauth.check_results([("alice", "1", delivered(sent()).replace(
        b"Received", passed + b"Received", 1))], checks_on=True) == []
    assert mailauth.check_results([("alice", "1", delivered(sent()))], checks_on=False) == []
    assert mailauth.check_results([("alice", "1", delivered(sent()).replace(
        b"Received", theirs + b"Received", 1))], checks_on=False) == []
    for head in (failed, theirs, b""):
        problems = mailauth.check_results([("alice", "1", delivered(sent()).replace(
            b"Received", head + b"Received", 1))], checks_on=True)
        assert len(problems) == 1 and "expected one Authentication-Results" in problems[0]
    problems = mailauth.check_results([("alice", "1", delivered(sent()).replace(
        b"Received", passed + b"Received", 1))], checks_on=False)
    assert problems and "checks off, yet" in problems[0]


# ------------------------------------------------------------------------ issue 14 checks


@pytest.mark.parametrize("variant", ["off", "dnsbl+greylist", "rspamd"])
def test_gate_variants_are_valid_configurations(tmp_path, variant):
    from bench import gate, peers
    from mailsrv.config.load import load_config

    server = peers.Mailsrv(tmp_path, dns_port=53, overrides=gate.overrides(
        variant, "http://127.0.0.1:11333" if variant == "rspamd" else None))
    config = load_config(server.config_path)
    assert not (config.checks.spf or config.checks.dkim_verify or config.checks.dmarc
                or config.checks.arc or config.checks.protect_local_domains)
    assert config.dnsbl.enabled == config.greylist.enabled == (variant == "dnsbl+greylist")
    assert config.rspamd.enabled == (variant == "rspamd")
    if variant == "dnsbl+greylist":
        assert config.greylist.auto_allow == 0  # every RCPT through the triplet store
    if variant == "rspamd":
        assert config.rspamd.on_failure == "tempfail"  # an unscanned message is not delivered
    trusted = [ipaddress.ip_network(str(n)) for n in config.relay.trusted_networks]
    assert trusted and not any(ipaddress.ip_address(ip) in net for ip in gate.SOURCES
                               for net in trusted)  # the clients are not trusted


def test_gate_messages_each_their_own():
    from bench import gate

    made = gate.messages(3, "t")
    assert len(made) == 3 and len({content.split(m)[1] for m in made.values()}) == 3
    assert all(f"Message-ID: {msgid}\r\n".encode() in m for msgid, m in made.items())


def test_scan_lines_over_rotated_logs(tmp_path):
    from bench import gate

    log = tmp_path / "mailsrv.log"
    (tmp_path / "mailsrv.log.2").write_text("a rspamd id=A1 action=\"no action\" score=0.10/15.00 "
                                            "time=0.010\n")
    (tmp_path / "mailsrv.log.1").write_text("b rspamd id=A2 failed: HTTP 500 time=0.5 "
                                            "on_failure=tempfail\n")
    log.write_text("c rspamd id=A3 action=\"no action\" score=0.10/15.00 time=0.030\n"
                   "c rspamd id=A3 renamed 1 header field(s) it asked to remove\n")
    text = gate.whole_log(log)
    assert [line[0] for line in text.splitlines()] == ["a", "b", "c", "c"]
    assert gate.scan_times(text) == ([0.010, 0.030], 1)
    assert gate.whole_log(tmp_path / "missing.log") == ""


def test_rspamd_task_times():
    from bench import gate

    line = ("2026-12-03 09:25:01 #3(normal) <6f0e2a>; task; rspamd_task_write_log: id: "
            "<gate1@sender.test>, qid: <A1>, ip: 127.0.0.10, from: <bench@sender.test>, "
            "(default: F (no action): [0.40/100.00] [ARC_NA(0.00){}]), len: 5353, "
            "time: 4.660ms, dns req: 2, digest: <abc>, rcpts: <alice@example.org>\n")
    assert gate.rspamd_task_times(line * 2 + "other line time: 9ms\n") == [4.66, 4.66]


def test_process_tree_seconds_counts_the_children():
    import subprocess
    import sys

    from bench import gate

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = cpuload.process_seconds(os.getpid())
        assert gate.process_tree_seconds(os.getpid()) >= mine
        assert gate.process_tree_seconds(child.pid) == cpuload.process_seconds(child.pid)
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------ issue 18: CPU, relay


def test_pid_stat_counts_reaped_children():
    # pid (comm with ) and spaces) state ppid ... utime stime cutime cstime ...
    text = "42 (a) b) S 7 1 1 0 -1 0 0 0 0 0 30 12 100 8 20 0 1 0 5 0 0\n"
    assert cpuload.parse_pid_stat(text) == (7, 30 + 12 + 100 + 8)


def test_tree_ticks_sums_the_server_and_what_it_started():
    stats = {1: (0, 1000),      # init: not the server's
             10: (1, 5),        # the server (e.g. Postfix's master), its reaped children in it
             11: (10, 7),       # a child (smtpd)
             12: (11, 3),       # a grandchild
             13: (10, 2),       # another child
             20: (1, 50)}       # another server beside it
    assert cpuload.tree_ticks(stats, 10) == 5 + 7 + 3 + 2
    assert sorted(cpuload.descendants(stats, 10)) == [10, 11, 12, 13]
    assert cpuload.tree_ticks(stats, 99) == 0  # gone


def test_tree_seconds_keeps_a_child_that_exited():
    """A child's CPU stays in the tree's figure after it exited (in the parent's cutime), as
    Postfix's smtpd processes do during a run."""
    import subprocess
    import sys

    before = cpuload.tree_seconds(os.getpid())
    burn = "import time\nwhile time.process_time() < 0.3: pass\n"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert cpuload.tree_seconds(os.getpid()) - before >= 0.3 - 0.02
    assert os.getpid() in cpuload.tree_pids(os.getpid())


def relayed(n: int, subject: str = "bench mailsrv e2e open x", body: bytes = BODY,
            rcpts: int = 1) -> bytes:
    """Message ``n`` of an end-to-end relay run as smtp-sink -d dumps it (then its empty line)."""
    head = b"".join(b"X-Rcpt-Args: <%du@sink.test>\n" % (n + k) for k in range(rcpts))
    message = (f"Received: from mailsrv.bench\r\nFrom: <bench@client.test>\r\n"
               f"To: <{n}u@sink.test>\r\nMessage-Id: <{n}@vm>\r\nSubject: {subject}\r\n\r\n"
               ).encode() + body
    return (b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Mail-Args: <b@client.test>\n"
            + head + message.replace(b"\r\n", b"\n") + b"\n")


E2E_EXPECTED = content.Expected(content.digest(BODY.replace(b"\r\n", b"\n")),
                                len(BODY.replace(b"\r\n", b"\n")),
                                {"Subject": "bench mailsrv e2e open x"})


def test_sink_check_each_recipient_once():
    from bench import endtoend

    files = [(str(n), relayed(n)) for n in (3, 1, 2)]
    assert endtoend.check_sink(files, 3, E2E_EXPECTED) == (3, [])
    _, problems = endtoend.check_sink(files + [("4", relayed(2))], 3, E2E_EXPECTED)
    assert problems[0] == "1 recipient(s) relayed more than once, e.g. ['2u@sink.test']"
    _, problems = endtoend.check_sink(files[:2], 3, E2E_EXPECTED)
    assert problems == ["1 recipient(s) never at the sink, e.g. ['2u@sink.test']"]
    _, problems = endtoend.check_sink(files + [("9", relayed(9))], 3, E2E_EXPECTED)
    assert problems == ["1 recipient(s) not sent, e.g. ['9u@sink.test']"]
    _, problems = endtoend.check_sink([("1", relayed(1, rcpts=2))], 1, E2E_EXPECTED)
    assert problems[0] == "1: 2 recipients, expected one"


@pytest.mark.parametrize("damaged", [
    relayed(2, body=BODY[:-3] + b"\r\n"),
    relayed(2, body=BODY.replace(b"7XXXX", b"7XXXY")),
    relayed(2, subject="bench postfix e2e open y"),
])
def test_sink_check_content(damaged):
    from bench import endtoend

    checked, problems = endtoend.check_sink([("1", relayed(1)), ("2", damaged)], 2,
                                            E2E_EXPECTED)
    assert checked == 2 and len(problems) == 1 and problems[0].startswith("sink/new/2: ")


def test_relay_lines_through_the_mx():
    from bench import endtoend

    sent = ('2026-12-03T15:45:01+0000 [-] relay id=1xA from=<b@client.test> to=<1u@sink.test> '
            'relay=mx.sink.test[127.0.0.1]:40001 tls=none delay=0.1 tries=1 status=sent '
            'reply="250 2.0.0 Ok"\n')
    elsewhere = sent.replace("mx.sink.test", "mx.other.test")
    deferred = sent.replace("status=sent", "status=deferred")
    assert endtoend.sent_lines(sent * 3 + elsewhere + deferred) == 3


@needs_postfix
@pytest.mark.parametrize("name", ["mailsrv", "postfix"])
def test_relay_end_to_end_quick(outside_var, name, monkeypatch):
    """The end-to-end relay measure, small: every message at the sink once and as sent, for
    mailsrv (two receiving processes; its log shows each sent through sink.test's MX from
    the bench's DNS server) and for Postfix, in both client styles."""
    from bench import endtoend, harness

    results = harness.Results()
    monkeypatch.setattr(harness, "RESULTS", results)
    monkeypatch.setattr(endtoend, "RESULTS", results)
    monkeypatch.setattr(harness, "PROCESSES", 2)
    # 100 messages: /proc counts CPU in 10 ms ticks per process, and Postfix spreads 20
    # messages' few tens of ms over several daemons, each of which could read 0.
    for style in harness.STYLES:
        endtoend.relay(name, style, 100, outside_var / f"e2e-{name}-{style.replace('/', '-')}")
    assert results.failures == []
    for style in harness.STYLES:
        measure = endtoend.measure(style)
        assert len(results.samples[measure][name]) == 1
        assert results.samples[harness.cpu_measure(measure)][name][0] > 0
        assert len(results.samples[endtoend.measure(style, "accepted msg/s")][name]) == 1
        check = results.checks[measure][name][0]
        assert check.startswith("100 sent, 100 at the sink, ")
        if name == "mailsrv":
            assert "100 sent via sink.test's MX" in check


@needs_postfix
def test_throughput_both_client_styles_quick(outside_var, monkeypatch):
    """A throughput case in both client styles against mailsrv with two receiving processes:
    every message delivered as sent, the rate and the CPU of all its processes recorded."""
    from bench import harness, run

    results = harness.Results()
    monkeypatch.setattr(harness, "RESULTS", results)
    monkeypatch.setattr(harness, "PROCESSES", 2)
    server = harness.make_server("mailsrv", outside_var / "tp")
    try:
        server.start()
        assert len(cpuload.tree_pids(server.pids()[0])) >= 3  # the parent and two children
        for style in harness.STYLES:
            run.throughput(server, "c10", 20, results, style)
    finally:
        server.stop()
    assert results.failures == []
    for style in harness.STYLES:
        assert results.checks[f"throughput c10 {style}"]["mailsrv"] == [
            "20x1 sent, 20 in new/, content of 20 as sent"]
        assert results.samples[f"throughput c10 {style} CPU ms/msg"]["mailsrv"][0] > 0
