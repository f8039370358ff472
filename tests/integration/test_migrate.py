"""inv migrate.status / migrate / migrate.resolve through the real CLI, on real PostgreSQL, moto S3 and sshd."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from ops.migrations import PRISMA_ADVISORY_LOCK_KEY
from tests.cli import REPOSITORY, Opsbook, wait_for
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.shop import DEMO_MIGRATIONS

DEMO_NAMES = sorted(path.name for path in DEMO_MIGRATIONS.iterdir() if path.is_dir())


def add_migration(migrations: Path, name: str, sql: str) -> None:
    (migrations / name).mkdir()
    (migrations / name / "migration.sql").write_text(sql)


def applied_rows(url: str) -> list[tuple[str, bool, bool]]:
    with psycopg.connect(url) as connection:
        return connection.execute(
            "SELECT migration_name, finished_at IS NOT NULL, rolled_back_at IS NOT NULL"
            " FROM _prisma_migrations ORDER BY started_at, migration_name").fetchall()


def table_exists(url: str, name: str) -> bool:
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{name}"',)).fetchone()[0]


@pytest.fixture
def shop(opsbook: Opsbook, postgres_server: Any, s3_server: Any, tmp_path: Path) -> dict[str, Any]:
    """`staging` and protected `prod` on two fresh databases; migrations from a local checkout."""
    checkout = tmp_path / "app"
    migrations = Path(shutil.copytree(DEMO_MIGRATIONS, checkout / "prisma" / "migrations"))
    urls = {name: postgres_server.create_database() for name in ("staging", "prod")}
    bucket = s3_server.make_bucket().bucket
    opsbook.environ.update({"S3_ACCESS_KEY_ID": s3_server.access_key_id,
                            "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key.reveal(),
                            **{f"DB_URL_{name.upper()}": url.reveal() for name, url in urls.items()}})
    backups = {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket,
               "access_key_id": "${env:S3_ACCESS_KEY_ID}", "secret_access_key": "${env:S3_SECRET_ACCESS_KEY}"}
    envs = {name: {"database": {"url": f"${{env:DB_URL_{name.upper()}}}"},
                   "app": {"repository": str(checkout)},
                   "backups": {**backups, "prefix": f"{name}/"}} for name in urls}
    envs["prod"]["protected"] = True
    opsbook.write_inventory({"project": "migratetest", "default_env": "staging", "envs": envs})
    return {"migrations": migrations, "urls": {name: url.reveal() for name, url in urls.items()},
            "bucket": bucket, "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal()]}


def test_status_then_native_deploy_then_nothing_to_do(opsbook, shop):
    url = shop["urls"]["staging"]
    status = opsbook.run("migrate.status", "--json")
    assert status.exit_code == 3, status
    assert status.json()["pending"] == DEMO_NAMES and status.json()["up_to_date"] is False
    assert "4 pending migrations not yet applied" in status.stderr

    dry = opsbook.run("migrate", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "would apply 4 pending migration(s)" in dry.stderr
    assert not table_exists(url, "_prisma_migrations")  # a dry run changes nothing

    deployed = opsbook.run("migrate", "--json")
    assert deployed.exit_code == 0, deployed
    assert deployed.json()["applied"] == DEMO_NAMES and deployed.json()["backup_id"] is None
    assert [row[0] for row in applied_rows(url)] == DEMO_NAMES

    status = opsbook.run("migrate.status")
    assert status.exit_code == 0, status
    assert "up to date (4 migrations applied)" in status.stderr
    again = opsbook.run("migrate")
    assert again.exit_code == 0 and "nothing to do" in again.stderr, again
    assert_no_secret(opsbook, *shop["secrets"])


def test_failed_migration_blocks_deploys_until_resolved(opsbook, shop):
    url = shop["urls"]["staging"]
    add_migration(shop["migrations"], "20250201000000_bad", 'CREATE TABLE "Half" (id int);\nSELECT * FROM "Nope";\n')
    add_migration(shop["migrations"], "20250202000000_after", 'CREATE TABLE "After" (id int);\n')
    failed = opsbook.run("migrate")
    assert failed.exit_code == 1, failed
    assert "logs of 20250201000000_bad" in failed.stderr and "42P01" in failed.stderr  # the table's logs
    assert "migrate.resolve --name 20250201000000_bad --rolled-back" in failed.stderr
    assert ("20250201000000_bad", False, False) in applied_rows(url)
    assert not table_exists(url, "Half") and not table_exists(url, "After")

    status = opsbook.run("migrate.status", "--json")
    assert status.exit_code == 3 and status.json()["failed"] == ["20250201000000_bad"], status
    failed_entry = next(m for m in status.json()["migrations"] if m["status"] == "failed")
    assert "42P01" in failed_entry["logs"] and "logs of 20250201000000_bad" in status.stderr
    blocked = opsbook.run("migrate")
    assert blocked.exit_code == 3 and "P3009" in blocked.stderr, blocked
    assert len(applied_rows(url)) == len(DEMO_NAMES) + 1  # nothing was attempted

    (shop["migrations"] / "20250201000000_bad" / "migration.sql").write_text('CREATE TABLE "Half" (id int);\n')
    resolved = opsbook.run("migrate.resolve", "--name", "20250201000000_bad", "--rolled-back")
    assert resolved.exit_code == 0, resolved
    deployed = opsbook.run("migrate", "--json")
    assert deployed.exit_code == 0, deployed
    assert deployed.json()["applied"] == ["20250201000000_bad", "20250202000000_after"]
    assert [row for row in applied_rows(url) if row[0] == "20250201000000_bad"] == [
        ("20250201000000_bad", False, True), ("20250201000000_bad", True, False)]  # the resolved attempt is kept


def test_protected_env_backs_up_first_and_refuses_breaking_changes(opsbook, shop, s3_server):
    url = shop["urls"]["prod"]
    no_backup = opsbook.run("migrate", "--env", "prod", "--no-backup", "--confirm", "prod")
    assert no_backup.exit_code == 2 and "always takes a backup" in no_backup.stderr, no_backup
    add_migration(shop["migrations"], "20250301000000_drop", '-- users go\nALTER TABLE "User"\n'
                  '  ADD COLUMN "nickname" TEXT,\n  DROP COLUMN "email";\n')
    refused = opsbook.run("migrate", "--env", "prod", "--confirm", "prod")
    assert refused.exit_code == 3, refused
    assert "20250301000000_drop/migration.sql:4: drop-column" in refused.stderr
    assert "--allow-destructive" in refused.stderr
    unconfirmed = opsbook.run("migrate", "--env", "prod", "--allow-destructive")
    assert unconfirmed.exit_code == 2 and "--confirm prod" in unconfirmed.stderr, unconfirmed

    done = opsbook.run("migrate", "--env", "prod", "--allow-destructive", "--confirm", "prod", "--json")
    assert done.exit_code == 0, done
    backup_id = done.json()["backup_id"]
    manifest = json.loads(s3_server.client().get_object(
        Bucket=shop["bucket"], Key=f"prod/backups/{backup_id}/manifest.json")["Body"].read())
    assert manifest["tags"] == ["pre-migrate"]
    assert manifest["migrations"] == []  # taken before the migrations ran
    assert [row[0] for row in applied_rows(url)] == [*DEMO_NAMES, "20250301000000_drop"]
    # The same change on an unprotected environment is a warning only.
    staging = opsbook.run("migrate", "--env", "staging", "--json")
    assert staging.exit_code == 0 and "breaking change allowed here" in staging.stderr, staging
    assert staging.json()["backup_id"] is None
    assert_no_secret(opsbook, *shop["secrets"])


def test_concurrent_deploys_wait_on_prismas_advisory_lock(opsbook, shop, tmp_path):
    url = shop["urls"]["staging"]
    second = Opsbook(tmp_path / "second-operator", environ=dict(opsbook.environ))  # own state dir
    second.root.mkdir()
    # Without a backup bucket, so without a lease: with the same one, the second would exit 75 at once
    # (tests/integration/test_lease.py); here nothing but Prisma's lock keeps the two deploys apart.
    inventory = _yaml(opsbook.inventory)
    del inventory["envs"]["staging"]["backups"]
    second.write_inventory(inventory)

    def waiters(connection: psycopg.Connection) -> int:
        return connection.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.objid = %s AND NOT l.granted"
            " AND a.application_name LIKE 'opsbook run%%'", (PRISMA_ADVISORY_LOCK_KEY,)).fetchone()[0]

    with psycopg.connect(url, autocommit=True) as holder:  # a deploy by another tool is running
        holder.execute("SELECT pg_advisory_lock(%s)", (PRISMA_ADVISORY_LOCK_KEY,))
        processes = [workspace.start("migrate") for workspace in (opsbook, second)]
        # Within Prisma's 10 s lock timeout, which each deploy started counting when it began to wait.
        wait_for(lambda: waiters(holder) == 2, timeout=9, what="both deploys waiting in pg_locks")
        assert table_exists(url, "_prisma_migrations") is False
        holder.execute("SELECT pg_advisory_unlock(%s)", (PRISMA_ADVISORY_LOCK_KEY,))
        results = [workspace.collect(process) for workspace, process in zip((opsbook, second), processes,
                                                                               strict=True)]
    assert [result.exit_code for result in results] == [0, 0], results
    assert all("waiting for the Prisma migration lock" in result.stderr for result in results)
    assert [row[0] for row in applied_rows(url)] == DEMO_NAMES  # each applied exactly once


def test_command_engine_runs_on_the_first_host_with_the_direct_url(opsbook, shop, app_host_factory):
    (web1,) = app_host_factory(["web1"])
    shutil.copytree(shop["migrations"], web1.app_dir / "prisma" / "migrations")
    # Stands in for `npx prisma migrate deploy`: reads DATABASE_URL and the folder relative to app.dir.
    script = (f"import os, sys; sys.path.insert(0, {str(REPOSITORY)!r}); from pathlib import Path; "
              "from ops.migrations import apply_pending; "
              "print('applied', apply_pending(os.environ['DATABASE_URL'], Path('prisma/migrations')))")
    inventory = json.loads(json.dumps(_yaml(opsbook.inventory)))
    staging = inventory["envs"]["staging"]
    del staging["app"]["repository"]  # migrations are read from the host over SSH
    staging["hosts"] = [{"name": "web1", "address": "127.0.0.1", "port": web1.host.port, "user": web1.host.user,
                         "key_file": web1.host.key_filename}]
    staging["app"].update({"dir": str(web1.app_dir), "migrations": {
        "engine": "command", "command": f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"}})
    opsbook.write_inventory(inventory)

    status = opsbook.run("migrate.status", "--json")
    assert status.exit_code == 3 and status.json()["pending"] == DEMO_NAMES, status
    assert "host web1" in status.json()["source"]
    deployed = opsbook.run("migrate", "--json")
    assert deployed.exit_code == 0, deployed
    assert deployed.json()["applied"] == DEMO_NAMES and deployed.json()["engine"] == "command"
    assert "applied [" in deployed.stderr  # the command's own output is shown

    add_migration(web1.app_dir / "prisma" / "migrations", "20250401000000_bad", "SELECT * FROM nowhere;\n")
    failed = opsbook.run("migrate")
    assert failed.exit_code == 1, failed
    assert "exited with code 1 on host web1" in failed.stderr and "logs of 20250401000000_bad" in failed.stderr
    assert_no_secret(opsbook, *shop["secrets"])


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def set_lock_rows(opsbook: Opsbook, env: str, rows: int) -> None:
    """A low threshold in the inventory: a few thousand rows are "large" without making a large table."""
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"][env]["app"]["migrations"] = {"lock_rows": rows}
    opsbook.write_inventory(inventory)


def test_lint_judges_pending_migrations_by_live_table_sizes(opsbook, shop):
    url = shop["urls"]["staging"]
    assert opsbook.run("migrate", "--env", "staging").exit_code == 0
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute('INSERT INTO "Brand" ("slug", "name", "updatedAt") '
                           "SELECT 'b' || n, 'Brand ' || n, now() FROM generate_series(1, 3000) AS n")
        connection.execute('ANALYZE "Brand"')
    add_migration(shop["migrations"], "20250401000000_indexes",
                  '-- CreateIndex\nCREATE INDEX "Brand_name_idx" ON "Brand"("name");\n\n'
                  '-- CreateIndex\nCREATE INDEX "User_name_idx" ON "User"("name");\n')

    small = opsbook.run("migrate.lint", "--env", "staging", "--json")  # the default: 100 000 rows
    assert small.exit_code == 0, small
    assert [(f["line"], f["table"], f["severity"]) for f in small.json()["locks"]] == \
        [(2, "Brand", "warn"), (5, "User", "warn")]
    assert small.json()["migrations"] == ["20250401000000_indexes"] and small.json()["refusals"] == 0

    set_lock_rows(opsbook, "staging", 1000)
    large = opsbook.run("migrate.lint", "--env", "staging", "--json")
    assert large.exit_code == 3, large
    brand, user = large.json()["locks"]
    assert (brand["severity"], brand["size"].split(",")[0]) == ("refuse", "3000 rows")
    assert user["severity"] == "warn" and user["size"].startswith("rows unknown (never analysed), ")
    assert ('refused: 20250401000000_indexes/migration.sql:2: create-index: CREATE INDEX "Brand_name_idx" on '
            '"Brand" (3000 rows, ') in large.stderr
    assert "safe: CREATE INDEX CONCURRENTLY" in large.stderr
    assert [row[0] for row in applied_rows(url)] == DEMO_NAMES  # the lint applied nothing

    refused = opsbook.run("migrate", "--env", "staging")  # the deploy's own lint step, the same judgement
    assert refused.exit_code == 3 and "lock a large table" in refused.stderr, refused
    assert "--allow-locks" in refused.stderr and [row[0] for row in applied_rows(url)] == DEMO_NAMES
    allowed = opsbook.run("migrate", "--env", "staging", "--allow-locks", "--json")
    assert allowed.exit_code == 0 and allowed.json()["applied"] == ["20250401000000_indexes"], allowed
    assert "lock allowed here" in allowed.stderr
    done = opsbook.run("migrate.lint", "--env", "staging")
    assert done.exit_code == 0 and "0 pending migration(s)" in done.stderr, done
    assert_no_secret(opsbook, *shop["secrets"])


def test_lint_a_folder_without_an_environment(opsbook, tmp_path):
    migrations = Path(shutil.copytree(DEMO_MIGRATIONS, tmp_path / "migrations"))
    opsbook.inventory.unlink(missing_ok=True)  # an app's CI has no inventory
    whole = opsbook.run("migrate.lint", "--path", str(migrations), "--json")
    assert whole.exit_code == 3, whole  # the demo indexes a table an earlier migration created
    locks = whole.json()["locks"]
    assert [(f["migration"], f["line"], f["rule"], f["severity"]) for f in locks] == [
        ("20250122110000_users", 26, "create-index", "refuse"),
        ("20250122110000_users", 32, "constraint-validates", "refuse")]
    assert {f["size"] for f in locks} == {"size unknown: no database to ask"}

    since = opsbook.run("migrate.lint", "--path", str(migrations), "--since", DEMO_NAMES[-1])
    assert since.exit_code == 0 and "no refusal" in since.stderr, since
    add_migration(migrations, "20250501000000_next", '-- AddForeignKey\nALTER TABLE "Image" ADD CONSTRAINT '
                  '"Image_x_fkey" FOREIGN KEY ("x") REFERENCES "Brand"("id") NOT VALID;\n'
                  "INSERT INTO \"Image\" (\"alt\") VALUES ('DROP TABLE \"Brand\"; VACUUM FULL');\n")
    safe = opsbook.run("migrate.lint", "--path", str(migrations), "--since", DEMO_NAMES[-1], "--json")
    assert safe.exit_code == 0 and safe.json()["migrations"] == ["20250501000000_next"], safe
    add_migration(migrations, "20250502000000_typo", 'ALTER TABLE "Image" DROP COLUMN "alt";\nALTER TABEL "x";\n')
    refused = opsbook.run("migrate.lint", "--path", str(migrations), "--since", DEMO_NAMES[-1], "--json")
    assert refused.exit_code == 3, refused
    assert [(f["line"], f["rule"]) for f in refused.json()["breaking"]] == [(1, "drop-column"), (2, "cannot-parse")]
    allowed = opsbook.run("migrate.lint", "--path", str(migrations), "--since", DEMO_NAMES[-1],
                          "--allow-destructive")
    assert allowed.exit_code == 3 and "cannot parse" in allowed.stderr, allowed  # never passed
    both = opsbook.run("migrate.lint", "--path", str(migrations), "--env", "staging")
    assert both.exit_code == 2, both


CI_MARKER = "<!-- migrate-lint-ci:"


def readme_ci_lines() -> str:
    """The indented shell lines after the marker in the README's "Linting migrations"."""
    text = (REPOSITORY / "README.md").read_text()
    assert text.count(CI_MARKER) == 1
    lines = []
    for line in text.split(CI_MARKER, 1)[1].split("-->", 1)[1].splitlines()[1:]:
        if not line.startswith("    "):
            break
        lines.append(line[4:])
    assert any(line.startswith("opsbook migrate.lint") for line in lines), lines
    return "\n".join(lines) + "\n"


