"""``pip install -e .`` (a PEP 660 editable install) and then ``twistd mailsrv``, from a directory
that is not the checkout: twistd must find the plugin, as developers install that way.

Twisted finds plugins in every ``twisted/plugins`` directory on ``sys.path``; setuptools' default
editable install of a flat layout is an import hook that puts no directory on ``sys.path``, so
setup.cfg maps the packages to the project root (``package_dir``) and the install is a ``.pth``
file naming the checkout.

The install is made offline (``--no-deps --no-build-isolation --no-index``) of a copy of the
checkout (so that the checkout is not written to) into a new virtual environment that reuses
this interpreter's packages through a ``.pth`` file, except that its ``twisted`` is a tree of
links without any ``mailsrv_plugin.py`` that a regular ``pip install .`` put into Twisted's own
plugin directory: that copy would otherwise be found and the test could not fail.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from support.harness import REPO, MailServer, stop_process, wait_for
from support.mail import connect

TIMEOUT = 120


def _setuptools_can_build_editable() -> str | None:
    """Why this interpreter's setuptools cannot build an editable wheel offline, or None."""
    spec = importlib.util.find_spec("setuptools")
    if spec is None:
        return "setuptools is not installed"
    from importlib.metadata import version

    parts = tuple(int(p) for p in re.findall(r"\d+", version("setuptools"))[:2])
    if parts < (64, 0):
        return f"setuptools {version('setuptools')} predates editable wheels (PEP 660, 64.0)"
    if parts < (70, 1) and importlib.util.find_spec("wheel") is None:
        return "setuptools < 70.1 needs the wheel package (pip install '.[test]' installs it)"
    return None


def _site_dirs() -> list[str]:
    return [p for p in sys.path
            if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_CONSTRAINT")}
    env["HOME"] = str(home)
    return env


def _link_twisted_without_mailsrv(target: Path) -> None:
    """``target`` becomes this interpreter's Twisted, every file a link, minus mailsrv's plugin."""
    import twisted

    real = Path(twisted.__file__).parent
    target.mkdir()
    for entry in real.iterdir():
        if entry.name != "plugins":
            (target / entry.name).symlink_to(entry)
    (target / "plugins").mkdir()
    for entry in (real / "plugins").iterdir():
        if not entry.name.startswith("mailsrv_plugin") and entry.name != "dropin.cache":
            (target / "plugins" / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def editable(tmp_path_factory):
    """(python, checkout copy, work dir) of a new venv with the copy installed editable."""
    reason = _setuptools_can_build_editable()
    if reason is not None:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("editable")
    checkout = work / "checkout"
    checkout.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, checkout / name)
    for name in ("mailsrv", "twisted"):
        shutil.copytree(REPO / name, checkout / name,
                        ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
    venv.create(work / "venv", with_pip=False, symlinks=True)
    python = work / "venv" / "bin" / "python"
    purelib = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        stdout=subprocess.PIPE, check=True, text=True, timeout=TIMEOUT,
    ).stdout.strip())
    assert purelib != Path(sysconfig.get_paths()["purelib"])
    _link_twisted_without_mailsrv(purelib / "twisted")
    # Named to come after the editable install's own .pth: the checkout precedes the
    # dependencies on sys.path (and so a mailsrv installed there too).
    (purelib / "zz-mailsrv-test-dependencies.pth").write_text("\n".join(_site_dirs()) + "\n")
    home = work / "home"
    home.mkdir()
    result = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-e", str(checkout)],
        cwd=work, env=_clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout.decode(errors="replace")
    return python, checkout, work


def twistd(python: Path, *args: str) -> list[str]:
    return [str(python), "-c", "from twisted.scripts.twistd import run; run()", *args]


def test_editable_install_puts_the_plugin_directory_on_sys_path(editable):
    python, checkout, work = editable
    result = subprocess.run(
        [python, "-c", "import mailsrv, twisted.plugins, twisted.plugins.mailsrv_plugin as p\n"
         "print(mailsrv.__file__); print(p.__file__); print(twisted.plugins.__path__)"],
        cwd=work, env=_clean_env(work / "home"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout
    module, plugin = result.stdout.splitlines()[:2]
    assert module == str(checkout / "mailsrv" / "__init__.py")
    assert plugin == str(checkout / "twisted" / "plugins" / "mailsrv_plugin.py")


def test_twistd_finds_the_plugin_of_an_editable_install(editable):
    python, checkout, work = editable
    result = subprocess.run(
        twistd(python, "--help"), cwd=work, env=_clean_env(work / "home"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout
    assert re.search(r"^\s+mailsrv\s+mailsrv: a mail server", result.stdout, re.M), result.stdout


def test_twistd_runs_mailsrv_from_an_editable_install(editable):
    python, checkout, work = editable
    (work / "server").mkdir()
    server = MailServer(work / "server", dns_port=53)
    server.config["smtp"]["reverse_dns"] = False  # nothing is looked up: no DNS is asked
    server.write_config()
    process = subprocess.Popen(
        twistd(python, "-n", "--pidfile=", "--logfile", str(server.log_path),
               "mailsrv", "--config", str(server.config_path)),
        cwd=server.workdir, env=_clean_env(work / "home"),
        stdout=open(server.workdir / "twistd.out", "wb"), stderr=subprocess.STDOUT,
    )
    try:
        def listening():
            if process.poll() is not None:
                raise AssertionError((server.workdir / "twistd.out").read_text()
                                     + server.log_text())
            return re.search(r"listening on \S+ \(127\.0\.0\.1 port (\d+)\)", server.log_text())

        port = int(wait_for(listening, 30, "mailsrv to listen").group(1))
        with connect(port) as c:
            assert c.ehlo()[0] == 250
    finally:
        stop_process(process)
    assert "Server Shut Down." in server.log_text()
