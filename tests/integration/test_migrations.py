"""The native migration engine against a real PostgreSQL: Prisma's bookkeeping, states, lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pg_sql

from ops.errors import CheckFailed, LockHeld, StepFailed
from ops.migrations import (
    CREATE_MIGRATIONS_TABLE,
    PRISMA_ADVISORY_LOCK_KEY,
    apply_pending,
    checksum_of,
    mark_applied,
    mark_rolled_back,
    migration_status,
    read_applied,
    read_local_migrations,
    use_prisma_schema,
)
from ops.migrations.lock_wait import LockPolicy

DEMO_MIGRATIONS = Path(__file__).resolve().parents[2] / "ops" / "demo" / "prisma" / "migrations"


@pytest.fixture
def database(postgres_server):
    return postgres_server.create_database()


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    """A private copy of the demo migrations that a test may add to or edit."""
    return Path(shutil.copytree(DEMO_MIGRATIONS, tmp_path / "migrations"))


def connect(url):
    return psycopg.connect(url.reveal(), autocommit=True)


def add_migration(directory: Path, name: str, sql: str) -> None:
    (directory / name).mkdir()
    (directory / name / "migration.sql").write_text(sql)


def insert_row(conn, name: str, checksum: str, *, finished: bool, rolled_back: bool = False) -> None:
    conn.execute(
        "INSERT INTO _prisma_migrations (id, checksum, migration_name, finished_at, rolled_back_at,"
        " applied_steps_count) VALUES (%s, %s, %s, CASE WHEN %s THEN now() END,"
        " CASE WHEN %s THEN now() END, %s)",
        (str(uuid.uuid4()), checksum, name, finished, rolled_back, int(finished)),
    )


def test_apply_to_fresh_database_then_noop(database, migrations):
    events: list[tuple[str, str]] = []
    applied = apply_pending(database, migrations, on_event=lambda event, name: events.append((event, name)))
    names = sorted(p.name for p in migrations.iterdir() if p.is_dir())
    assert applied == names
    assert [event for event, _ in events] == ["started", "applied"] * len(names)

    with connect(database) as conn:
        rows = read_applied(conn)
        assert [row.migration_name for row in rows] == names
        for row in rows:
            script = (migrations / row.migration_name / "migration.sql").read_bytes()
            assert row.checksum == checksum_of(script.decode())
            assert row.finished_at is not None and row.rolled_back_at is None
            assert row.applied_steps_count == 1 and len(row.id) == 36
        # The demo schema is really there, FKs included.
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert {"Brand", "Image", "NavigationDraft", "User", "_prisma_migrations"} <= tables
        # Prisma's exact column types.
        columns = dict(conn.execute(
            "SELECT column_name, format_type(atttypid, atttypmod) FROM information_schema.columns c"
            " JOIN pg_attribute a ON a.attrelid = '_prisma_migrations'::regclass AND a.attname = c.column_name"
            " WHERE c.table_name = '_prisma_migrations'").fetchall())
        assert columns == {
            "id": "character varying(36)", "checksum": "character varying(64)",
            "finished_at": "timestamp with time zone", "migration_name": "character varying(255)",
            "logs": "text", "rolled_back_at": "timestamp with time zone",
            "started_at": "timestamp with time zone", "applied_steps_count": "integer",
        }
        state = migration_status(conn, migrations)
    assert state.up_to_date and state.applied == names

    assert apply_pending(database, migrations) == []
    with connect(database) as conn:
        assert len(read_applied(conn)) == len(names)


def test_status_of_each_class(database, tmp_path: Path):
    directory = tmp_path / "m"
    directory.mkdir()
    for name in ("001_applied", "002_crlf", "003_edited", "004_failed", "005_rolled_back", "006_pending"):
        add_migration(directory, name, f"SELECT '{name}';\n")
    (directory / "002_crlf" / "migration.sql").write_bytes(b"SELECT 1;\r\nSELECT 2;\r\n")
    with connect(database) as conn:
        assert read_applied(conn) == []  # no table yet
        assert migration_status(conn, directory).pending[0] == "001_applied"
        conn.execute(CREATE_MIGRATIONS_TABLE)
        insert_row(conn, "001_applied", checksum_of("SELECT '001_applied';\n"), finished=True)
        insert_row(conn, "002_crlf", checksum_of("SELECT 1;\nSELECT 2;\n"), finished=True)  # applied from LF
        insert_row(conn, "003_edited", checksum_of("SELECT 'original';\n"), finished=True)
        insert_row(conn, "004_failed", checksum_of("SELECT '004_failed';\n"), finished=False)
        insert_row(conn, "005_rolled_back", checksum_of("SELECT '005_rolled_back';\n"), finished=False,
                   rolled_back=True)
        insert_row(conn, "000_database_only", checksum_of("x"), finished=True)
        state = migration_status(conn, directory)
    by_name = {entry.name: entry.status for entry in state.entries}
    assert by_name == {
        "001_applied": "applied", "002_crlf": "applied", "003_edited": "edited", "004_failed": "failed",
        "005_rolled_back": "pending", "006_pending": "pending", "000_database_only": "database_only",
    }
    assert not state.up_to_date
    assert state.verdict.startswith("1 failed migration")

    with pytest.raises(CheckFailed) as refused:
        apply_pending(database, directory)
    assert "P3009" in str(refused.value) and "004_failed" in str(refused.value)
    assert "prisma migrate resolve --rolled-back 004_failed" in refused.value.hint

    with connect(database) as conn:  # resolve the failure as an operator would
        conn.execute("UPDATE _prisma_migrations SET rolled_back_at = now() WHERE migration_name = '004_failed'")
    with pytest.raises(CheckFailed, match="edited after being applied"):
        apply_pending(database, directory)


def test_failing_migration_leaves_failed_row_and_nothing_else(database, tmp_path: Path):
    directory = tmp_path / "m"
    directory.mkdir()
    add_migration(directory, "001_ok", 'CREATE TABLE "Ok" ("id" INTEGER);\n')
    add_migration(directory, "002_bad", 'CREATE TABLE "Half" ("id" INTEGER);\nSELECT * FROM "Missing";\n')
    add_migration(directory, "003_never", 'CREATE TABLE "Never" ("id" INTEGER);\n')
    events = []
    with pytest.raises(StepFailed) as failed:
        apply_pending(database, directory, on_event=lambda event, name: events.append((event, name)))
    assert "002_bad" in str(failed.value) and "Missing" in str(failed.value)
    assert ("failed", "002_bad") in events
    with connect(database) as conn:
        rows = {row.migration_name: row for row in read_applied(conn)}
        assert set(rows) == {"001_ok", "002_bad"}
        bad = rows["002_bad"]
        assert bad.finished_at is None and bad.rolled_back_at is None and bad.applied_steps_count == 0
        assert "42P01" in bad.logs and "Missing" in bad.logs
        # The script ran as one transaction: its first statement was rolled back too.
        assert conn.execute("SELECT to_regclass('\"Half\"')").fetchone()[0] is None
        assert conn.execute("SELECT to_regclass('\"Never\"')").fetchone()[0] is None
        state = migration_status(conn, directory)
    assert state.failed == ["002_bad"] and state.pending == ["003_never"]
    with pytest.raises(CheckFailed, match="P3009"):  # deploy refuses from now on
        apply_pending(database, directory)

    # The operator fixes the script and resolves the failure, as with `prisma migrate resolve`.
    (directory / "002_bad" / "migration.sql").write_text('CREATE TABLE "Half" ("id" INTEGER);\n')
    with connect(database) as conn:
        assert mark_rolled_back(conn, "002_bad") == 1
        with pytest.raises(CheckFailed, match="no failed attempt"):
            mark_rolled_back(conn, "002_bad")
    assert apply_pending(database, directory) == ["002_bad", "003_never"]
    with connect(database) as conn:
        assert migration_status(conn, directory).up_to_date


def test_concurrent_applies_are_serialised(database, tmp_path: Path):
    directory = tmp_path / "m"
    directory.mkdir()
    # Slow enough that the second applier must wait on the lock while the first runs.
    add_migration(directory, "001_slow", 'SELECT pg_sleep(0.5);\nCREATE TABLE "T" ("id" INTEGER);\n')
    add_migration(directory, "002_next", 'ALTER TABLE "T" ADD COLUMN "x" TEXT;\n')
    results: list[object] = []
    first_started = threading.Event()

    def run(notify: bool) -> None:
        def on_event(event: str, name: str) -> None:
            if notify and event == "started":
                first_started.set()
        try:
            results.append(apply_pending(database, directory, on_event=on_event))
        except Exception as error:  # collected and asserted below
            results.append(error)

    first = threading.Thread(target=run, args=(True,))
    first.start()
    assert first_started.wait(10)
    waits: list[str] = []
    second_result = apply_pending(database, directory, on_event=lambda event, detail: waits.append(event))
    first.join(10)
    assert results == [["001_slow", "002_next"]]
    assert second_result == []  # it waited, re-read the state, found nothing to do
    assert waits == ["waiting"]
    with connect(database) as conn:
        assert len(read_applied(conn)) == 2


def test_lock_timeout_names_the_holder(database, migrations):
    with connect(database) as holder:
        holder.execute("SET application_name = 'prisma-migrate-deploy'")
        holder.execute("SELECT pg_advisory_lock(%s)", (PRISMA_ADVISORY_LOCK_KEY,))
        with pytest.raises(LockHeld) as held:
            apply_pending(database, migrations, lock_timeout=0.3)
    assert "prisma-migrate-deploy" in str(held.value)
    with connect(database) as conn:
        assert read_applied(conn) == []  # nothing happened while the lock was held


def test_prisma_schema_parameter_is_honoured(database, migrations):
    url = database.reveal() + "?schema=tenant_a"
    assert apply_pending(url, migrations)
    with connect(database) as conn:
        assert conn.execute("SELECT to_regclass('tenant_a._prisma_migrations')").fetchone()[0] is not None
        assert conn.execute("SELECT to_regclass('tenant_a.\"Brand\"')").fetchone()[0] is not None
        assert read_applied(conn) == []  # public holds nothing
        use_prisma_schema(conn, url)
        assert migration_status(conn, migrations).up_to_date


def test_resolve_applied_records_a_migration_finished_by_hand(database, tmp_path: Path):
    directory = tmp_path / "m"
    directory.mkdir()
    add_migration(directory, "001_bad", 'CREATE TABLE "T" ("id" INTEGER);\nSELECT * FROM "Missing";\n')
    with pytest.raises(StepFailed):
        apply_pending(database, directory)
    with connect(database) as conn:  # the operator finishes it by hand, then records it, as Prisma's --applied
        conn.execute('CREATE TABLE "T" ("id" INTEGER)')
        (migration,) = read_local_migrations(directory)
        mark_applied(conn, migration)
        rows = read_applied(conn)
        assert [(r.finished_at is None, r.rolled_back_at is None) for r in rows] == [(True, False), (False, True)]
        assert rows[1].checksum == migration.checksum and rows[1].applied_steps_count == 0
        assert migration_status(conn, directory).up_to_date
        with pytest.raises(CheckFailed, match="P3008"):
            mark_applied(conn, migration)
    assert apply_pending(database, directory) == []


# --- Prisma's own CLI agrees ---------------------------------------------------------------------
# Prisma's CLI downloads native engines from binaries.prisma.sh at start-up, which is unreachable
# here. Prisma 6 can run without them: `engineType = "client"` (no query engine) and a driver adapter
# in prisma.config.ts (the schema engine then runs as WebAssembly, shipped in the npm package).
# Prisma 7 dropped that path for migrate and needs the native schema engine again.

PRISMA_VERSION = "6.19.3"
PRISMA_CACHE = Path(__file__).resolve().parents[2] / ".ops" / "cache" / f"prisma-{PRISMA_VERSION}"
PRISMA_SCHEMA = """\
generator client {
  provider        = "prisma-client-js"
  engineType      = "client"
  previewFeatures = ["queryCompiler", "driverAdapters"]
}

