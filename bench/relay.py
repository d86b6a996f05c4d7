"""
Relay throughput and queue start-up, measured end to end on loopback.

    python bench/relay.py [--messages 2000] [--startup 10000]

1. Fills the queue (server stopped) with N messages of 5 KB for one remote domain, starts
   ``twistd -n mailsrv`` with an MX pointing at a loopback sink, and times from the relayer's
   "queue loaded" line until the sink has received every message (count checked).
2. Fills a queue with M messages (destination answering 451, so nothing leaves) and reports the
   time from process start to "queue loaded" and the loader's own figure.
The sink is tests/support/sink.py (asyncio, writes one JSON file per message); Postfix's
smtp-sink, when installed, is the faster peer issue 6's benchmark uses.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from mailsrv.storage import queue  # noqa: E402
from support.harness import DNSServer, MailServer, SMTPSink, free_port, wait_for  # noqa: E402

BODY = b"Subject: bench\n\n" + (b"x" * 76 + b"\n") * 66  # about 5 KB


def fill(qdir: Path, count: int, domain: str) -> None:
    queue.queue_dirs(qdir)
    now = time.time()
    for i in range(count):
        queue_id = queue.new_queue_id()
        body = qdir / "incoming" / queue_id
        body.write_bytes(BODY)
        queue.enqueue(qdir, queue_id, sender="alice@example.org", recipients=[f"u{i}@{domain}"],
                      prefix=b"Received: by bench (mailsrv) id " + queue_id.encode() + b"\n",
                      body_path=body, created=now, received_from="bench")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--startup", type=int, default=10000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailsrv-bench-"))
    zone = {"records": {"sink.test": [["MX", 10, "mx.sink.test"]],
                        "mx.sink.test": [["A", "127.0.0.9"]]}}
    dns = DNSServer(work, zone)
    port = free_port(["127.0.0.9"])
    sink = SMTPSink(work / "sink", "127.0.0.9", hostname="mx.sink.test", port=port)
    try:
        (work / "relay").mkdir()
        (work / "startup").mkdir()
        server = MailServer(work / "relay", dns.port, overrides={"relay": {"port": port},
                            "queue": {"retry_schedule": [3600]}})
        fill(server.queue, args.messages, "sink.test")
        server.start()
        wait_for(lambda: "queue loaded" in server.log_text(), 60, "the queue to load")
        started = time.monotonic()
        wait_for(lambda: len(list(sink.outdir.glob("*.json"))) >= args.messages, 600,
                 "every message at the sink", interval=0.02)
        elapsed = time.monotonic() - started
        wait_for(lambda: not list((server.queue / "messages").glob("*.json")), 60, "empty queue")
        got = len(sink.messages())
        server.stop()
        print(f"relay: {args.messages} messages of {len(BODY)} bytes in {elapsed:.2f}s = "
              f"{args.messages / elapsed:.0f} msg/s (sink count {got}, check "
              f"{'ok' if got == args.messages else 'FAILED'})")

        sink.set_rules({"rcpt": [[".", "451 4.3.0 not now"]]})
        big = MailServer(work / "startup", dns.port, overrides={"relay": {"port": port},
                         "queue": {"retry_schedule": [3600]}})
        fill(big.queue, args.startup, "sink.test")
        t0 = time.monotonic()
        big.start()
        line = wait_for(lambda: re.search(r"queue loaded: (\d+) message.* in ([\d.]+)s",
                                          big.log_text()), 300, "the queue to load")
        total = time.monotonic() - t0
        big.stop()
        print(f"start-up: {line.group(1)} queued messages loaded in {line.group(2)}s by the "
              f"relayer; {total:.2f}s from process start to loaded")
    finally:
        sink.stop()
        dns.stop()


if __name__ == "__main__":
    main()
