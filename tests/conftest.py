import pytest

from support.harness import DNSServer, MailServer

#: The zone every end-to-end test serves (loopback clients are not looked up: these names are
#: for tests that resolve them).
BASE_ZONE = {
    "records": {
        "1.0.0.127.in-addr.arpa": [["PTR", "client.test"]],
        "client.test": [["A", "127.0.0.1"]],
    }
}


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory):
    server = DNSServer(tmp_path_factory.mktemp("dns"), BASE_ZONE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mail_server(tmp_path_factory, dns_server):
    """One mailsrv with the default users and aliases, shared by a test module."""
    server = MailServer(tmp_path_factory.mktemp("mailsrv"), dns_server.port).start()
    yield server
    server.stop()


@pytest.fixture
def make_server(tmp_path, dns_server):
    """A factory for a mailsrv with its own configuration, stopped after the test."""
    servers = []

    def make(**kwargs):
        workdir = tmp_path / f"s{len(servers)}"
        workdir.mkdir()
        server = MailServer(workdir, dns_server.port, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