def test_the_readme_ci_lines_lint_what_a_branch_adds(opsbook, tmp_path):
    origin, checkout = tmp_path / "origin", tmp_path / "app"
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "-c", "init.defaultBranch=main"]

    def run(*args: str, cwd: Path = checkout) -> None:
        subprocess.run([*git, *args], cwd=cwd, check=True, capture_output=True)

    shutil.copytree(DEMO_MIGRATIONS, origin / "prisma" / "migrations")
    run("init", "-q", cwd=origin)
    run("add", ".", cwd=origin)
    run("commit", "-qm", "main", cwd=origin)
    run("clone", "-q", str(origin), str(checkout), cwd=tmp_path)
    run("checkout", "-qb", "feature")
    add_migration(checkout / "prisma" / "migrations", "20250601000000_index",
                  '-- CreateIndex\nCREATE INDEX "Image_alt_idx" ON "Image"("alt");\n')
    environment = {**opsbook.process_environment(), "PYTHONPATH": str(REPOSITORY),
                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    environment.pop("OPS_INVENTORY")  # CI has none

    def lint() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-euc", readme_ci_lines()], cwd=checkout, env=environment,
                              capture_output=True, text=True, timeout=120)

    refused = lint()
    assert refused.returncode == 3, refused.stderr
    assert "20250601000000_index/migration.sql:2: create-index" in refused.stderr
    assert "20250122110000_users" not in refused.stderr  # what main already has is not judged again
    (checkout / "prisma" / "migrations" / "20250601000000_index" / "migration.sql").write_text(
        '-- CreateIndex\nCREATE INDEX CONCURRENTLY "Image_alt_idx" ON "Image"("alt");\n')
    clean = lint()
    assert clean.returncode == 0 and "no refusal" in clean.stderr, clean.stderr


