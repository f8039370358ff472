"""Migration state classification, table-driven, with Prisma's checksum rules."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ops.errors import CheckFailed
from ops.migrations import (
    LocalMigration,
    MigrationRow,
    checksum_of,
    classify,
    read_local_migrations,
    read_lock_provider,
    script_matches_checksum,
)
from ops.migrations.contract import conflicts, references, removals
from ops.migrations.drift import compare, with_schema
from ops.migrations.lock_wait import LockPolicy, tables_named
from ops.secrets import Secret

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
T1 = datetime(2025, 1, 1, 12, 1, tzinfo=UTC)
SQL = {
    "001_init": 'CREATE TABLE "A" ("id" INTEGER);\n',
    "002_more": 'CREATE TABLE "B" ("id" INTEGER);\n',
    "003_last": 'ALTER TABLE "B" ADD COLUMN "x" TEXT;\n',
}


def local(*names: str) -> list[LocalMigration]:
    return [LocalMigration(name, checksum_of(SQL[name]), SQL[name], Path(name)) for name in names]


def row(name: str, *, finished: bool = True, rolled_back: bool = False, checksum: str | None = None):
    return MigrationRow(
        id=f"id-{name}-{finished}-{rolled_back}",
        migration_name=name,
        checksum=checksum if checksum is not None else checksum_of(SQL.get(name, name)),
        started_at=T0,
        finished_at=T1 if finished else None,
        rolled_back_at=T1 if rolled_back else None,
    )


CASES = [
    # (id, local names, rows, expected {name: status}, up_to_date)
    ("fresh database", ["001_init", "002_more"], [], {"001_init": "pending", "002_more": "pending"}, False),
    ("all applied", ["001_init", "002_more"], [row("001_init"), row("002_more")],
     {"001_init": "applied", "002_more": "applied"}, True),
    ("one pending", ["001_init", "002_more"], [row("001_init")],
     {"001_init": "applied", "002_more": "pending"}, False),
    ("failed blocks", ["001_init", "002_more"], [row("001_init"), row("002_more", finished=False)],
     {"001_init": "applied", "002_more": "failed"}, False),
    ("rolled back is pending again", ["001_init"], [row("001_init", finished=False, rolled_back=True)],
     {"001_init": "pending"}, False),
    ("rolled back then reapplied", ["001_init"],
     [row("001_init", finished=False, rolled_back=True), row("001_init")], {"001_init": "applied"}, True),
    ("rolled back then failed again", ["001_init"],
     [row("001_init", finished=False, rolled_back=True), row("001_init", finished=False)],
     {"001_init": "failed"}, False),
    ("edited", ["001_init"], [row("001_init", checksum=checksum_of("something else"))],
     {"001_init": "edited"}, False),
    ("database only", ["001_init"], [row("001_init"), row("000_gone")],
     {"001_init": "applied", "000_gone": "database_only"}, False),
    ("database only rolled back is ignored", ["001_init"],
     [row("001_init"), row("000_gone", finished=False, rolled_back=True)], {"001_init": "applied"}, True),
    ("failed without folder is failed", [], [row("000_gone", finished=False)], {"000_gone": "failed"}, False),
    ("nothing at all", [], [], {}, True),
    ("failed next to a finished attempt is failed", ["001_init"], [row("001_init"), row("001_init", finished=False)],
     {"001_init": "failed"}, False),
    ("one of two finished attempts matches", ["001_init"],
     [row("001_init", checksum=checksum_of("old")), row("001_init")], {"001_init": "applied"}, True),
    ("edited and rolled back is just pending", ["001_init"],
     [row("001_init", checksum=checksum_of("old"), rolled_back=True)], {"001_init": "pending"}, False),
    ("pending after applied keeps folder order", ["001_init", "002_more", "003_last"],
     [row("001_init"), row("003_last")], {"001_init": "applied", "002_more": "pending", "003_last": "applied"},
     False),
    ("database only next to failed", ["001_init"], [row("001_init", finished=False), row("000_gone")],
     {"001_init": "failed", "000_gone": "database_only"}, False),
]


@pytest.mark.parametrize(("local_names", "rows", "expected", "up_to_date"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_classify(local_names, rows, expected, up_to_date):
    state = classify(local(*local_names), rows)
    assert {entry.name: entry.status for entry in state.entries} == expected
    assert state.up_to_date is up_to_date
    for status in ("applied", "pending", "failed", "edited", "database_only"):
        assert getattr(state, status) == [name for name, value in expected.items() if value == status]
    json.dumps(state.to_json())  # serialisable


def test_entries_keep_local_order_then_database_only():
    state = classify(local("003_last", "001_init", "002_more")[::-1], [row("zzz"), row("000_old")])
    assert [entry.name for entry in state.entries][-2:] == ["000_old", "zzz"]


@pytest.mark.parametrize(
    ("rows", "verdict_contains"),
    [
        ([row("001_init"), row("002_more"), row("003_last")], "up to date (3 migrations applied)"),
        ([row("001_init")], "2 pending migrations not yet applied: 002_more, 003_last"),
        ([row("001_init", finished=False)], "1 failed migration deploy refuses until resolved (P3009): 001_init"),
        ([row("001_init", checksum="0" * 64)], "edited after it was applied: 001_init"),
    ],
)
def test_verdict_is_one_line(rows, verdict_contains):
    verdict = classify(local("001_init", "002_more", "003_last"), rows).verdict
    assert verdict_contains in verdict
    assert "\n" not in verdict


def test_verdict_puts_failed_before_pending():
    verdict = classify(local("001_init", "002_more"), [row("001_init", finished=False)]).verdict
    assert verdict.index("failed") < verdict.index("pending")


@pytest.mark.parametrize(
    ("script", "stored_for", "matches"),
    [
        ("ab\ncd\n", "ab\ncd\n", True),
        ("ab\r\ncd\r\n", "ab\ncd\n", True),     # CRLF checkout of an LF-applied file
        ("ab\ncd\n", "ab\r\ncd\r\n", True),     # LF checkout of a CRLF-applied file
        ("ab\ncd\n", "ab\ncd", False),
        ("abc", "abcd", False),
    ],
)
def test_checksum_line_endings(script, stored_for, matches):
    assert script_matches_checksum(script, checksum_of(stored_for)) is matches


def test_checksum_is_prisma_format():
    # The value Prisma's own test suite expects for "hello".
    assert checksum_of("hello") == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def test_unpadded_legacy_checksum_matches():
    script = next(text for text in (f"x{i}" for i in range(100))
                  if any(byte < 16 for byte in hashlib.sha256(text.encode()).digest()))
    legacy = "".join(f"{byte:x}" for byte in hashlib.sha256(script.encode()).digest())
    assert len(legacy) < 64
    assert script_matches_checksum(script, legacy)
    assert not script_matches_checksum(script + " ", legacy)


def test_read_local_migrations(tmp_path: Path):
    for name in ("20250102000000_second", "20250101000000_first"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "migration.sql").write_bytes(f"-- {name}\r\n".encode())
    (tmp_path / "migration_lock.toml").write_text('provider = "postgresql"\n')
    (tmp_path / "README.md").write_text("not a migration")
    migrations = read_local_migrations(tmp_path)
    assert [m.name for m in migrations] == ["20250101000000_first", "20250102000000_second"]
    first = migrations[0]
    assert first.checksum == hashlib.sha256(b"-- 20250101000000_first\r\n").hexdigest()
    assert first.sql == "-- 20250101000000_first\r\n"  # bytes kept as is: no newline translation
    assert read_lock_provider(tmp_path) == "postgresql"


def test_read_local_migrations_errors(tmp_path: Path):
    with pytest.raises(CheckFailed, match="does not exist"):
        read_local_migrations(tmp_path / "missing")
    (tmp_path / "20250101000000_empty").mkdir()
    with pytest.raises(CheckFailed, match=r"has no migration\.sql"):
        read_local_migrations(tmp_path)


def test_crlf_checkout_of_lf_applied_migration_is_applied():
    crlf = SQL["001_init"].replace("\n", "\r\n")
    migration = LocalMigration("001_init", checksum_of(crlf), crlf, Path("001_init"))
    assert classify([migration], [row("001_init")]).applied == ["001_init"]


# --- where an environment's migrations come from -----------------------------------------------


def environment(tmp_path: Path, app: dict, **extra):
    import yaml

    from ops.inventory import load

    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(
        {"project": "p", "envs": {"e": {"database": {"url": "postgresql://u@127.0.0.1/db"}, "app": app, **extra}}}))
    return load(tmp_path / "inventory.yaml").environment("e")


def make_migrations(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).mkdir(parents=True)
        (directory / name / "migration.sql").write_text(f"-- {name}\n")


def test_load_from_checkout_relative_to_inventory(tmp_path: Path):
    from ops.migrations import load_migration_source

    make_migrations(tmp_path / "checkout" / "db" / "migrations", "002_b", "001_a")
    env = environment(tmp_path, {"repository": "checkout", "migrations": {"dir": "db/migrations"},
                                 "dir": "/srv/app"}, hosts=[{"name": "web1", "address": "10.0.0.9"}])
    source = load_migration_source(env)  # the checkout wins over the hosts: no SSH needed
    assert [m.name for m in source.migrations] == ["001_a", "002_b"]
    assert source.where.startswith("checkout ") and str(tmp_path / "checkout") in source.where


def test_load_from_app_dir_without_hosts(tmp_path: Path):
    from ops.migrations import load_migrations

    make_migrations(tmp_path / "app" / "prisma" / "migrations", "001_a")
    assert [m.name for m in load_migrations(environment(tmp_path, {"dir": str(tmp_path / "app")}))] == ["001_a"]


def test_load_refuses_other_provider_and_nowhere(tmp_path: Path):
    from ops.errors import InventoryError
    from ops.migrations import load_migrations

    make_migrations(tmp_path / "app" / "prisma" / "migrations", "001_a")
    (tmp_path / "app" / "prisma" / "migrations" / "migration_lock.toml").write_text('provider = "mysql"\n')
    with pytest.raises(CheckFailed, match="mysql"):
        load_migrations(environment(tmp_path, {"repository": "app"}))
    with pytest.raises(InventoryError, match="nowhere to read migrations") as nowhere:
        load_migrations(environment(tmp_path, {"health_url": "http://127.0.0.1/"}))
    assert "app.repository" in nowhere.value.hint


@pytest.mark.parametrize(
    ("protected", "arguments", "expected"),
    [
        (False, {}, ["gate", "lint", "deploy"]),
        (True, {}, ["gate", "lint", "dump", "globals", "manifest", "deploy"]),
        (False, {"backup": True}, ["gate", "lint", "dump", "globals", "manifest", "deploy"]),
        (True, {"dbname": "restored"}, ["gate", "lint", "deploy"]),  # the drill's copy: nothing to back up
        (True, {"backup": False}, "UsageError"),
    ],
)
def test_migrate_steps_compose_the_backup_on_protected_envs(tmp_path: Path, protected, arguments, expected):
    from ops.errors import UsageError
    from runbooks.migrate import build, migrate_steps

    env = environment(tmp_path, {"repository": "."}, protected=protected,
                      backups={"provider": "local", "path": "b", "bucket": "backups"})
    if expected == "UsageError":
        with pytest.raises(UsageError, match="always takes a backup"):
            migrate_steps(env, **arguments)
        return
    assert [step.name for step in migrate_steps(env, **arguments)] == expected
    runbook = build(env, **arguments)
    assert [step.name for step in runbook.steps] == expected
    if "dump" in expected and "dbname" not in arguments:
        assert runbook.arguments["backup_id"]  # journaled, so a resumed run finishes the same backup
        assert "pre-migration backup" in runbook.steps[2].title


# --- lock waits and drift (pure parts) -------------------------------------------------------------


def test_lock_policy_backs_off_from_the_timeout_and_sets_the_session():
    policy = LockPolicy(timeout=5, retries=3)
    assert policy.attempts == 4 and [policy.backoff(n) for n in (1, 2, 3)] == [5, 10, 20]
    assert policy.session_settings() == ["SET lock_timeout = 5000", "SET statement_timeout = 0"]
    assert LockPolicy(timeout=0).backoff(1) == 0.1  # no timeout (wait forever): still a short pause


def test_tables_named_reads_the_parse_trees():
    sql = ('-- ALTER TABLE "Comment" in a comment\nALTER TABLE "public"."Brand" ADD COLUMN "x" TEXT;\n'
           "INSERT INTO \"Image\" (\"alt\") VALUES ('UPDATE \"Literal\" SET x = 1');\n")
    assert tables_named(sql) == ["Brand", "Image"]


@pytest.mark.parametrize(("live", "built", "expected"), [
    ({("table", '"A"'): "table"}, {("table", '"A"'): "table"}, []),
    ({("column", '"A".x'): "text"}, {}, ['column "A".x: in the database only (text)']),
    ({}, {("index", '"A_x_idx"'): "CREATE INDEX …"},
     ['index "A_x_idx": missing from the database (the migrations build: CREATE INDEX …)']),
    ({("enum", '"Role"'): "'A', 'B'", ("table", '"A"'): "table"},
     {("enum", '"Role"'): "'A'", ("table", '"A"'): "table"},
     ["enum \"Role\" differs: the database has 'A', 'B'; the migrations build 'A'"]),
    ({("constraint", "c"): "x", ("table", "t"): "table"}, {}, ['table t: in the database only (table)',
                                                               "constraint c: in the database only (x)"]),
])
def test_drift_compares_descriptions_tables_first(live, built, expected):
    assert [str(difference) for difference in compare(live, built)] == expected


def test_scratch_url_keeps_the_prisma_schema():
    url = with_schema(Secret("postgresql://u:p@h:5432/db__drift_1?sslmode=require&schema=other"), "tenant")
    assert url == "postgresql://u:p@h:5432/db__drift_1?sslmode=require&schema=tenant"


PRISMA_MODELS = """\
// model Ghost { id Int @id }
model User {
  id        String  @id
  mail      String  @unique @map("email")
  brand     Brand?  @relation(fields: [brandId], references: [id])
  brandId   Int?
  @@map("users")
}

