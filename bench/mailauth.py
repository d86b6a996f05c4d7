"""
The cost of mail authentication (issue 13): DKIM signing on relay, and SPF/DKIM/DMARC checks
on receipt, each against the same mailsrv doing the same work without it, in the same run.

- **dkim relay**: smtp-source from 127.0.0.1 (in ``relay.trusted_networks``) submits
  messages whose ``From:`` is in the local domain (``-f bench@example.org``: smtp-source writes
  ``From: <sender>``) to ``uN@sink.test``, relayed to Postfix's smtp-sink through the loopback
  DNS server's MX; messages/second from the first connection until the sink has them all.
  Variants: no keys (``unsigned``), an RSA-2048 key, an Ed25519 key, each made by
  ``mailsrv dkim keygen``. Checked: the count at the sink, and every relayed message carries
  (or, unsigned, does not carry) a DKIM-Signature of example.org, a few verified by dkimpy
  against the key's public half.
- **auth receive**: durable local delivery from 127.0.0.9, outside ``relay.trusted_networks``,
  of messages signed ahead of time (dkimpy, RSA-2048) for ``sender.test``, whose SPF, DKIM key
  and DMARC (p=reject) records the loopback DNS server serves; with every check on, and with
  ``[checks]`` all off (the same server, client and bytes). Checked: every message delivered
  once with its own body, and with checks on each carries ``Authentication-Results:`` with
  spf=pass, dkim=pass and dmarc=pass (with checks off, none of ours).
"""

from __future__ import annotations

import base64
import re
import subprocess
import time
from pathlib import Path

from bench import clients, content, cpuload
from bench.harness import (
    DNS,
    RESULTS,
    Plan,
    Sink,
    alternate,
    cleanup,
    make_server,
    run_smtp_source,
)
from bench.peers import DOMAIN, wait_until
from bench.receipt import timed_receipt

DKIM_VARIANTS = ["unsigned", "rsa", "ed25519"]
AUTH_VARIANTS = ["checks off", "checks on"]
#: The remote sender of the auth receive measure, and the address it connects from.
SENDER_DOMAIN = "sender.test"
OUTSIDE = "127.0.0.9"
SELECTOR = "bench"
HOSTNAME = "mailsrv.bench"  # peers.Mailsrv's hostname: the authserv-id


def relay_measure(variant: str) -> str:
    return f"dkim relay {variant} msg/s"


def receive_measure(variant: str) -> str:
    return f"auth receive {variant} msg/s"


def cpu_measure(rate_measure: str) -> str:
    """The server's own CPU per message beside a rate: ``... msg/s`` -> ``... CPU ms/msg``."""
    return rate_measure.replace(" msg/s", " CPU ms/msg")


# ------------------------------------------------------------------------------ dkim relay


def keygen(server, algorithm: str) -> str:
    """``mailsrv dkim keygen`` with the server's own Python; the key's DNS TXT value."""
    from mailsrv.message import dkimkeys

    selector = f"{SELECTOR}-{algorithm}"
    done = subprocess.run(
        [server.python, "-m", "mailsrv.tools.cli", "dkim", "keygen", DOMAIN, "--selector",
         selector, "--algorithm", algorithm, "--config", str(server.config_path)],
        capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(f"mailsrv dkim keygen: {done.stdout[-300:]} {done.stderr[-500:]}")
    pem = dkimkeys.key_path(server.workdir / "dkim", DOMAIN, selector).read_bytes()
    return dkimkeys.txt_value(*dkimkeys.public_key(pem))


def sink_message(data: bytes) -> bytes:
    """The message in one of smtp-sink's dump files, without the X- lines it puts on top
    (client address, HELO, MAIL and RCPT arguments)."""
    lines = data.split(b"\n")
    i = 0
    while i < len(lines) and re.match(rb"X-(Client-Addr|Client-Proto|Helo-Args|Mail-Args|"
                                      rb"Rcpt-Args):", lines[i]):
        i += 1
    return b"\n".join(lines[i:]).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def check_signed(sink_dir: Path, variant: str, record: str | None,
                 verify: int = 5) -> tuple[int, list[str]]:
    """Every message at the sink signed by example.org with the variant's algorithm (or, for
    ``unsigned``, not signed); the first ``verify`` of them verified by dkimpy."""
    import dkim

    algorithm = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}.get(variant)
    problems: list[str] = []
    files = sorted(sink_dir.iterdir())
    for n, path in enumerate(files):
        message = sink_message(path.read_bytes())
        head = message.partition(b"\r\n\r\n")[0]
        signatures = re.findall(rb"(?im)^DKIM-Signature:((?:.*\r\n[ \t].*)*.*)", head + b"\r\n")
        if algorithm is None:
            if signatures:
                problems.append(f"{path.name}: signed, though no key was configured")
        elif len(signatures) != 1 or not re.search(rb"\bd=" + DOMAIN.encode() + rb";",
                                                   signatures[0]) \
                or algorithm not in signatures[0]:
            problems.append(f"{path.name}: expected one {algorithm.decode()} DKIM-Signature "
                            f"of {DOMAIN}, found {len(signatures)}")
        elif n < verify and not dkim.verify(
                message, dnsfunc=lambda name, timeout=5: record.encode()):
            problems.append(f"{path.name}: the DKIM-Signature does not verify (dkimpy)")
        if len(problems) >= 5:
            break
    return len(files), problems