def set_lock_wait(opsbook: Opsbook, env: str, seconds: float, retries: int) -> None:
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"][env]["app"]["migrations"] = {"lock_timeout_seconds": seconds, "lock_retries": retries}
    opsbook.write_inventory(inventory)


def migration_events(opsbook: Opsbook) -> list[tuple[str, str]]:
    return [(entry["kind"], entry["detail"]) for entry in opsbook.journal(opsbook.latest_run_id())
            if entry["event"] == "migration"]


def test_a_migration_gives_up_a_held_lock_and_retries_until_it_is_released(opsbook, shop):
    url = shop["urls"]["staging"]
    assert opsbook.run("migrate").exit_code == 0
    set_lock_wait(opsbook, "staging", 0.5, 2)
    add_migration(shop["migrations"], "20250701000000_motto", 'ALTER TABLE "Brand" ADD COLUMN "motto" TEXT;\n')

    with psycopg.connect(url, autocommit=True) as holder:  # held throughout: every attempt gives up
        holder.execute("SET application_name = 'nightly export'")
        holder.execute("BEGIN")
        holder.execute('LOCK TABLE "Brand" IN ACCESS EXCLUSIVE MODE')
        failed = opsbook.run("migrate")
        holder_pid = holder.info.backend_pid
    assert failed.exit_code == 1, failed
    assert "could not take its locks" in failed.stderr and "in 3 attempt(s) of 0.5 s" in failed.stderr
    assert f"pid {holder_pid} (nightly export" in failed.stderr and "AccessExclusiveLock" in failed.stderr
    assert "pending again" in failed.stderr
    assert [kind for kind, _ in migration_events(opsbook)] == ["started", "lock-timeout"] * 3
    assert ("20250701000000_motto", True, False) not in applied_rows(url)  # never recorded applied
    status = opsbook.run("migrate.status", "--json")
    assert status.exit_code == 3 and status.json()["pending"] == ["20250701000000_motto"], status

    def migration_waiting(connection: psycopg.Connection) -> bool:
        return connection.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE NOT l.granted"
            " AND l.relation = '\"Brand\"'::regclass AND a.application_name LIKE 'opsbook run%%'").fetchone()[0] > 0

    with psycopg.connect(url, autocommit=True) as holder, psycopg.connect(url, autocommit=True) as reader:
        holder.execute("BEGIN")
        holder.execute('SELECT count(*) FROM "Brand"')  # a long read: ACCESS SHARE until it ends
        process = opsbook.start("migrate")
        # the reader asks: the holder's transaction sees pg_stat_activity as it was when it began
        wait_for(lambda: migration_waiting(reader), timeout=20, what="the migration waiting for its lock")
        # Readers queue behind the waiting ALTER TABLE, but only until its lock_timeout: this one gets through.
        reader.execute("SET statement_timeout = '3s'")
        assert reader.execute('SELECT count(*) FROM "Brand"').fetchone()[0] == 0
        holder.execute("COMMIT")  # the read ends during the pause: the next attempt gets the lock
        done = opsbook.collect(process)
    assert done.exit_code == 0, done
    assert "lock timeout: 20250701000000_motto: attempt 1 of 3 gave up waiting 0.5 s" in done.stderr
    kinds = [kind for kind, _ in migration_events(opsbook)]
    assert kinds[0] == "started" and kinds[1] == "lock-timeout" and kinds[-1] == "applied", kinds
    assert ("20250701000000_motto", True, False) in applied_rows(url)
    assert opsbook.run("migrate.status").exit_code == 0
    assert_no_secret(opsbook, *shop["secrets"])