datasource db {
  provider = "postgresql"
  url      = env("DATABASE_URL")
}
"""
PRISMA_CONFIG = """\
import { defineConfig } from "prisma/config";
import { PrismaPg } from "@prisma/adapter-pg";

export default defineConfig({
  experimental: { adapter: true },
  engine: "js",
  adapter: async () => new PrismaPg({ connectionString: process.env.DATABASE_URL }),
  schema: "prisma/schema.prisma",
  migrations: { path: "prisma/migrations" },
});
"""


@pytest.fixture(scope="session")
def prisma_cli() -> Path:
    """node_modules with Prisma's CLI, installed once into a cache under .ops (not the repository)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    binary = PRISMA_CACHE / "node_modules" / ".bin" / "prisma"
    if not binary.exists():
        PRISMA_CACHE.mkdir(parents=True, exist_ok=True)
        (PRISMA_CACHE / "package.json").write_text('{"name": "opsbook-prisma-check", "private": true}\n')
        installed = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts",
             f"prisma@{PRISMA_VERSION}", f"@prisma/adapter-pg@{PRISMA_VERSION}"],
            cwd=PRISMA_CACHE, capture_output=True, text=True, timeout=600)
        assert installed.returncode == 0, installed.stderr
    return PRISMA_CACHE / "node_modules"


