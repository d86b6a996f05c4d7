"""The server TLS context: what is accepted, and what each unusable file is reported as."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from mailsrv.inbound.tls import ServerTLS, TLSSetupError, build_server_context
from support.certs import self_signed


def test_good_pair_and_reload(tmp_path) -> None:
    cert, key = self_signed(["mx.example.org"], tmp_path)
    tls = ServerTLS(cert, key)
    first = tls.getContext()
    assert isinstance(first, SSL.Context)
    tls.reload()
    assert tls.getContext() is not first  # a new context; connections keep the old one


@pytest.mark.parametrize("which, content, reason", [
    ("cert", None, "a readable PEM file: [Errno 2]"),
    ("key", None, "a readable PEM file: [Errno 2]"),
    ("cert", "not a certificate\n", "a PEM certificate (then its chain)"),
    ("key", "not a key\n", "a PEM private key"),
    ("key", "other", "a PEM private key"),  # OpenSSL: "key values mismatch"
])
def test_unusable_files(tmp_path, which, content, reason) -> None:
    cert, key = self_signed(["mx.example.org"], tmp_path)
    paths = {"cert": cert, "key": key}
    if content is None:
        paths[which] = tmp_path / "missing.pem"
    elif content == "other":
        other = tmp_path / "other"
        other.mkdir()
        paths[which] = self_signed(["other.example"], other)[1]
    else:
        paths[which].write_text(content)
    with pytest.raises(TLSSetupError) as error:
        build_server_context(paths["cert"], paths["key"])
    assert error.value.key == f"tls.{which}"
    assert error.value.reason.startswith(reason), error.value.reason


def test_failed_reload_keeps_the_old_context(tmp_path) -> None:
    cert, key = self_signed(["mx.example.org"], tmp_path)
    tls = ServerTLS(cert, key)
    before = tls.getContext()
    cert.write_text("broken\n")
    with pytest.raises(TLSSetupError):
        tls.reload()
    assert tls.getContext() is before
