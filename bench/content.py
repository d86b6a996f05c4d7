"""
The content check of the throughput runs: every delivered file must hold what smtp-source sent.

Counting files in ``new/`` does not show a truncated, mangled or duplicated message. So each
throughput run gives smtp-source a Subject naming the run (``-S``), and afterwards every file the
run delivered is read back and must have

- the run's Subject, smtp-source's ``From:`` and ``To:``;
- exactly the body smtp-source sends (its SHA-256 and length; line ends compared as LF, since a
  Maildir stores LF), that body captured once from smtp-source itself by ``capture`` — a
  one-connection SMTP receiver that keeps the DATA as it came, dots unstuffed;
- a ``Message-Id`` no other file of the run has in the same mailbox: smtp-source numbers its
  messages (``<pid.fd.counter@host>``), so a message delivered twice in place of another one —
  which the count alone would pass — shows as a duplicate.

``check`` is pure; ``capture`` talks to 127.0.0.1 only, once, bounded in time.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Callable, Iterable


def split(message: bytes) -> tuple[bytes, bytes]:
    """(header section, body) of a message, line ends made LF; the empty line belongs to neither."""
    text = message.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep:
        return text, b""
    return head + b"\n", body


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Expected:
    """What every delivered file of one run must carry."""

    body_sha256: str
    body_length: int
    #: header name -> the exact value sent (e.g. Subject -> the run's token)
    headers: dict[str, str] = field(default_factory=dict)
    #: a header whose value must differ between the files of one mailbox
    unique: str = "Message-Id"


def expected_from(sent: bytes, headers: Iterable[str] = ("From", "To", "Subject")) -> Expected:
    """The Expected of a message as sent (as ``capture`` returns it)."""
    head, body = split(sent)
    parsed = BytesHeaderParser(policy=compat32).parsebytes(head)
    values = {name: parsed[name] for name in headers if parsed[name] is not None}
    return Expected(digest(body), len(body), values)


def check(files: Iterable[tuple[str, str, bytes]], expected: Expected,
          limit: int = 5) -> tuple[int, list[str]]:
    """Check delivered files ``(mailbox, name, bytes)``; return (files checked, problems).

    At most ``limit`` problems are described (then a count of the rest): one broken file is
    enough to fail the run, and a thousand lines would hide which kind of damage it was.
    """
    problems: list[str] = []
    extra = 0
    seen: dict[tuple[str, str], str] = {}
    checked = 0

    def problem(text: str) -> None:
        nonlocal extra
        if len(problems) < limit:
            problems.append(text)
        else:
            extra += 1

    for mailbox, name, data in files:
        checked += 1
        where = f"{mailbox}/new/{name}"
        head, body = split(data)
        parsed = BytesHeaderParser(policy=compat32).parsebytes(head)
        for header, value in expected.headers.items():
            got = parsed.get_all(header) or []
            if got != [value]:
                problem(f"{where}: {header}: expected {value!r}, found {got!r}")
        if len(body) != expected.body_length or digest(body) != expected.body_sha256:
            problem(f"{where}: body of {len(body)} octets, sha256 {digest(body)[:16]}…; "
                    f"sent {expected.body_length} octets, sha256 {expected.body_sha256[:16]}…")
        token = parsed[expected.unique]
        if token is None:
            problem(f"{where}: no {expected.unique}")
        elif (mailbox, token) in seen:
            problem(f"{where}: {expected.unique} {token} also in {seen[mailbox, token]} "
                    "(one message delivered twice)")
        else:
            seen[mailbox, token] = name
    if extra:
        problems.append(f"… and {extra} more")
    return checked, problems


def check_each(files: Iterable[tuple[str, str, bytes]], sent: dict[str, bytes],
               unique: str = "Message-ID", limit: int = 5) -> tuple[int, list[str]]:
    """Check delivered files against messages sent each with its own ``unique`` header value
    (``sent``: that value -> the message): every one delivered once, with its own body.

    For a client that makes every message different (bench/throughput.py), where a body put
    in the wrong file would pass ``check``. Returns (files checked, problems)."""
    bodies = {token: split(message)[1] for token, message in sent.items()}
    problems: list[str] = []
    found: dict[str, str] = {}
    checked = 0
    for mailbox, name, data in files:
        checked += 1
        where = f"{mailbox}/new/{name}"
        head, body = split(data)
        token = BytesHeaderParser(policy=compat32).parsebytes(head)[unique]
        if token not in bodies:
            problems.append(f"{where}: {unique} {token!r} was not sent")
        elif token in found:
            problems.append(f"{where}: {unique} {token} also in {found[token]} "
                            "(one message delivered twice)")
        elif body != bodies[token]:
            problems.append(f"{where}: {unique} {token}: body of {len(body)} octets, sha256 "
                            f"{digest(body)[:16]}…; sent {len(bodies[token])} octets, sha256 "
                            f"{digest(bodies[token])[:16]}…")
        if token in bodies:
            found.setdefault(token, name)
    missing = [token for token in sent if token not in found]
    if missing:
        problems.append(f"{len(missing)} message(s) sent but not delivered, e.g. {missing[0]}")
    if len(problems) > limit:
        problems[limit:] = [f"… and {len(problems) - limit} more"]
    return checked, problems


def new_files(root: Path, users: Iterable[str]) -> set[tuple[str, str]]:
    """Every ``(user, file name)`` in ``root/<user>/new``."""
    found: set[tuple[str, str]] = set()
    for user in users:
        try:
            found.update((user, entry.name) for entry in (root / user / "new").iterdir())
        except FileNotFoundError:
            pass
    return found


def read_files(root: Path, names: Iterable[tuple[str, str]]) -> Iterable[tuple[str, str, bytes]]:
    for user, name in sorted(names):
        yield user, name, (root / user / "new" / name).read_bytes()


def capture(send: Callable[[int], object], timeout: float = 30.0) -> bytes:
    """The message a client sends, byte for byte (dots unstuffed, CRLF kept).

    ``send(port)`` must make the client send one message to 127.0.0.1:``port``; this side
    answers one connection with the fewest replies an SMTP client accepts (no extensions)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(timeout)
    port = server.getsockname()[1]
    got: list[bytes] = []
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(timeout)
                stream = conn.makefile("rb")
                conn.sendall(b"220 capture ESMTP\r\n")
                data: list[bytes] | None = None
                while True:
                    line = stream.readline(100_000)
                    if not line:
                        return
                    if data is not None:
                        if line in (b".\r\n", b".\n"):
                            got.append(b"".join(data))
                            data = None
                            conn.sendall(b"250 2.0.0 kept\r\n")
                        else:
                            data.append(line[1:] if line.startswith(b".") else line)
                        continue
                    verb = line[:4].upper()
                    if verb == b"DATA":
                        data = []
                        conn.sendall(b"354 go on\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 2.0.0 bye\r\n")
                        return
                    else:  # HELO, EHLO, MAIL, RCPT, RSET, NOOP
                        conn.sendall(b"250 ok\r\n")
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)
        finally:
            server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    send(port)
    thread.join(timeout)
    if errors:
        raise RuntimeError(f"capturing the reference message: {errors[0]!r}")
    if len(got) != 1:
        raise RuntimeError(f"capturing the reference message: {len(got)} messages received")
    return got[0]