def prisma_status(project: Path, url: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATABASE_URL": url, "CHECKPOINT_DISABLE": "1", "PRISMA_HIDE_UPDATE_MESSAGE": "1"}
    return subprocess.run([str(project / "node_modules" / ".bin" / "prisma"), "migrate", "status"], cwd=project,
                          env=environment, capture_output=True, text=True, timeout=120)


def test_prisma_migrate_status_agrees_after_a_native_deploy(database, prisma_cli, tmp_path: Path):
    project = tmp_path / "app"
    shutil.copytree(DEMO_MIGRATIONS, project / "prisma" / "migrations")
    (project / "prisma" / "schema.prisma").write_text(PRISMA_SCHEMA)
    (project / "prisma.config.ts").write_text(PRISMA_CONFIG)
    (project / "node_modules").symlink_to(prisma_cli)
    migrations = project / "prisma" / "migrations"

    assert apply_pending(database, migrations)
    agreed = prisma_status(project, database.reveal())
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    assert "Database schema is up to date!" in agreed.stdout

    add_migration(migrations, "20250201000000_more", 'ALTER TABLE "Brand" ADD COLUMN "motto" TEXT;\n')
    with connect(database) as conn:
        assert migration_status(conn, migrations).pending == ["20250201000000_more"]
    pending = prisma_status(project, database.reveal())
    assert pending.returncode == 1 and "20250201000000_more" in pending.stdout, pending
    assert "20250122110000_users" not in pending.stdout  # the applied ones are not listed as pending


CONCURRENT = ('-- CreateIndex\nCREATE INDEX CONCURRENTLY "Brand_name_idx" ON "Brand"("name");\n\n'
              'BEGIN;\nALTER TABLE "Brand" ADD COLUMN "motto" TEXT;\nCOMMIT;\n'
              '-- a comment; with a semicolon\nCREATE INDEX CONCURRENTLY "Brand_motto_idx" ON "Brand"("motto");\n')


def index_valid(conn, name: str) -> bool | None:
    row = conn.execute("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
                       (f'"{name}"',)).fetchone()
    return row[0] if row else None


def test_a_concurrent_index_runs_outside_a_transaction(database, migrations):
    """The lock linter's safe form: PostgreSQL refuses CREATE INDEX CONCURRENTLY in a transaction block."""
    apply_pending(database, migrations)
    add_migration(migrations, "20250301000000_index", CONCURRENT)
    assert apply_pending(database, migrations) == ["20250301000000_index"]
    with connect(database) as conn:
        assert index_valid(conn, "Brand_name_idx") is True and index_valid(conn, "Brand_motto_idx") is True
        row = next(r for r in read_applied(conn) if r.migration_name == "20250301000000_index")
        assert row.finished_at is not None and row.applied_steps_count == 1 and row.logs is None
        assert migration_status(conn, migrations).up_to_date


def test_a_failing_concurrent_migration_is_recorded_failed_with_what_was_kept(database, migrations):
    apply_pending(database, migrations)
    add_migration(migrations, "20250301000000_index",
                  'CREATE INDEX CONCURRENTLY "Brand_name_idx" ON "Brand"("name");\nSELECT * FROM "Missing";\n')
    with pytest.raises(StepFailed) as failed:
        apply_pending(database, migrations)
    assert "the 1 before the failing one were kept" in failed.value.hint
    with connect(database) as conn:
        row = next(r for r in read_applied(conn) if r.migration_name == "20250301000000_index")
        assert row.finished_at is None and "42P01" in row.logs
        assert index_valid(conn, "Brand_name_idx") is True  # kept: it ran on its own
        assert migration_status(conn, migrations).failed == ["20250301000000_index"]


# --- lock timeouts and retries -------------------------------------------------------------------

FAST = LockPolicy(timeout=0.3, retries=3)
ADD_MOTTO = 'ALTER TABLE "Brand" ADD COLUMN "motto" TEXT;\n'


def holding(database, mode: str = "ACCESS EXCLUSIVE"):
    """A session of the test's holding a lock on "Brand" in an open transaction."""
    holder = connect(database)
    holder.execute("SET application_name = 'a long report'")
    holder.execute("BEGIN")
    holder.execute(f'LOCK TABLE "Brand" IN {mode} MODE')
    return holder


def has_column(conn, table: str, column: str) -> bool:
    return conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s",
                        (f'"{table}"', column)).fetchone()[0] == 1