model Brand {
  id    Int    @id
  users User[]
}
"""


def test_a_release_schema_references_mapped_tables_and_columns_but_not_relations():
    used = {(reference.table, reference.column): reference.where for reference in references(PRISMA_MODELS)}
    assert used == {("users", None): "model User", ("users", "id"): "model User, field id",
                    ("users", "email"): "model User, field mail", ("users", "brandId"): "model User, field brandId",
                    ("Brand", None): "model Brand", ("Brand", "id"): "model Brand, field id"}


def test_removals_are_drops_and_renames_of_tables_and_columns():
    sql = ('DROP TABLE "public"."Brand";\nALTER TABLE "users" ADD COLUMN "x" TEXT,\n  DROP COLUMN "email";\n'
           'ALTER TABLE "users" RENAME COLUMN "brandId" TO "b";\nALTER TABLE "Old" RENAME TO "New";\n'
           "INSERT INTO t VALUES ('DROP TABLE \"users\"');\n")
    (migration,) = local("001_init")
    found = removals([LocalMigration("m", "", sql, migration.path)])
    assert [str(removal) for removal in found] == [
        'm/migration.sql:1 drops table "Brand"', 'm/migration.sql:3 drops column "users"."email"',
        'm/migration.sql:4 renames column "users"."brandId"', 'm/migration.sql:5 renames table "Old"']
    assert [(removal.what, reference.where) for removal, reference in conflicts(found, PRISMA_MODELS)] == [
        ('table "Brand"', "model Brand"), ('column "users"."email"', "model User, field mail"),
        ('column "users"."brandId"', "model User, field brandId")]
