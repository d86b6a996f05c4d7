"""
Start-up work done as the user the server will run as.

``twistd --uid mailsrv mailsrv ...`` started as root builds the service as root and only
switches to ``mailsrv`` just before the service starts.  The start-up checks (``prepare``:
the mailbox root and queue directories are created and probed; the queue lock file is
created) would then make root-owned directories that the server, once it is ``mailsrv``,
cannot write, and would prove writability for the wrong user.  Doing that work with the
*effective* uid and gid (and groups) twistd is going to switch to makes it exactly what the
server will see; root is taken back afterwards so that twistd can bind privileged ports and
switch for good itself.
"""

from __future__ import annotations

import os
import pwd
from contextlib import contextmanager
from typing import Iterator

__all__ = ["effective_user"]


@contextmanager
def effective_user(uid: int | None, gid: int | None) -> Iterator[None]:
    """Run the block with effective ``uid``/``gid`` when root was asked to become them.

    ``gid`` None means the user's primary group, as twistd does.  Outside root, or without a
    ``uid``, the block runs unchanged.
    """
    if uid is None or uid == 0 or os.geteuid() != 0:
        yield
        return
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        name, primary = None, gid
    else:
        name, primary = entry.pw_name, entry.pw_gid
    if gid is None:
        gid = primary if primary is not None else uid
    saved_gid, saved_groups = os.getegid(), os.getgroups()
    os.setgroups(os.getgrouplist(name, gid) if name is not None else [gid])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(saved_gid)
        os.setgroups(saved_groups)
