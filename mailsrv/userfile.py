"""
Changes to the users file for ``mailsrv user``: add, passwd, del, list.

The file is Dovecot's passwd-file, maybe shared with Dovecot and edited by hand, so a change
touches only the one line it is about (comments, order and Dovecot's extra fields stay), and
it is written as a new file that replaces the old one atomically (write, fsync, rename, fsync
of the directory), keeping the file's mode and owner.  A reader, the running server among
them, sees the old file or the new one, never half of one; the server notices the new file
within a second and reloads it.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["UserFileError", "set_password", "remove_user", "list_users", "replace_file",
           "locked_directory"]


class UserFileError(Exception):
    """The change cannot be made (no such user, already there …); the message says why."""


def _address_of(line: str) -> str | None:
    """The lower-case address a meaningful line is about; None for comments and blanks."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return stripped.split(":", 1)[0].strip().lower()


def set_password(text: str, address: str, hashed: str, create: bool) -> str:
    """``text`` with ``address``'s password field set to ``hashed``.

    ``create``: the user must not exist yet and is appended; otherwise the user must exist.
    """
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if _address_of(line) == address:
            if create:
                raise UserFileError(f"{address} exists already (use 'mailsrv user passwd')")
            fields = line.strip().split(":")
            if len(fields) == 1:
                fields.append(hashed)
            else:
                fields[1] = hashed
            lines[index] = ":".join(fields)
            return "\n".join(lines) + "\n"
    if not create:
        raise UserFileError(f"no user {address} (use 'mailsrv user add')")
    lines.append(f"{address}:{hashed}")
    return "\n".join(lines) + "\n"


def remove_user(text: str, address: str) -> str:
    """``text`` without ``address``'s line."""
    lines = text.splitlines()
    kept = [line for line in lines if _address_of(line) != address]
    if len(kept) == len(lines):
        raise UserFileError(f"no user {address}")
    return "\n".join(kept) + "\n" if kept else ""


def list_users(text: str) -> list[tuple[str, bool]]:
    """(address, whether it has a password) for every user, in file order."""
    found = []
    for line in text.splitlines():
        address = _address_of(line)
        if address is not None:
            fields = line.strip().split(":")
            found.append((address, len(fields) > 1 and fields[1].strip() != ""))
    return found


@contextmanager
def locked_directory(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file's directory: two admins never lose each other's edit."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replace_file(path: Path, text: str, check: Callable[[Path], None] | None = None) -> None:
    """Atomically replace ``path`` with ``text``, after ``check`` accepted the new file.

    ``check`` gets the new file's temporary path and raises to refuse it; nothing changes.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            if st is not None:
                os.fchmod(out.fileno(), st.st_mode & 0o7777)
                if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                    os.fchown(out.fileno(), st.st_uid, st.st_gid)
            else:
                os.fchmod(out.fileno(), 0o640)
            os.fsync(out.fileno())
        if check is not None:
            check(Path(tmp))
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
