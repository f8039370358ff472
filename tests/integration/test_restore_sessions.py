"""A restore's maintenance session: one per run, shared by its steps, and a new one after a block that failed."""

from __future__ import annotations

from typing import Any

import pytest

from ops import restore_db
from ops.engine import RunContext
from ops.inventory import load
from ops.output import Output
from tests.cli import Opsbook


def backend(connection: Any) -> int:
    return connection.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_the_steps_share_one_maintenance_session_and_a_failed_block_leaves_the_next_a_fresh_one(
        opsbook: Opsbook, postgres_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONS_DB_URL", postgres_server.create_database().reveal())
    opsbook.write_inventory({"project": "sessions", "default_env": "staging",
                             "envs": {"staging": {"database": {"url": "${env:SESSIONS_DB_URL}"}}}})
    ctx = RunContext(load(opsbook.inventory).environment("staging"), output=Output())
    url = ctx.env.admin_url()
    try:
        with restore_db.shared_maintenance(ctx, url) as connection:
            first = backend(connection)
        with restore_db.shared_maintenance(ctx, url) as connection:
            assert backend(connection) == first
        with pytest.raises(KeyboardInterrupt), restore_db.shared_maintenance(ctx, url) as connection:
            raise KeyboardInterrupt  # as if cut short mid-query
        assert connection.closed
        with restore_db.shared_maintenance(ctx, url) as connection:
            assert backend(connection) != first
            latest = connection
    finally:
        ctx.close()
    assert latest.closed  # closed with the run's other connections
