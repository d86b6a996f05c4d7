"""
A receiving SMTP server for the relay tests: ``python sink.py CONFIG.json``.

It plays a remote MX (or a smarthost) on a 127.0.0.x address: answers each command as the
rules file says (re-read at every command, so a test can switch from 4xx to 2xx while it
runs), offers STARTTLS with a given certificate and AUTH PLAIN/LOGIN, and writes every
accepted message to ``outdir/<n>.json`` (atomically).  Prints ``PORT <n>`` once listening.
The rules may make it announce ``SIZE <n>`` (``"size": n``, enforced at MAIL and after the
data, as Postfix does) and not announce 8BITMIME (``"8bitmime": false``: ``BODY=8BITMIME``
is then refused), announce SMTPUTF8 (``"smtputf8": true``; without it a ``SMTPUTF8``
parameter or a non-ASCII path is refused with 553 5.6.7, as a pre-RFC 6531 server would),
and announce DSN (``"dsn": true``; RCPT's parameters are recorded as ``rcpt_params``, one
dict per accepted recipient), announce CHUNKING (``"chunking": true``: BDAT is taken, each
chunk answered 250 or ``"bdat"``'s reply; the message records ``"via": "BDAT"`` and its
``chunks``), and, over TLS, REQUIRETLS (``"requiretls": true``; without it the parameter is
refused with 555); every MAIL command line is appended to ``mail_log``.
Written with asyncio so that it shares no code with the client under test.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import ssl
import sys

CONFIG: dict = {}
COUNTER = itertools.count(1)


def rules() -> dict:
    try:
        with open(CONFIG["rules_file"]) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def record(message: dict) -> None:
    outdir = CONFIG["outdir"]
    n = next(COUNTER)
    tmp = os.path.join(outdir, f".{n:06d}.tmp")
    with open(tmp, "w") as f:
        json.dump(message, f)
    os.rename(tmp, os.path.join(outdir, f"{n:06d}.json"))


class Session:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.tls = False
        self.auth_user = None
        self.helo = ""
        self.reset()

    def reset(self):
        self.mail_from = None
        self.mail_params = {}
        self.rcpts = []
        self.rcpt_params = []
        self.chunks = []

    async def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()

    async def readline(self) -> bytes | None:
        line = await self.reader.readline()
        return line if line else None

    def extensions(self) -> list[str]:
        r = rules()
        ext = ["PIPELINING"] + (["8BITMIME"] if r.get("8bitmime", True) else [])
        if r.get("smtputf8"):
            ext.append("SMTPUTF8")
        if r.get("size") is not None:
            ext.append(f"SIZE {r['size']}")
        if r.get("dsn"):
            ext.append("DSN")
        if r.get("chunking"):
            ext.append("CHUNKING")
        if r.get("requiretls") and self.tls:
            ext.append("REQUIRETLS")
        if CONFIG.get("tls") and not self.tls:
            ext.append("STARTTLS")
        if CONFIG.get("auth") and (self.tls or not CONFIG.get("tls")):
            ext.append("AUTH PLAIN LOGIN")
        return ext

    async def run(self) -> None:
        greeting = rules().get("greeting")
        if greeting:
            await self.send(greeting)
            self.writer.close()
            return
        await self.send(f"220 {CONFIG['hostname']} ESMTP sink")
        while True:
            raw = await self.readline()
            if raw is None:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb):].strip()
            r = rules()
            if verb in ("EHLO", "HELO"):
                self.helo = arg
                self.reset()
                if verb == "HELO":
                    await self.send(f"250 {CONFIG['hostname']}")
                else:
                    lines = [CONFIG["hostname"]] + self.extensions()
                    for i, text in enumerate(lines):
                        await self.send(("250 " if i == len(lines) - 1 else "250-") + text)
            elif verb == "STARTTLS" and CONFIG.get("tls") and not self.tls:
                await self.send("220 2.0.0 go ahead")
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(CONFIG["tls"]["cert"], CONFIG["tls"]["key"])
                await self.writer.start_tls(context)
                self.tls = True
                self.helo = ""
                self.reset()
            elif verb == "AUTH" and CONFIG.get("auth"):
                await self.auth(arg)
            elif verb == "MAIL":
                if CONFIG.get("mail_log"):
                    with open(CONFIG["mail_log"], "a") as f:
                        f.write(line + "\n")
                auth = CONFIG.get("auth") or {}
                params = dict(p.upper().partition("=")[::2] for p in arg.split(">", 1)[-1].split())
                if auth.get("require") and not self.auth_user:
                    await self.send("530 5.7.0 Authentication required")
                elif r.get("mail_from"):
                    await self.send(r["mail_from"])
                elif "REQUIRETLS" in params and "REQUIRETLS" not in self.extensions():
                    await self.send("555 5.5.4 Unsupported option: REQUIRETLS")
                elif "BODY" in params and "8BITMIME" not in self.extensions():
                    await self.send("555 5.5.4 Unsupported option: BODY")
                elif "SMTPUTF8" not in self.extensions() and (
                        "SMTPUTF8" in params or not line.isascii()):
                    await self.send("553 5.6.7 SMTPUTF8 not supported")
                elif r.get("size") and int(params.get("SIZE") or 0) > r["size"]:
                    await self.send("552 5.3.4 Message size exceeds fixed limit")
                else:
                    m = re.match(r"FROM:<([^>]*)>", arg, re.I)
                    self.reset()
                    self.mail_from = m.group(1) if m else arg
                    self.mail_params = params
                    await self.send("250 2.1.0 Ok")
            elif verb == "RCPT":
                m = re.match(r"TO:<([^>]*)>", arg, re.I)
                address = m.group(1) if m else arg
                reply = "250 2.1.5 Ok"
                if not address.isascii() and "SMTPUTF8" not in self.mail_params:
                    reply = "553 5.6.7 non-ASCII address without SMTPUTF8"
                for pattern, answer in r.get("rcpt", []):
                    if re.search(pattern, address):
                        reply = answer
                        break
                if reply.startswith("2"):
                    self.rcpts.append(address)
                    self.rcpt_params.append(
                        dict(p.partition("=")[::2] for p in arg.split(">", 1)[-1].split()))
                await self.send(reply)
            elif verb == "DATA":
                if r.get("data"):
                    await self.send(r["data"])
                    continue
                if not self.rcpts:
                    await self.send("503 5.5.1 no recipients")
                    continue
                await self.send("354 go ahead")
                lines = []
                while True:
                    raw = await self.readline()
                    if raw is None:
                        return
                    if raw == b".\r\n":
                        break
                    if raw.startswith(b"."):
                        raw = raw[1:]
                    lines.append(raw)
                await self.end_of_message(b"".join(lines), "DATA")
            elif verb == "BDAT" and "CHUNKING" in self.extensions():
                words = arg.split()
                data = await self.reader.readexactly(int(words[0]))
                if not self.rcpts or r.get("bdat"):
                    await self.send(r.get("bdat") or "503 5.5.1 no recipients")
                    continue
                self.chunks.append(data)
                if words[1:] == ["LAST"]:
                    await self.end_of_message(b"".join(self.chunks), "BDAT")
                else:
                    await self.send(f"250 2.0.0 Ok: {len(data)} octets")
            elif verb == "RSET":
                self.reset()
                await self.send("250 2.0.0 Ok")
            elif verb == "NOOP":
                await self.send("250 2.0.0 Ok")
            elif verb == "QUIT":
                await self.send("221 2.0.0 Bye")
                self.writer.close()
                return
            else:
                await self.send("502 5.5.2 not implemented")

    async def end_of_message(self, data: bytes, via: str) -> None:
        eom = rules().get("eom")
        limit = rules().get("size")
        if eom:
            await self.send(eom)
        elif limit and len(data) > limit:
            await self.send("552 5.3.4 Message size exceeds fixed limit")
        else:
            record({
                "mail_from": self.mail_from, "rcpt_to": self.rcpts,
                "data": data.decode("utf-8", "surrogateescape")
                .encode("utf-8", "surrogateescape").decode("latin-1"),
                "tls": self.tls, "auth": self.auth_user, "helo": self.helo,
                "mail_params": self.mail_params, "rcpt_params": self.rcpt_params,
                "via": via, "chunks": len(self.chunks),
            })
            await self.send("250 2.0.0 Ok: queued")
        self.reset()

    async def auth(self, arg: str) -> None:
        auth = CONFIG["auth"]
        words = arg.split()
        mechanism = words[0].upper() if words else ""
        try:
            if mechanism == "PLAIN":
                if len(words) > 1:
                    blob = words[1]
                else:
                    await self.send("334 ")
                    blob = (await self.readline() or b"").decode().strip()
                parts = base64.b64decode(blob).split(b"\0")
                user, password = parts[1].decode(), parts[2].decode()
            elif mechanism == "LOGIN":
                await self.send("334 " + base64.b64encode(b"Username:").decode())
                user = base64.b64decode((await self.readline() or b"").strip()).decode()
                await self.send("334 " + base64.b64encode(b"Password:").decode())
                password = base64.b64decode((await self.readline() or b"").strip()).decode()
            else:
                await self.send("504 5.5.4 unknown mechanism")
                return
        except (ValueError, IndexError):
            await self.send("501 5.5.2 bad base64")
            return
        if user == auth["user"] and password == auth["password"]:
            self.auth_user = user
            await self.send("235 2.7.0 Authentication successful")
        else:
            await self.send("535 5.7.8 Authentication credentials invalid")


async def handle(reader, writer):
    try:
        await Session(reader, writer).run()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, CONFIG["host"], CONFIG.get("port", 0))
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        CONFIG.update(json.load(f))
    asyncio.run(main())
