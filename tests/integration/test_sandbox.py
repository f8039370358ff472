"""The embedded sandbox for real: its own PostgreSQL cluster, folder buckets and demo app."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from ops.demo import seed
from ops.errors import OpsError
from ops.sandbox import APP_BUCKET, BACKUP_BUCKET, Sandbox


@dataclass
class UpResult:
    sandbox: Sandbox
    first_lines: list[str]


@pytest.fixture(scope="module")
def made() -> Iterator[UpResult]:
    # Not pytest's tmp_path: its parents are 0700, and as root the cluster runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="opsbook-sandbox-"))
    base.chmod(0o755)
    sandbox = Sandbox(base / "sandbox")
    lines: list[str] = []
    try:
        sandbox.up(log=lines.append)
        yield UpResult(sandbox, lines)
    finally:
        sandbox.destroy()  # stops the cluster whatever happened
        shutil.rmtree(base, ignore_errors=True)


def app_conn(sandbox: Sandbox):
    return psycopg.connect(sandbox.info().database_url.reveal(), autocommit=True)


def test_up_from_nothing(made: UpResult):
    sandbox, lines = made.sandbox, made.first_lines
    assert len(lines) == 7 and not any("already" in line for line in lines)
    info = sandbox.info()
    assert info.running and info.port
    assert info.database_url == info.direct_url and str(info.database_url) == "***"
    password = json.loads((sandbox.home / "credentials.json").read_text())["password"]
    assert stat.S_IMODE((sandbox.home / "credentials.json").stat().st_mode) == 0o600
    assert not any(password in line for line in lines)
    assert (info.app_dir / "prisma" / "migrations" / "migration_lock.toml").is_file()

    with app_conn(sandbox) as conn:
        counts = {table: conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
                  for table in ("Brand", "Image", "NavigationDraft", "User")}
        assert counts == {"Brand": seed.BRAND_COUNT, "Image": seed.IMAGE_COUNT,
                          "NavigationDraft": seed.DRAFT_COUNT, "User": seed.USER_COUNT}
        images = conn.execute('SELECT "storageKey", "sizeBytes" FROM "Image" ORDER BY id LIMIT %s',
                              (seed.IMAGE_OBJECT_COUNT,)).fetchall()
        # Sequences were moved past the copied ids: the app can insert.
        conn.execute('INSERT INTO "Brand" (slug, name, "updatedAt") VALUES (%s, %s, now())', ("new", "New"))
        conn.execute("DELETE FROM \"Brand\" WHERE slug = 'new'")
        # The passwords are hashed, never stored as given.
        assert conn.execute("""SELECT count(*) FROM "User" WHERE "passwordHash" LIKE 'scrypt$%'""").fetchone()[0] \
            == seed.USER_COUNT
        # Prisma's bookkeeping is real.
        rows = conn.execute("SELECT migration_name, checksum FROM _prisma_migrations ORDER BY migration_name")
        for name, checksum in rows.fetchall():
            script = info.app_dir / "prisma" / "migrations" / name / "migration.sql"
            assert checksum == hashlib.sha256(script.read_bytes()).hexdigest()

    bucket = info.storage_path / APP_BUCKET
    for key, size in images:  # every one of the first images has its object, with the recorded size
        assert (bucket / key).stat().st_size == size
    assert sum(1 for path in (bucket / "images").rglob("*.jpg")) == seed.IMAGE_OBJECT_COUNT
    first = (bucket / images[0][0]).read_bytes()
    assert first.startswith(b"\xff\xd8\xff") and first.endswith(b"\xff\xd9")
    assert (info.storage_path / BACKUP_BUCKET).is_dir()


def test_second_up_is_a_noop_and_says_so(made: UpResult):
    sandbox = made.sandbox
    port = sandbox.info().port
    lines: list[str] = []
    info = sandbox.up(log=lines.append)
    assert len(lines) == 7
    assert all("already" in line for line in lines), lines
    assert info.port == port
    with app_conn(sandbox) as conn:
        assert conn.execute('SELECT count(*) FROM "Image"').fetchone()[0] == seed.IMAGE_COUNT
        assert conn.execute("SELECT count(*) FROM _prisma_migrations").fetchone()[0] == 4


def test_status(made: UpResult):
    status = made.sandbox.status()
    assert status["running"] is True and status["port"] == made.sandbox.info().port
    assert status["tables"]["public.Image"] == seed.IMAGE_COUNT
    assert status["demo_images"] == seed.IMAGE_OBJECT_COUNT
    assert status["migrations"]["up_to_date"] is True and len(status["migrations"]["applied"]) == 4
    assert status["database_size_bytes"] > 0
    json.dumps(status)  # ready for --json
    assert json.loads((made.sandbox.home / "credentials.json").read_text())["password"] not in json.dumps(status)


def test_down_then_ensure_running_restarts_it(made: UpResult):
    sandbox = made.sandbox
    sandbox.down()
    assert not sandbox.is_running()
    stopped = sandbox.status()
    assert stopped["running"] is False and "tables" not in stopped
    lines: list[str] = []
    info = sandbox.ensure_running(log=lines.append)
    assert info.running and len(lines) == 1 and "started" in lines[0]
    with app_conn(sandbox) as conn:  # the data survived
        assert conn.execute('SELECT count(*) FROM "Brand"').fetchone()[0] == seed.BRAND_COUNT
    quiet: list[str] = []
    sandbox.ensure_running(log=quiet.append)
    assert quiet == []  # already running: nothing to say


def test_taken_port_is_replaced_and_remembered(made: UpResult):
    sandbox = made.sandbox
    old_port = sandbox.info().port
    sandbox.down()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the old port may be in TIME_WAIT
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        info = sandbox.ensure_running(log=lambda line: None)
    assert info.running and info.port != old_port
    assert json.loads((sandbox.home / "sandbox.json").read_text())["port"] == info.port
    with app_conn(sandbox) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to another user")
def test_home_the_server_user_cannot_reach_is_refused_clearly():
    base = Path(tempfile.mkdtemp(prefix="opsbook-sandbox-private-"))  # 0700: postgres cannot enter
    try:
        with pytest.raises(OpsError, match="cannot reach") as refused:
            Sandbox(base / "sandbox").up(log=lambda line: None)
        assert "chmod o+x" in refused.value.hint
    finally:
        shutil.rmtree(base, ignore_errors=True)
