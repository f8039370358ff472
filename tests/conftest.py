"""Session-wide real servers on loopback: PostgreSQL, S3 (moto), sshd with a test app."""

from __future__ import annotations

import compileall
import re
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.s3",
    "tests.fixtures.ssh",
    "tests.fixtures.notify",
    "tests.fixtures.cloudflare",
    "tests.fixtures.provision",
    "tests.fixtures.vercel",
    "tests.fixtures.neon",
]

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile opsbook once, before the workers start: the suite runs the CLI over a thousand times,
    each a new interpreter, and with PYTHONDONTWRITEBYTECODE set (as on CI machines) every one of them
    would compile every module from source again; an installed package has its bytecode from pip."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return
    for package in ("ops", "runbooks"):
        compileall.compile_dir(ROOT / package, quiet=1, rx=re.compile(r"/demo/prisma/"))
    compileall.compile_file(ROOT / "tasks.py", quiet=1)
