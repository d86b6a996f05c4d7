"""Start-up work as the user ``twistd --uid`` switches to (see mailsrv/privileges.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from mailsrv.config import Config, ConfigError, load_config
from mailsrv.privileges import effective_user
from mailsrv.startup import prepare
from support.harness import MailServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing the effective uid needs root")

NOBODY = pwd.getpwnam("nobody")


def server_config(server: MailServer) -> Config:
    return load_config(server.config_path)


@pytest.fixture
def shared_dir():
    """A directory outside root's 0700 pytest tree, so that nobody can reach it."""
    path = Path(tempfile.mkdtemp(prefix="mailsrv-priv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_prepare_creates_what_the_server_user_owns(shared_dir):
    server = MailServer(shared_dir, dns_port=53)  # configured, never started
    shared_dir.chmod(0o777)
    before = (os.geteuid(), os.getegid(), os.getgroups())
    with effective_user(NOBODY.pw_uid, None):
        assert (os.geteuid(), os.getegid()) == (NOBODY.pw_uid, NOBODY.pw_gid)
        prepare(server_config(server))
    assert (os.geteuid(), os.getegid(), os.getgroups()) == before
    for path in (server.root, server.queue, server.queue / "incoming", server.queue / "messages",
                 server.queue / "spare"):
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), path


def test_the_probe_checks_the_server_user_and_root_comes_back(shared_dir):
    server = MailServer(shared_dir, dns_port=53)
    server.root.mkdir(mode=0o700)  # root's: the server's user could not write it
    with pytest.raises(ConfigError, match="mailboxes.root: a directory mailsrv can write"):
        with effective_user(NOBODY.pw_uid, NOBODY.pw_gid):
            prepare(server_config(server))
    assert os.geteuid() == 0 and os.getegid() == 0


def test_no_uid_or_already_that_user_changes_nothing():
    with effective_user(None, None):
        assert os.geteuid() == 0
    with effective_user(0, 0):
        assert os.geteuid() == 0