def test_a_lock_timeout_is_retried_and_succeeds_once_the_lock_is_gone(database, migrations):
    apply_pending(database, migrations)
    add_migration(migrations, "20250301000000_motto", ADD_MOTTO)
    holder = holding(database)
    holder_pid = holder.info.backend_pid
    events: list[tuple[str, str]] = []

    def on_event(event: str, detail: str) -> None:
        events.append((event, detail))
        if event == "lock-timeout":
            holder.execute("ROLLBACK")  # the report finishes during the pause

    with holder:
        assert apply_pending(database, migrations, on_event=on_event, policy=FAST) == ["20250301000000_motto"]
    assert [event for event, _ in events] == ["started", "lock-timeout", "started", "applied"]
    timeout = events[1][1]
    assert "attempt 1 of 4 gave up waiting 0.3 s" in timeout and "trying again in 0.3 s" in timeout
    assert f"pid {holder_pid} (a long report" in timeout and 'LOCK TABLE "Brand"' in timeout
    assert 'AccessExclusiveLock on "Brand"' in timeout
    with connect(database) as conn:
        rows = [row for row in read_applied(conn) if row.migration_name == "20250301000000_motto"]
        # the timed-out attempt is recorded rolled back, as `prisma migrate resolve --rolled-back` would
        assert [(row.finished_at is None, row.rolled_back_at is None) for row in rows] == [(True, False),
                                                                                          (False, True)]
        assert "55P03" in rows[0].logs and rows[1].logs is None
        assert has_column(conn, "Brand", "motto") and migration_status(conn, migrations).up_to_date


