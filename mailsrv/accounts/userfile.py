"""
Changes to the users file for ``mailsrv user``: add, passwd, del, list.

The file is Dovecot's passwd-file, maybe shared with Dovecot and edited by hand, so a change
touches only the one line it is about (comments, order and Dovecot's extra fields stay), and
it is written as a new file that replaces the old one atomically (write, fsync, rename, fsync
of the directory).  A reader, the running server among them, sees the old file or the new one,
never half of one; the server notices the new file within a second and reloads it.

The file holds password hashes, so it is written ``0640`` (or stricter, when it was): the
owner (root) writes it, the server's group reads it, others nothing; the server refuses to
start with a file that holds hashes and is open to others, as ssh refuses such keys.  The
owner stays; so does the group, unless the file is new or was readable by everyone (the
server may have read it that way): then it gets the server's group, so that taking
"others" away does not lock the server out.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mailsrv.storage import durable

__all__ = ["FILE_MODE", "UserFileError", "set_password", "remove_user", "list_users",
           "private_mode", "replace_file", "locked_directory"]

#: The users file's mode as ``mailsrv user`` writes it: owner rw, group r, others nothing.
FILE_MODE = 0o640


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


def private_mode(mode: int) -> bool:
    """Whether a file with password hashes may have ``mode``: no permission for others."""
    return mode & 0o007 == 0


def replace_file(
    path: Path,
    text: str,
    check: Callable[[Path], None] | None = None,
    server_group: int | None = None,
) -> None:
    """Atomically replace ``path`` with ``text``, after ``check`` accepted the new file.

    ``check`` gets the new file's temporary path and raises to refuse it; nothing changes.
    The new file is ``FILE_MODE`` or stricter; ``server_group`` (a gid; None: unknown) is
    its group when the file is new or was readable by others (see the module's docstring).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None

    def own(fd: int) -> None:
        made = os.fstat(fd)
        if st is None:
            mode, uid, gid = FILE_MODE, made.st_uid, made.st_gid
        else:
            mode, uid, gid = st.st_mode & FILE_MODE, st.st_uid, st.st_gid
        if server_group is not None and (st is None or st.st_mode & 0o004):
            gid = server_group
        if (uid, gid) != (made.st_uid, made.st_gid):
            try:
                os.fchown(fd, uid, gid)
            except PermissionError as e:
                raise UserFileError(
                    f"cannot give {path} owner {uid} and group {gid} "
                    f"({e.strerror}): run 'mailsrv user' as root"
                ) from None
        os.fchmod(fd, mode)

    durable.replace(path, text.encode("utf-8"), prepare=own, check=check)