def measure_dkim_relay(plan: Plan, work: Path) -> None:
    count = plan.dkim_messages
    print(f"== dkim relay: {count} messages of 5 KB submitted from a trusted client, relayed "
          "to a loopback smtp-sink; unsigned, RSA-2048, Ed25519", flush=True)

    def one(variant: str, r: int) -> None:
        wd = work / f"dkim-{variant}-{r}"
        wd.mkdir(parents=True)
        (wd / "dkim").mkdir(mode=0o700)
        sink = Sink(wd)
        dns = DNS(wd)
        server = None
        try:
            server = make_server("mailsrv", wd, dns_port=dns.port, relay_port=sink.port,
                                 overrides={"queue": {"retry_schedule": [3600]},
                                            "relay": {"tls": "none"},
                                            "dkim": {"keys": str(wd / "dkim")}})
            record = keygen(server, variant) if variant != "unsigned" else None
            server.start()
            with cpuload.Interval() as load:
                cpu = server.cpu_seconds()
                start = time.monotonic()
                done = run_smtp_source(server.port, 10, count, 1, 5120, 300, to="u@sink.test",
                                       sender=f"bench@{DOMAIN}")
                try:
                    wait_until(lambda: sink.count() >= count, 300,
                               "every message at the sink", 0.005)
                except RuntimeError:
                    pass
                elapsed = time.monotonic() - start
                cpu = server.cpu_seconds() - cpu
            got, problems = check_signed(sink.dir, variant, record)
            ok = done.returncode == 0 and got == count and not problems
            what = "none signed" if variant == "unsigned" else f"all signed ({variant})"
            check = f"{count} sent, {got} at the sink, " + (what if not problems else "WRONG")
            if done.returncode:
                check += f" (smtp-source: {done.stderr.strip()[-200:]})"
            if problems:
                print(f"  SIGNATURE CHECK FAILED: dkim relay {variant}:\n    "
                      + "\n    ".join(problems), flush=True)
                check += ": " + "; ".join(problems[:2])
            RESULTS.add(relay_measure(variant), "mailsrv", count / elapsed, check, ok,
                        load.result)
            RESULTS.add(cpu_measure(relay_measure(variant)), "mailsrv", 1000 * cpu / count,
                        check, ok, load.result)
        finally:
            if server is not None:
                server.stop()
            dns.stop()
            sink.stop()
            cleanup(wd)

    alternate(DKIM_VARIANTS, plan.repeats, one, server="mailsrv")


# ---------------------------------------------------------------------------- auth receive


