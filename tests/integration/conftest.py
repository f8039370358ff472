"""Workspaces for driving the real CLI against the session's real servers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli import Opsbook
from tests.fixtures.browser import CHROMIUM, Browser, load_axe


@pytest.fixture(scope="session")
def axe_source() -> str:
    """axe-core's script, for the tests that open pages in Chromium (tests/fixtures/browser.py)."""
    return load_axe()


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """One headless Chromium for the session's pages (each opens in a fresh browser context)."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (./opsbook pytest installs it)")
    started = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield started
    started.close()


@pytest.fixture
def opsbook(tmp_path: Path) -> Iterator[Opsbook]:
    workspace = Opsbook(tmp_path / "workspace")
    workspace.root.mkdir()
    yield workspace


@pytest.fixture
def staging(opsbook: Opsbook, postgres_server: Any, s3_server: Any) -> dict[str, Any]:
    """An inventory with a `staging` (and a protected `prod`) environment on the real servers.

    Credentials reach the inventory only as ${env:…} references, as in production.
    Returns the names the test can check and the secret values it must never see.
    """
    suffix = uuid.uuid4().hex[:8]
    names = {"role": f"app_{suffix}", "database": f"shop_{suffix}", "bucket": f"assets-{suffix}",
             "backups": f"backups-{suffix}"}
    opsbook.environ.update({
        "ADMIN_DATABASE_URL": postgres_server.url().reveal(),
        "S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key.reveal(),
    })
    environment = {
        "database": {"url": f"postgresql://{names['role']}@127.0.0.1:{postgres_server.port}/{names['database']}",
                     "admin_url": "${env:ADMIN_DATABASE_URL}"},
        "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": names["bucket"], "access_key_id": "${env:S3_ACCESS_KEY_ID}",
                    "secret_access_key": "${env:S3_SECRET_ACCESS_KEY}"},
        "backups": {"bucket": names["backups"], "prefix": "staging/"},
    }
    opsbook.write_inventory({
        "project": "enginetest", "default_env": "staging",
        "envs": {"staging": environment, "prod": {**environment, "protected": True}},
    })
    return {**names, "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal()]}


@pytest.fixture(scope="module")
def sandbox_workspace() -> Iterator[Opsbook]:
    """A workspace whose default environment is the embedded sandbox, started by the first task.

    Not under pytest's tmp_path: its parents are 0700, and as root the cluster runs as `postgres`.
    """
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="opsbook-workspace-"))
    base.chmod(0o755)
    workspace = Opsbook(base / "workspace")
    workspace.root.mkdir()
    workspace.root.chmod(0o755)
    workspace.write_inventory({"project": "sandboxtest", "default_env": "local", "envs": {"local": {"sandbox": True}}})
    try:
        yield workspace
    finally:
        from ops.sandbox import Sandbox

        Sandbox(workspace.state_dir / "sandbox").destroy()
        shutil.rmtree(base, ignore_errors=True)
