"""Crash safety: SIGKILL under load loses no accepted message and leaves no partial one.

Six client threads send messages (each body carries a unique token; half the clients send with
DATA, half with BDAT in two chunks, RFC 3030, one of those with BODY=BINARYMIME, which goes
through the conversion to text before its 250) while the server is killed
with SIGKILL mid-load; the server is restarted on the same configuration and the Maildirs are
checked: every message answered ``250`` is in ``new/`` of every mailbox it was addressed to
(aliases expanded), complete and once; nothing in any ``new/`` is partial or unknown; the
queue's ``incoming/`` is empty again. Whatever the kill left in a ``tmp/`` is aged past 36
hours before the restart, and the restarted server removes it.
"""

import email.parser
import email.policy
import os
import random
import re
import smtplib
import threading
import time

from support.harness import wait_for
from support.mail import connect, send_mail

CLIENTS = 6
MESSAGES_PER_CLIENT = 60
LOAD_TIME_LIMIT = 20.0  # seconds a round of load may last, whatever happens
KILL_AFTER_ACCEPTED = 30  # at least this many 250s before the kill...
KILL_AFTER_SECONDS = 1.0  # ...and at least this much load
ROUNDS = 2  # kill, restart, more load, kill, restart

LOCAL_BOXES = ["alice@example.org", "bob@example.org", "carol@example.net"]
#: What the default aliases expand to (tests/support/harness.py DEFAULT_ALIASES).
EXPANSION = {"sales@example.org": ["alice@example.org", "bob@example.org"]}
RECIPIENT_SETS = [
    ["alice@example.org"],
    ["bob@example.org"],
    ["carol@example.net"],
    ["sales@example.org"],
    ["alice@example.org", "carol@example.net"],
    ["sales@example.org", "carol@example.net"],
    ["bob@example.org", "sales@example.org"],  # bob twice: one copy
    ["alice@example.org", "bob@example.org", "carol@example.net"],
]

_PARSER = email.parser.BytesParser(policy=email.policy.compat32)
# The trace fields the server may put on top of what the client sent.
_TRACE_FIELD = re.compile(rb"(Return-Path|Delivered-To|Received|Message-ID):", re.IGNORECASE)


def mailboxes_of(recipients):
    boxes = set()
    for rcpt in recipients:
        boxes.update(EXPANSION.get(rcpt, [rcpt]))
    return boxes


def make_message(token, rng):
    """(wire bytes with CRLF, expected stored bytes with LF, body with LF) for one token."""
    header = (
        f"From: Load <load@client.test>\r\nTo: someone@example.org\r\n"
        f"Subject: {token}\r\nMessage-ID: <{token}@client.test>\r\n\r\n"
    )
    lines = [f"token {token}"]
    size = rng.randint(2000, 6000)
    total = 0
    n = 0
    while total < size:
        n += 1
        width = rng.randint(1, 76)
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 .,-") for _ in range(width))
        if n % 17 == 0:
            text = "." + text  # dot-stuffed on the wire, unstuffed in the Maildir
        lines.append(text)
        total += len(text) + 2
    lines.append(f"end {token}")
    body = "\r\n".join(lines) + "\r\n"
    wire = (header + body).encode("ascii")
    return wire, wire.replace(b"\r\n", b"\n"), body.replace("\r\n", "\n")


def send_bdat(client, sender, recipients, wire, binary=False):
    """One message over smtplib's connection with CHUNKING: two BDAT chunks, the message as
    it is (no dot-stuffing), each chunk's reply awaited; SMTPException unless all are 250.
    ``binary``: sent with BODY=BINARYMIME (a text message: its stored form is the same)."""
    client.ehlo_or_helo_if_needed()
    options = ["BODY=BINARYMIME"] if binary else []
    replies = [client.mail(sender, options)] + [client.rcpt(r) for r in recipients]
    half = len(wire) // 2
    for chunk in (b"BDAT %d\r\n" % half + wire[:half],
                  b"BDAT %d LAST\r\n" % (len(wire) - half) + wire[half:]):
        if any(code != 250 for code, _ in replies):
            break
        client.send(chunk)
        replies.append(client.getreply())
    for code, text in replies:
        if code != 250:
            raise smtplib.SMTPResponseException(code, text)


