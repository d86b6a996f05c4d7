"""setup.cfg lists every package of mailsrv, so that the wheel and the Debian package hold them all.

setup.cfg names its packages one by one (``packages =``); setuptools copies a listed package's
modules and nothing else, so a subpackage missing from the list is not an error anywhere: it is
simply absent from the wheel that pybuild installs, and the installed server fails on its first
import of it, while every test run from the checkout passes.
"""

from __future__ import annotations

import configparser
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from support.harness import REPO


def listed_packages() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    return parser.get("options", "packages").split()


def python_directories(root: Path) -> list[Path]:
    """``root`` and every directory below it that holds a Python module."""
    found = {root}
    for module in root.rglob("*.py"):
        found.add(module.parent)
    return sorted(found)


def test_every_mailsrv_package_is_listed() -> None:
    listed = listed_packages()
    for directory in python_directories(REPO / "mailsrv"):
        name = ".".join(directory.relative_to(REPO).parts)
        # A directory without __init__.py would be a namespace package, which a plain
        # "packages =" list and Debian's pybuild treat differently: none is wanted.
        assert (directory / "__init__.py").is_file(), f"{name} has no __init__.py"
        assert name in listed, f"{name} is not in setup.cfg's packages"


def test_every_listed_package_exists() -> None:
    for name in listed_packages():
        assert (REPO / Path(*name.split("."))).is_dir(), name
    assert "twisted.plugins" in listed_packages()  # where twistd finds the mailsrv plugin


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    lines = parser.get("options.entry_points", "console_scripts").strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines)


def test_every_console_script_names_a_function() -> None:
    """``mailsrv`` and ``mailsrv-sendmail`` (``/usr/sbin/sendmail`` in the Debian package) are
    generated from these targets at install time: a target left behind by a module split would
    break the installed command only."""
    scripts = console_scripts()
    assert set(scripts) == {"mailsrv", "mailsrv-sendmail"}
    for name, target in scripts.items():
        module_name, _, attribute = target.partition(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attribute, None)), f"{name} = {target}"


@pytest.mark.parametrize("module", [
    "mailsrv.tools.cli", "mailsrv.tools.cli_exit", "mailsrv.tools.cli_queue", "mailsrv.tools.cli_user",
    "mailsrv.outbound.dsn", "mailsrv.outbound.dsn_original", "mailsrv.outbound.dsn_text",
    "mailsrv.storage.queue", "mailsrv.storage.queue_control",
    "mailsrv.tools.sendmail", "mailsrv.tools.sendmail_args", "mailsrv.tools.sendmail_message",
    "mailsrv.tools.sendmail_submit",
    "mailsrv.tools.doctor.command", "mailsrv.tools.doctor.probe", "mailsrv.tools.doctor.probe_dns",
    "mailsrv.tools.doctor.evaluate", "mailsrv.tools.doctor.evaluate_mail",
])
def test_split_module_imports_first(module: str) -> None:
    """Each part of a split module imports on its own, in a fresh interpreter (no import
    cycle between the parts that only a particular import order hides)."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
