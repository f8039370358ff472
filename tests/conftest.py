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

# The test files that take longest, longest first (seconds of one worker, measured with --durations): xdist
# hands out whole files (--dist=loadfile) in collection order, so these start first and the many short files
# fill in at the end; a long file handed out last would keep one worker busy while the others have finished.
# A new long file belongs here; any file not listed runs after these, integration before unit tests.
LONGEST_FIRST = (
    "integration/test_pitr.py",
    "integration/test_secret_managers.py",
    "integration/test_status_page.py",
    "integration/test_neon.py",
    "integration/test_vercel.py",
    "integration/test_drill.py",
    "integration/test_keys.py",
    "integration/test_pitr_ssh.py",
    "integration/test_interrupts.py",
    "integration/test_restore.py",
    "integration/test_backup.py",
    "integration/test_lifecycle.py",
    "integration/test_decommission.py",
    "integration/test_sandbox.py",
    "integration/test_quickstart.py",
    "integration/test_prune.py",
    "integration/test_provision.py",
    "integration/test_deploy.py",
    "integration/test_migrations.py",
    "integration/test_storage.py",
    "integration/test_protected.py",
)


def file_rank(item: pytest.Item) -> tuple[int, int]:
    """Where the item's file comes in the run: the LONGEST_FIRST files in their order, then the others."""
    path = Path(str(item.path)).resolve()
    relative = path.relative_to(ROOT / "tests").as_posix() if path.is_relative_to(ROOT / "tests") else path.name
    if relative in LONGEST_FIRST:
        return 0, LONGEST_FIRST.index(relative)
    return (1 if relative.startswith("integration/") else 2), 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first (a stable sort: each file's tests stay together, in their order); pyproject's
    --no-loadscope-reorder keeps xdist from sorting the files again by their number of tests."""
    items.sort(key=file_rank)


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile opsbook once, before the workers start: the suite runs the CLI over a thousand times,
    each a new interpreter, and with PYTHONDONTWRITEBYTECODE set (as on CI machines) every one of them
    would compile every module from source again; an installed package has its bytecode from pip."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return
    for package in ("ops", "runbooks"):
        compileall.compile_dir(ROOT / package, quiet=1, rx=re.compile(r"/demo/prisma/"))
    compileall.compile_file(ROOT / "tasks.py", quiet=1)