def test_a_lock_held_throughout_fails_after_every_attempt_with_nothing_recorded_applied(database, migrations):
    apply_pending(database, migrations)
    add_migration(migrations, "20250301000000_motto", ADD_MOTTO)
    add_migration(migrations, "20250302000000_after", 'CREATE TABLE "After" ("id" INTEGER);\n')
    events: list[str] = []
    with holding(database) as holder:
        with pytest.raises(StepFailed) as failed:
            apply_pending(database, migrations, on_event=lambda event, detail: events.append(event),
                          policy=LockPolicy(timeout=0.2, retries=2))
        assert f"pid {holder.info.backend_pid} (a long report" in str(failed.value)
    assert "could not take its locks" in str(failed.value) and "in 3 attempt(s) of 0.2 s" in str(failed.value)
    assert "55P03" in str(failed.value) and "pending again" in failed.value.hint
    assert events == ["started", "lock-timeout"] * 3
    with connect(database) as conn:
        rows = [row for row in read_applied(conn) if row.migration_name == "20250301000000_motto"]
        assert len(rows) == 3 and all(row.rolled_back_at is not None and row.finished_at is None for row in rows)
        assert not has_column(conn, "Brand", "motto")
        state = migration_status(conn, migrations)
    assert state.pending == ["20250301000000_motto", "20250302000000_after"] and not state.failed
    assert apply_pending(database, migrations, policy=FAST) == ["20250301000000_motto", "20250302000000_after"]


def test_a_statement_by_statement_migration_retries_from_the_statement_that_timed_out(database, migrations):
    apply_pending(database, migrations)
    add_migration(migrations, "20250301000000_index", CONCURRENT)
    holder = holding(database, "SHARE UPDATE EXCLUSIVE")  # what CREATE INDEX CONCURRENTLY itself takes
    events: list[str] = []

    def on_event(event: str, detail: str) -> None:
        events.append(event)
        if event == "lock-timeout":
            holder.execute("ROLLBACK")

    with holder:
        assert apply_pending(database, migrations, on_event=on_event, policy=FAST) == ["20250301000000_index"]
    assert events == ["started", "lock-timeout", "applied"]  # one attempt row, the statement tried again
    with connect(database) as conn:
        assert index_valid(conn, "Brand_name_idx") is True and index_valid(conn, "Brand_motto_idx") is True
        rows = [row for row in read_applied(conn) if row.migration_name == "20250301000000_index"]
        assert len(rows) == 1 and rows[0].finished_at is not None


def test_statement_timeout_is_off_and_lock_timeout_set_for_the_migration(database, tmp_path: Path):
    directory = tmp_path / "m"
    directory.mkdir()
    add_migration(directory, "001_settings", "CREATE TABLE settings AS SELECT current_setting('lock_timeout') AS l,"
                                             " current_setting('statement_timeout') AS s;\n")
    with connect(database) as conn:  # a default of the database's (as a role's would be) is overridden
        conn.execute(pg_sql.SQL("ALTER DATABASE {} SET statement_timeout = '1s'").format(
            pg_sql.Identifier(conn.info.dbname)))
    apply_pending(database, directory, policy=LockPolicy(timeout=2.5))
    with connect(database) as conn:
        assert conn.execute("SELECT l, s FROM settings").fetchone() == ("2500ms", "0")
