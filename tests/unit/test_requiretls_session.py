"""
REQUIRETLS (RFC 8689) on the session core in process: offered in EHLO over TLS only, MAIL's
parameter refused in clear with 530 5.7.10 and with a value with 501 5.5.4.
"""

from __future__ import annotations

import pytest
from twisted.internet import task

from support.inprocess import Core, make_runtime


@pytest.fixture
def runtime(tmp_path):
    return make_runtime(tmp_path, task.Clock())


def offered(core: Core) -> list[str]:
    [ehlo] = core.send("EHLO client.test")
    return [line[4:] for line in ehlo.split("\r\n")]


def test_offered_over_tls_only(runtime):
    assert "REQUIRETLS" in offered(Core(runtime, tls=True))
    assert "REQUIRETLS" not in offered(Core(runtime))


def test_mail_requiretls_over_tls_is_accepted(runtime):
    core = Core(runtime, tls=True)
    offered(core)
    [reply] = core.send("MAIL FROM:<a@client.test> REQUIRETLS")
    assert reply.startswith("250 ")


def test_mail_requiretls_in_clear_is_refused(runtime):
    core = Core(runtime)
    offered(core)
    assert core.send("MAIL FROM:<a@client.test> REQUIRETLS") == [
        "530 5.7.10 Error: REQUIRETLS needs a TLS session"]


def test_requiretls_with_a_value_is_a_syntax_error(runtime):
    core = Core(runtime, tls=True)
    offered(core)
    [reply] = core.send("MAIL FROM:<a@client.test> REQUIRETLS=YES")
    assert reply.startswith("501 5.5.4 ")