def sender_key() -> tuple[bytes, str]:
    """A new RSA-2048 key of the remote sender: (PEM, the p= value of its DKIM record)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode()


def sender_zone(public: str) -> dict[str, list[list[str]]]:
    """SPF (envelope and HELO), DKIM and DMARC of the remote sender."""
    spf = f"v=spf1 ip4:{OUTSIDE} -all"
    return {
        SENDER_DOMAIN: [["TXT", spf]],
        clients.CLIENT_NAME: [["TXT", spf]],
        f"{SELECTOR}._domainkey.{SENDER_DOMAIN}": [["TXT", f"v=DKIM1; k=rsa; p={public}"]],
        f"_dmarc.{SENDER_DOMAIN}": [["TXT", "v=DMARC1; p=reject"]],
    }


def signed_messages(count: int, pem: bytes) -> dict[str, bytes]:
    """``count`` messages of about 5 KB from ``sender.test``, each signed (relaxed/relaxed):
    Message-ID -> the message, CRLF line ends."""
    import dkim

    line = b"x" * 76 + b"\r\n"
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    messages: dict[str, bytes] = {}
    for i in range(count):
        msgid = f"<auth{i}.{time.time_ns()}@{SENDER_DOMAIN}>"
        message = (f"From: Bench <bench@{SENDER_DOMAIN}>\r\nTo: <alice@{DOMAIN}>\r\n"
                   f"Subject: auth receive {i}\r\nDate: {date}\r\nMessage-ID: {msgid}\r\n\r\n"
                   f"message {i}\r\n").encode() + line * 64
        signature = dkim.sign(message, SELECTOR.encode(), SENDER_DOMAIN.encode(), pem,
                              canonicalize=(b"relaxed", b"relaxed"),
                              include_headers=[b"From", b"To", b"Subject", b"Date",
                                               b"Message-ID"])
        messages[msgid] = signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + message
    return messages


def check_results(files: list[tuple[str, str, bytes]], checks_on: bool) -> list[str]:
    """With checks on, each file's ``Authentication-Results: mailsrv.bench`` says spf, dkim
    and dmarc pass; with checks off, no file has one of ours."""
    problems: list[str] = []
    for user, name, data in files:
        head = data.partition(b"\n\n")[0].decode(errors="replace")
        fields = [re.sub(r"\s+", " ", f) for f in re.findall(
            r"(?im)^Authentication-Results:((?:.*\n[ \t].*)*.*)", head + "\n")]
        ours = [f for f in fields if f.strip().startswith(HOSTNAME)]
        if not checks_on:
            if ours:
                problems.append(f"{user}/new/{name}: checks off, yet {ours[0][:120]}")
        elif len(ours) != 1 or not all(re.search(rf"\b{k}=pass\b", ours[0])
                                       for k in ("spf", "dkim", "dmarc")):
            problems.append(f"{user}/new/{name}: expected one Authentication-Results: "
                            f"{HOSTNAME} with spf=pass dkim=pass dmarc=pass, found {ours}")
        if len(problems) >= 5:
            break
    return problems


def measure_auth_receive(plan: Plan, work: Path) -> None:
    count = plan.auth_messages
    print(f"== auth receive: {count} DKIM-signed messages of 5 KB from {OUTSIDE} (not "
          "trusted), 10 connections, durable local delivery; every check on / all off",
          flush=True)
    pem, public = sender_key()
    messages = signed_messages(count, pem)
    off = {"spf": False, "dkim_verify": False, "dmarc": False, "arc": False,
           "protect_local_domains": False}
    on = {"spf": True, "dkim_verify": True, "dmarc": True, "arc": True,
          "protect_local_domains": True, "dmarc_reject": True}

    def one(variant: str, r: int) -> None:
        wd = work / f"auth-{variant.replace(' ', '-')}-{r}"
        wd.mkdir(parents=True)
        checks_on = variant == "checks on"
        dns = DNS(wd, sender_zone(public))
        server = None
        try:
            server = make_server("mailsrv", wd, dns_port=dns.port, overrides={
                "relay": {"trusted_networks": ["127.0.0.1/32"]},
                "checks": on if checks_on else off})
            server.start()
            got = timed_receipt(server, list(messages.values()), f"bench@{SENDER_DOMAIN}",
                                f"alice@{DOMAIN}", OUTSIDE)
            accepted, errors, new, load = got.accepted, got.errors, got.new, got.load
            cpu, elapsed = got.cpu, got.elapsed
            files = list(content.read_files(server.maildir_root, new))
            checked, problems = content.check_each(files, messages)
            problems += check_results(files, checks_on)
            ok = accepted == count and len(new) == count and not problems
            check = (f"{count} sent, {accepted} accepted, {len(new)} in new/, bodies "
                     + ("as sent" if not problems else "WRONG")
                     + (", spf/dkim/dmarc=pass in each" if checks_on and not problems else ""))
            if errors:
                check += f" (client: {errors[0][:200]})"
            if problems:
                print(f"  CHECK FAILED: auth receive {variant}:\n    " + "\n    ".join(problems),
                      flush=True)
                check += ": " + "; ".join(problems[:2])
            RESULTS.add(receive_measure(variant), "mailsrv", count / elapsed, check, ok,
                        load)
            RESULTS.add(cpu_measure(receive_measure(variant)), "mailsrv", 1000 * cpu / count,
                        check, ok, load)
        finally:
            if server is not None:
                server.stop()
            dns.stop()
            cleanup(wd)

    alternate(AUTH_VARIANTS, plan.repeats, one, server="mailsrv")