def scratch_databases(url: str) -> list[str]:
    with psycopg.connect(url) as connection:
        return [row[0] for row in connection.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE '%\\_\\_drift\\_%'").fetchall()]


def test_drift_lists_hand_made_changes_until_a_migration_matches_them(opsbook, shop):
    url = shop["urls"]["staging"]
    assert opsbook.run("migrate").exit_code == 0
    clean = opsbook.run("migrate.drift", "--json")
    assert clean.exit_code == 0 and clean.json()["drift"] == [], clean
    assert "no drift" in clean.stderr

    with psycopg.connect(url, autocommit=True) as connection:  # a hot fix made by hand
        connection.execute('ALTER TABLE "Brand" ADD COLUMN "motto" TEXT NOT NULL DEFAULT \'\'')
        connection.execute('CREATE INDEX "Brand_motto_idx" ON "Brand"("motto")')
        connection.execute('ALTER TABLE "Image" ALTER COLUMN "alt" TYPE VARCHAR(500)')
        connection.execute("ALTER TYPE \"Role\" ADD VALUE 'GUEST'")
        connection.execute('DROP TABLE "NavigationDraft"')
    drifted = opsbook.run("migrate.drift", "--json")
    assert drifted.exit_code == 3, drifted
    found = {(item["kind"], item["name"]): item for item in drifted.json()["drift"]}
    assert found[("column", '"Brand".motto')]["database"] == "text NOT NULL DEFAULT ''::text"
    assert found[("column", '"Brand".motto')]["migrations"] is None
    assert found[("index", '"Brand_motto_idx"')]["migrations"] is None
    alt = found[("column", '"Image".alt')]
    assert alt["database"].startswith("character varying(500)") and alt["migrations"].startswith("text"), alt
    assert found[("enum", '"Role"')]["database"] == "'ADMIN', 'EDITOR', 'VIEWER', 'GUEST'"
    assert found[("table", '"NavigationDraft"')] == {
        "kind": "table", "name": '"NavigationDraft"', "database": None, "migrations": "table",
        "text": 'table "NavigationDraft": missing from the database (the migrations build: table)'}
    # its columns, indexes and constraints are listed too
    assert ("column", '"NavigationDraft".id') in found
    assert ("constraint", '"NavigationDraft"."NavigationDraft_pkey"') in found
    assert 'drift: column "Brand".motto: in the database only (text NOT NULL' in drifted.stderr
    assert 'drift: table "NavigationDraft": missing from the database' in drifted.stderr
    linted = opsbook.run("migrate.lint", "--json")  # the same comparison, as warnings beside the lints
    assert linted.exit_code == 0, linted
    assert ("column", '"Brand".motto') in {(item["kind"], item["name"]) for item in linted.json()["drift"]}
    assert 'drift: column "Brand".motto: in the database only' in linted.stderr
    assert scratch_databases(url) == []  # dropped again

    add_migration(shop["migrations"], "20250801000000_hotfix",
                  'ALTER TABLE "Brand" ADD COLUMN "motto" TEXT NOT NULL DEFAULT \'\';\n'
                  'CREATE INDEX "Brand_motto_idx" ON "Brand"("motto");\n'
                  'ALTER TABLE "Image" ALTER COLUMN "alt" TYPE VARCHAR(500);\n'
                  "ALTER TYPE \"Role\" ADD VALUE 'GUEST';\n"
                  'DROP TABLE "NavigationDraft";\n')
    assert opsbook.run("migrate.resolve", "--name", "20250801000000_hotfix", "--applied").exit_code == 0
    matched = opsbook.run("migrate.drift", "--json")
    assert matched.exit_code == 0 and matched.json()["drift"] == [], matched
    assert scratch_databases(url) == []
    assert_no_secret(opsbook, *shop["secrets"])


DEMO_SCHEMA = DEMO_MIGRATIONS.parent / "schema.prisma"


def test_the_contract_gate_refuses_a_drop_while_a_hosts_current_release_uses_the_column(
        opsbook, shop, app_host_factory):
    url = shop["urls"]["staging"]
    (web1,) = app_host_factory(["web1"])
    schema = DEMO_SCHEMA.read_text()
    assert "  lastLoginAt  DateTime?\n" in schema
    releases = {"20250101000000": schema.replace("  lastLoginAt  DateTime?\n",
                                                 '  lastSeen     DateTime? @map("lastLoginAt") // renamed\n'),
                "20250201000000": schema.replace("  lastLoginAt  DateTime?\n", "")}
    for release, text in releases.items():
        (web1.app_dir / "releases" / release / "prisma").mkdir(parents=True)
        (web1.app_dir / "releases" / release / "prisma" / "schema.prisma").write_text(text)
    (web1.app_dir / "current").symlink_to("releases/20250101000000")
    inventory = _yaml(opsbook.inventory)
    inventory["envs"]["staging"]["hosts"] = [{"name": "web1", "address": "127.0.0.1", "port": web1.host.port,
                                              "user": web1.host.user, "key_file": web1.host.key_filename}]
    inventory["envs"]["staging"]["app"]["dir"] = str(web1.app_dir)  # migrations still from the checkout
    opsbook.write_inventory(inventory)
    assert opsbook.run("migrate").exit_code == 0
    add_migration(shop["migrations"], "20250901000000_contract",
                  '-- the last release stopped using it\nALTER TABLE "User" DROP COLUMN "lastLoginAt";\n')

    refused = opsbook.run("migrate")
    assert refused.exit_code == 3, refused
    assert ('20250901000000_contract/migration.sql:2 drops column "User"."lastLoginAt" while release '
            "20250101000000 on host web1 uses it (prisma/schema.prisma: model User, field lastSeen)") in refused.stderr
    assert "expand/contract" in refused.stderr
    assert opsbook.run("migrate", "--allow-destructive").exit_code == 3  # the release would break all the same
    linted = opsbook.run("migrate.lint", "--json")  # the lint before a deploy says so too
    assert linted.exit_code == 3, linted
    [in_use] = linted.json()["contract"]
    assert in_use.startswith('20250901000000_contract/migration.sql:2 drops column "User"."lastLoginAt" while '
                             "release 20250101000000 on host web1 uses it"), in_use
    assert "20250901000000_contract" not in [row[0] for row in applied_rows(url)]

    (web1.app_dir / "current").unlink()  # the rollout of a release that no longer uses it
    (web1.app_dir / "current").symlink_to("releases/20250201000000")
    linted = opsbook.run("migrate.lint", "--json")
    assert linted.exit_code == 0 and linted.json()["contract"] == [], linted
    allowed = opsbook.run("migrate", "--json")
    assert allowed.exit_code == 0 and allowed.json()["applied"] == ["20250901000000_contract"], allowed
    assert_no_secret(opsbook, *shop["secrets"])
