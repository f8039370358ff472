"""A `database.provider: neon` environment through the real CLI against the fake Neon API, whose branches are
real databases of the session's PostgreSQL server: the DR drill into a fresh branch (the dump restored into it,
or the branch itself with --provider-pitr), the history window refused, no secret in any output."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from ops.demo.seed import MIGRATIONS_DIR, insert_demo_data
from tests.cli import Opsbook
from tests.fixtures.postgres import row_counts
from tests.fixtures.secrets import assert_no_secret

STEPS = ("branch", "restore", "migrations", "staging", "images", "rto", "rpo", "cleanup")


@pytest.fixture(scope="module")
def neon_setup(neon_api: Any, postgres_server: Any, s3_server: Any,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ops.migrations import apply_pending

    root = tmp_path_factory.mktemp("neon")
    workspace = Opsbook(root / "workspace")
    workspace.root.mkdir()
    repository = root / "repository"
    shutil.copytree(MIGRATIONS_DIR, repository / "prisma" / "migrations")
    project = neon_api.new_project()
    main_url = neon_api.url(project, project.main)
    apply_pending(main_url.reveal(), MIGRATIONS_DIR)
    with psycopg.connect(main_url.reveal(), autocommit=True) as connection:
        insert_demo_data(connection)
    buckets = {name: s3_server.make_bucket().bucket for name in ("prod", "prod-backups")}
    workspace.environ.update({"NEON_DB": main_url.reveal(), "NEON_API_KEY": project.api_key.reveal(),
                              "S3_ACCESS_KEY_ID": s3_server.access_key_id,
                              "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key.reveal()})

    def storage(bucket: str, **extra: Any) -> dict[str, Any]:
        return {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket,
                "access_key_id": "${env:S3_ACCESS_KEY_ID}", "secret_access_key": "${env:S3_SECRET_ACCESS_KEY}",
                **extra}

    inventory = {"project": "neontest", "default_env": "prod", "envs": {"prod": {
        "protected": True,
        "database": {"provider": "neon", "url": "${env:NEON_DB}", "project_id": project.id,
                     "api_key": "${env:NEON_API_KEY}", "api_base": neon_api.base_url, "branch": "main"},
        "storage": storage(buckets["prod"]), "backups": storage(buckets["prod-backups"], prefix="prod/"),
        "targets": {"rpo_hours": 24, "rto_minutes": 10},
        "drill": {"target": "neon-branch"},
        "app": {"repository": str(repository), "migrations": {"engine": "native", "dir": "prisma/migrations"}},
    }}}
    workspace.write_inventory(inventory)
    made = workspace.run("backup", "--env", "prod", "--confirm", "prod", "--json")
    assert made.exit_code == 0, made
    yield {"workspace": workspace, "project": project, "inventory": inventory, "storage": storage,
           "backup": made.json()["backup"], "main_url": main_url,
           "secrets": [project.api_key.reveal(), project.password.reveal(), postgres_server.password.reveal(),
                       s3_server.secret_access_key.reveal()]}


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {step["name"]: step["status"] for step in report["steps"]}


def test_the_drill_restores_the_backup_into_a_fresh_branch_and_deletes_it(neon_setup, neon_api):
    workspace, project = neon_setup["workspace"], neon_setup["project"]
    before = neon_api.databases()
    planned = workspace.run("drill", "--env", "prod", "--dry-run")
    assert planned.exit_code == 0, planned
    assert "would create Neon branch drill-prod-" in planned.stderr
    assert not any(call.startswith("POST") for call in neon_api.calls(project))

    result = workspace.run("drill", "--env", "prod", "--json")
    assert result.exit_code == 0, result
    report = result.json()["drill"]
    assert report["passed"] is True and report["target_env"] == "prod-neon-branch"
    assert statuses(report) == {**{name: "passed" for name in STEPS}, "staging": "not applicable"}
    assert report["backup_id"] == neon_setup["backup"]["backup_id"]
    details = {step["name"]: step["detail"] for step in report["steps"]}
    assert "rows as in the manifest" in details["restore"]
    assert details["cleanup"].startswith("deleted branch drill-prod-")
    assert neon_api.calls(project).count("POST /branches") == 1
    assert list(project.branches.values()) == [project.main]  # the drill's branch is gone
    assert neon_api.databases() == before  # its database too, and no scratch copy left
    assert_no_secret(workspace, *neon_setup["secrets"])  # outputs, journals, reports


def test_provider_pitr_takes_the_branch_at_the_backups_time_as_the_restore(neon_setup, neon_api):
    workspace, project = neon_setup["workspace"], neon_setup["project"]
    expected = row_counts(neon_setup["main_url"])
    # What the backup holds is the branch's state at its time; later writes must not be in the branch.
    neon_api.snapshot(project, project.main, datetime.now(UTC) - timedelta(hours=1))  # unchanged since then
    neon_api.execute(project, project.main,
                     """INSERT INTO "Brand" (slug, name, "updatedAt") VALUES ('late', 'after the backup', now())""")
    try:
        result = workspace.run("drill", "--env", "prod", "--provider-pitr", "--keep", "--json")
        assert result.exit_code == 0, result
        report = result.json()["drill"]
        assert statuses(report)["restore"] == "passed", report
        details = {step["name"]: step["detail"] for step in report["steps"]}
        assert "as in its manifest" in details["restore"] and "kept branch" in details["cleanup"]
        [kept] = [b for b in project.branches.values() if not b.primary]
        assert row_counts(neon_api.url(project, kept)) == expected
        assert_no_secret(workspace, *neon_setup["secrets"])
    finally:
        for branch in [b for b in project.branches.values() if not b.primary]:
            neon_api.handle("DELETE", f"/api/v2/projects/{project.id}/branches/{branch.id}",
                            {"Authorization": f"Bearer {project.api_key.reveal()}"}, b"")
        project.main.snapshots.clear()


def test_a_backup_outside_the_history_window_fails_the_branch_check_and_creates_nothing(neon_setup, neon_api):
    workspace, project = neon_setup["workspace"], neon_setup["project"]
    calls = len(neon_api.calls(project))
    retention, project.history_retention_seconds = project.history_retention_seconds, 0
    try:
        result = workspace.run("drill", "--env", "prod", "--json")
    finally:
        project.history_retention_seconds = retention
    assert result.exit_code == 3, result
    report = json.loads(result.stdout)["drill"]
    assert statuses(report)["branch"] == "failed" and statuses(report)["restore"] == "skipped"
    assert statuses(report)["cleanup"] == "not applicable"
    assert "outside Neon project" in {s["name"]: s["detail"] for s in report["steps"]}["branch"]
    assert not any(call == "POST /branches" for call in neon_api.calls(project)[calls:])
    assert_no_secret(workspace, *neon_setup["secrets"])


def brands(url: Any) -> int:
    with psycopg.connect(url.reveal()) as connection:
        return connection.execute('SELECT count(*) FROM "Brand"').fetchone()[0]


def test_restore_to_time_outside_the_history_window_is_refused_before_anything(neon_setup, neon_api):
    workspace, project = neon_setup["workspace"], neon_setup["project"]
    calls = len(neon_api.calls(project))
    for extra in (["--dry-run"], ["--confirm", "prod"]):
        result = workspace.run("restore", "--env", "prod", "--to-time", "2020-01-01T00:00:00Z", *extra)
        assert result.exit_code == 3, result
        assert "2020-01-01T00:00:00Z is outside Neon project" in result.stderr
        assert "history_retention_seconds 86400" in result.stderr
    assert all(call.startswith("GET") for call in neon_api.calls(project)[calls:])
    not_a_time = workspace.run("restore", "--env", "prod", "--to-time", "yesterday-ish", "--dry-run")
    assert not_a_time.exit_code == 2 and "is not a time" in not_a_time.stderr
    assert_no_secret(workspace, *neon_setup["secrets"])


def test_restore_to_time_checks_a_branch_at_that_time_then_restores_keeping_the_current_state(neon_setup, neon_api):
    workspace, project, main_url = neon_setup["workspace"], neon_setup["project"], neon_setup["main_url"]
    moment = (datetime.now(UTC) - timedelta(minutes=10)).replace(microsecond=0)
    neon_api.snapshot(project, project.main, moment)
    then = brands(main_url)
    neon_api.execute(project, project.main,
                     """INSERT INTO "Brand" (slug, name, "updatedAt") VALUES ('later', 'after T', now())""")
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    unconfirmed = workspace.run("restore", "--env", "prod", "--to-time", stamp)
    assert unconfirmed.exit_code == 2, unconfirmed
    assert brands(main_url) == then + 1

    result = workspace.run("restore", "--env", "prod", "--to-time", stamp, "--confirm", "prod", "--json")
    assert result.exit_code == 0, result
    restored = result.json()["restored"]
    assert restored["to_time"] == stamp and restored["manifest"] == neon_setup["backup"]["backup_id"]
    assert brands(main_url) == then  # the URL is unchanged, the data is T's
    [preserved] = [b for b in project.branches.values() if b.name == restored["preserved"]]
    assert preserved.name.startswith("main-before-restore-") and brands(neon_api.url(project, preserved)) == then + 1
    assert not any(b.name.startswith("restore-check-") for b in project.branches.values())  # the scratch one went
    assert_no_secret(workspace, *neon_setup["secrets"])


def test_rotating_database_password_resets_it_through_the_api_and_stores_it(neon_setup, neon_api, postgres_server):
    from tests.fixtures.secrets import stored

    workspace = neon_setup["workspace"]
    project = neon_api.new_project(dbname="rot")
    old = project.password.reveal()
    inventory = json.loads(json.dumps(neon_setup["inventory"]))
    inventory["envs"]["rot"] = {
        "database": {"provider": "neon", "project_id": project.id, "api_key": "${env:ROT_NEON_KEY}",
                     "api_base": neon_api.base_url,
                     "url": f"postgresql://{project.role}@{postgres_server.host}:{postgres_server.port}/"
                            f"{project.main.database}"},
        "backups": neon_setup["storage"](neon_setup["inventory"]["envs"]["prod"]["backups"]["bucket"], prefix="rot/")}
    workspace.write_inventory(inventory)
    workspace.environ["ROT_NEON_KEY"] = project.api_key.reveal()
    try:
        refused = workspace.run("secrets.rotate", "--env", "prod", "--name", "DATABASE_PASSWORD", "--dry-run")
        assert refused.exit_code == 2 and "carries a password" in refused.stderr, refused
        planned = workspace.run("secrets.rotate", "--env", "rot", "--name", "DATABASE_PASSWORD", "--dry-run")
        assert planned.exit_code == 0 and "reset role" in planned.stderr, planned
        assert not any("reset_password" in call for call in neon_api.calls(project))

        result = workspace.run("secrets.rotate", "--env", "rot", "--name", "DATABASE_PASSWORD", "--json")
        assert result.exit_code == 0, result
        new = stored(workspace, "rot")["DATABASE_PASSWORD"]
        assert new == project.password.reveal() and new != old
        assert [c for c in neon_api.calls(project) if c.endswith("reset_password")] == \
            [f"POST /branches/{project.main.id}/roles/{project.role}/reset_password"]
        steps = {e["step"]: e["state"] for e in workspace.journal(result.json()["run_id"]) if e["event"] == "step"}
        assert steps["reset-password"] == "verified"  # verified by connecting with the stored new password
        for text in (result.stdout + result.stderr, planned.stdout + planned.stderr):
            assert_no_secret(text, new, old, project.api_key.reveal())
    finally:
        workspace.write_inventory(neon_setup["inventory"])


def test_health_checks_the_branch_and_both_endpoints(neon_setup):
    workspace, project = neon_setup["workspace"], neon_setup["project"]
    result = workspace.run("health", "--env", "prod", "--json")
    assert result.exit_code == 0, result
    assert "neon branch" in result.stdout and f"branch main ({project.main.id})" in result.stdout
    assert "database (direct)" in result.stdout
    inventory = json.loads(json.dumps(neon_setup["inventory"]))
    inventory["envs"]["prod"]["database"]["branch"] = "gone"
    workspace.write_inventory(inventory)
    try:
        missing = workspace.run("health", "--env", "prod")
    finally:
        workspace.write_inventory(neon_setup["inventory"])
    assert missing.exit_code == 3 and "has no branch 'gone'" in missing.output, missing
    assert_no_secret(workspace, *neon_setup["secrets"])


def test_provision_creates_the_branch_role_and_database_and_stores_the_urls(neon_setup, neon_api):
    from tests.fixtures.secrets import stored

    workspace = neon_setup["workspace"]
    project = neon_api.new_project(dbname="prov")
    role = f"shop_{project.id[5:]}"
    inventory = json.loads(json.dumps(neon_setup["inventory"]))
    bucket = inventory["envs"]["prod"]["backups"]["bucket"]
    fresh = {"database": {"provider": "neon", "project_id": project.id, "api_key": "${env:PROV_NEON_KEY}",
                          "api_base": neon_api.base_url, "branch": "staging", "role": role,
                          "name": f"shopdb_{project.id[5:]}"},
             "backups": neon_setup["storage"](bucket, prefix="fresh/"), "app": inventory["envs"]["prod"]["app"]}
    inventory["envs"]["fresh"] = fresh
    inventory["envs"]["guarded"] = {**json.loads(json.dumps(fresh)), "protected": True,
                                    "backups": neon_setup["storage"](bucket, prefix="guarded/")}
    workspace.write_inventory(inventory)
    workspace.environ["PROV_NEON_KEY"] = project.api_key.reveal()

    def changes() -> list[str]:
        return [call for call in neon_api.calls(project) if not call.startswith("GET")]

    try:
        planned = workspace.run("provision", "--env", "fresh", "--dry-run")
        assert planned.exit_code == 0, planned
        for said in ("create Neon branch staging", f"create role {role} on Neon branch staging",
                     f"create database shopdb_{project.id[5:]}", "store DATABASE_URL and DIRECT_URL"):
            assert said in planned.stderr, planned
        refused = workspace.run("provision", "--env", "guarded")
        assert refused.exit_code == 2 and "--confirm guarded" in refused.output, refused
        assert changes() == [] and [b.name for b in project.branches.values()] == ["main"]

        result = workspace.run("provision", "--env", "fresh", "--json")
        assert result.exit_code == 0, result.stderr
        branch = project.branch("staging")
        assert changes() == ["POST /branches", f"POST /branches/{branch.id}/roles",
                             f"POST /branches/{branch.id}/databases"]
        secrets = stored(workspace, "fresh")
        assert secrets["DATABASE_PASSWORD"] == project.role_passwords[role]
        pooled, direct = (urlsplit(secrets[name]) for name in ("DATABASE_URL", "DIRECT_URL"))
        assert pooled.hostname == neon_api.endpoint_host(branch, pooled=True) and pooled.password is None
        assert direct.hostname == neon_api.endpoint_host(branch, pooled=False) and direct.password is None
        assert pooled.username == direct.username == role
        # The migrations ran on the new database, as its owner, through the direct URL.
        assert branch.databases[fresh["database"]["name"]] == (fresh["database"]["name"], role)
        assert brands(neon_api.server.url(fresh["database"]["name"])) == 0

        again = workspace.run("provision", "--env", "fresh", "--json")
        assert again.exit_code == 0 and again.json()["status"] == "nothing to do", again.stderr
        assert "warning" not in again.stderr  # the stored URLs have sslmode, and pgbouncer=true on the pooler's
        assert len(changes()) == 3
        assert_no_secret(workspace, *neon_setup["secrets"], project.api_key.reveal(), secrets["DATABASE_PASSWORD"])
    finally:
        workspace.write_inventory(neon_setup["inventory"])


def test_the_app_gets_the_pooled_url_and_migrations_and_dumps_the_direct_one(neon_setup, neon_api, vercel_api,
                                                                            postgres_server):
    """database.url on Neon's pooler (`-pooler` host), no direct_url: the app's variables get the pooled URL
    (pgbouncer=true) and the direct one as DIRECT_URL; migrate and backup connect to the direct endpoint."""
    workspace = neon_setup["workspace"]
    project = neon_api.new_project(dbname="pool")
    pooler, direct = (neon_api.endpoint_host(project.main, pooled=pooled) for pooled in (True, False))
    app = vercel_api.new_project({}, deployments=0)
    inventory = json.loads(json.dumps(neon_setup["inventory"]))
    inventory["envs"]["pooled"] = {
        "database": {"provider": "neon", "url": "${env:POOLED_DB}", "project_id": project.id,
                     "api_key": "${env:POOLED_NEON_KEY}", "api_base": neon_api.base_url},
        "backups": neon_setup["storage"](inventory["envs"]["prod"]["backups"]["bucket"], prefix="pooled/"),
        "app": {**inventory["envs"]["prod"]["app"], "platform": "vercel",
                "vercel": {"project_id": app.id, "team_id": app.team_id, "token": "${env:POOLED_VERCEL_TOKEN}",
                           "api": vercel_api.base_url}}}
    workspace.write_inventory(inventory)
    workspace.environ.update({
        "POOLED_DB": f"postgresql://{project.role}:{project.password.reveal()}@{pooler}:{postgres_server.port}/"
                     f"{project.main.database}?sslmode=prefer&hostaddr={postgres_server.host}",
        "POOLED_NEON_KEY": project.api_key.reveal(), "POOLED_VERCEL_TOKEN": app.token})
    try:
        migrated = workspace.run("migrate", "--env", "pooled", "--json")
        assert migrated.exit_code == 0, migrated
        assert f"@{direct}:" in migrated.stderr and "-pooler" not in migrated.stderr, migrated.stderr
        assert brands(neon_api.url(project, project.main)) == 0  # the migrations really ran there

        dumped = workspace.run("backup", "--env", "pooled", "--json")
        assert dumped.exit_code == 0, dumped
        [dump] = [e["outputs"] for e in workspace.journal(dumped.json()["run_id"])
                  if e["event"] == "step" and e["state"] == "applied" and "target" in (e.get("outputs") or {})]
        assert dump["target"].startswith(f"{project.role}@{direct}:"), dump
        assert "-pooler" not in dumped.stderr

        pushed = workspace.run("deploy.push-env", "--env", "pooled", "--json")
        assert pushed.exit_code == 0, pushed
        variables = app.variables("production")
        app_url, direct_url = urlsplit(variables["DATABASE_URL"]), urlsplit(variables["DIRECT_URL"])
        assert app_url.hostname == pooler and "pgbouncer=true" in app_url.query
        assert direct_url.hostname == direct and "pgbouncer" not in direct_url.query
        assert_no_secret(workspace, *neon_setup["secrets"], project.password.reveal(), app.token)
    finally:
        workspace.write_inventory(neon_setup["inventory"])