class Load:
    """CLIENTS threads, each sending up to MESSAGES_PER_CLIENT messages over smtplib."""

    def __init__(self, port, round_no, seed):
        self.port = port
        self.round_no = round_no
        self.seed = seed
        self.lock = threading.Lock()
        self.attempted = {}  # token -> (stored bytes, body, recipients)
        self.accepted = []  # tokens answered 250
        self.errors = []  # exceptions seen by clients (expected after the kill)
        self.deadline = time.monotonic() + LOAD_TIME_LIMIT
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)
        ]

    def start(self):
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def accepted_count(self):
        with self.lock:
            return len(self.accepted)

    def _client(self, n):
        rng = random.Random(self.seed * 1000 + n)
        client = None
        try:
            for i in range(MESSAGES_PER_CLIENT):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                token = f"r{self.round_no}c{n}m{i}x{rng.getrandbits(32):08x}"
                wire, stored, body = make_message(token, rng)
                recipients = rng.choice(RECIPIENT_SETS)
                with self.lock:
                    self.attempted[token] = (stored, body, recipients)
                if client is None:
                    client = connect(self.port, timeout=10)
                if n % 2:
                    send_bdat(client, "load@client.test", recipients, wire, binary=n == 3)
                else:
                    refused = client.sendmail("load@client.test", recipients, wire)
                    assert refused == {}, refused
                with self.lock:
                    self.accepted.append(token)
        except (OSError, smtplib.SMTPException) as exc:
            # After the kill: connection reset, refused, closed. Only 250s count.
            with self.lock:
                self.errors.append(exc)
        finally:
            if client is not None:
                try:
                    client.close()
                except OSError:
                    pass

    def join(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(max(0.1, self.deadline + 15 - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a client thread hung"


def stored_files(server):
    """{address: [(name, path)]} for every file in every new/."""
    result = {}
    for address in LOCAL_BOXES:
        new = server.mailbox_path(address) / "new"
        names = sorted(os.listdir(new)) if new.is_dir() else []
        result[address] = [(name, new / name) for name in names]
    return result


def check_file(path, name, attempted):
    """The file is a whole message one of the clients sent; returns its token."""
    raw = path.read_bytes()
    m = re.search(r",S=(\d+)(?::|$)", name)
    assert m, f"no S= size in {name}"
    assert int(m.group(1)) == len(raw) == os.path.getsize(path), f"partial file {name}"
    msg = _PARSER.parsebytes(raw)
    token = msg["Subject"]
    assert token in attempted, f"{name}: unknown message (Subject {token!r})"
    stored, body, _ = attempted[token]
    # The stored file is the trace fields, then exactly what the client sent (LF line ends).
    assert raw.endswith(stored), f"{name}: content differs from what was sent"
    prefix = raw[: len(raw) - len(stored)]
    for line in prefix.splitlines():
        assert line[:1] in (b" ", b"\t") or _TRACE_FIELD.match(line), (name, line)
    assert msg.get_payload() == body, f"{name}: body differs"
    assert msg["Message-ID"] == f"<{token}@client.test>"
    return token


def age_tmp_litter(server):
    """Make every file in a tmp/ look 37 hours old (one planted, in case the kill left none)."""
    (server.root / "example.org" / "alice" / "tmp").mkdir(parents=True, exist_ok=True)
    (server.root / "example.org" / "alice" / "tmp" / "1700000000.M1P1Q1.planted").write_bytes(b"x")
    then = time.time() - 37 * 3600
    litter = list(server.root.glob("*/*/tmp/*"))
    for path in litter:
        os.utime(path, (then, then))
    return litter


def check_after_restart(server, attempted, accepted):
    files = stored_files(server)
    found = {address: {} for address in LOCAL_BOXES}
    for address, entries in files.items():
        for name, path in entries:
            token = check_file(path, name, attempted)
            assert token not in found[address], f"{token} twice in {address}"
            found[address][token] = name
    for token in accepted:
        _, _, recipients = attempted[token]
        for box in mailboxes_of(recipients):
            assert token in found[box], f"accepted {token} missing from {box}"
        for box in set(LOCAL_BOXES) - mailboxes_of(recipients):
            assert token not in found[box], f"{token} delivered to {box}, not addressed"
    assert os.listdir(server.queue / "incoming") == []
    assert os.listdir(server.queue / "messages") == []  # no remote recipient was used
    return sum(len(v) for v in found.values())


def test_sigkill_under_load_loses_nothing_accepted(make_server):
    server = make_server().start()
    attempted = {}
    accepted = []
    for round_no in range(ROUNDS):
        load = Load(server.port, round_no, seed=20240 + round_no).start()
        started = time.monotonic()
        wait_for(
            lambda load=load, started=started: (load.accepted_count() >= KILL_AFTER_ACCEPTED
                     and (time.monotonic() - started >= KILL_AFTER_SECONDS
                          # a fast machine: kill at half load rather than after it
                          or load.accepted_count() >= CLIENTS * MESSAGES_PER_CLIENT // 2))
            or not any(t.is_alive() for t in load.threads),
            LOAD_TIME_LIMIT, "enough accepted messages before the kill", interval=0.01,
        )
        in_flight = any(t.is_alive() for t in load.threads)
        server.kill()
        load.join()
        attempted.update(load.attempted)
        accepted += load.accepted
        assert len(load.accepted) >= KILL_AFTER_ACCEPTED, (len(load.accepted), load.errors[:3])
        incoming_at_kill = os.listdir(server.queue / "incoming")
        litter = age_tmp_litter(server)
        server.start()
        files = check_after_restart(server, attempted, accepted)
        wait_for(lambda litter=litter: not any(path.exists() for path in litter), 10, "tmp/ cleaned")
        print(
            f"round {round_no}: killed after {time.monotonic() - started:.2f}s "
            f"(load still running: {in_flight}); attempted {len(load.attempted)}, "
            f"accepted {len(load.accepted)}, client errors {len(load.errors)}, "
            f"unfinished bodies at kill {len(incoming_at_kill)}, tmp/ files {len(litter) - 1}; "
            f"{files} files in new/ in all"
        )
    # Every kind of client had messages accepted (odd-numbered ones send with BDAT, the 4th
    # with BODY=BINARYMIME).
    clients = {int(re.match(r"r\d+c(\d+)m", t).group(1)) for t in accepted}
    assert {n % 2 for n in clients} == {0, 1} and 3 in clients
    # The server still works after the crashes.
    assert send_mail(server.port, "load@client.test", ["carol@example.net"],
                     b"Subject: after\r\n\r\nok\r\n", timeout=10) == {}
