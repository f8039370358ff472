"""The app on Vercel (app.platform: vercel): push-env, restart, rollback and incident.rollback against the fake
Vercel API, whose deployments are the test app started with the project's variables and PostgreSQL behind it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from ops.secrets import Secret
from tests.cli import Opsbook, http_status
from tests.fixtures.s3 import iam_keys, refused
from tests.fixtures.secrets import assert_no_secret, stored
from tests.fixtures.vercel import FakeProject, FakeVercel


@pytest.fixture
def vercel_env(opsbook: Opsbook, postgres_server: Any, vercel_api: FakeVercel) -> Callable[..., dict[str, Any]]:
    """make(protected=False) -> `prod` on a fake Vercel project already serving the app, and its secrets."""

    def make(*, protected: bool = False, pushed: bool = True) -> dict[str, Any]:
        database_url = postgres_server.create_database(f"vercel_{uuid.uuid4().hex[:8]}")
        initial = {"DATABASE_URL": database_url.reveal(), "NODE_ENV": "production", "STALE_FLAG": "1"}
        project = vercel_api.new_project(initial if pushed else {"DATABASE_URL": database_url.reveal()})
        opsbook.environ.update({"APP_DATABASE_URL": database_url.reveal(), "VERCEL_TOKEN": project.token})
        prod = {
            "protected": protected,
            "database": {"url": "${env:APP_DATABASE_URL}"},
            "app": {"platform": "vercel", "health_timeout": 10,
                    "vercel": {"project_id": project.id, "team_id": project.team_id, "token": "${env:VERCEL_TOKEN}",
                               "api": vercel_api.base_url, "build_timeout": 20},
                    "health_url": vercel_api.url(project, "/api/health"),
                    "ready_url": vercel_api.url(project, "/api/ready"),
                    "env": {"NODE_ENV": "production", "FEATURE_LABEL": "blue", "API_TOKEN": "tok-very-secret-1"}},
        }
        opsbook.write_inventory({"project": "verceltest", "default_env": "prod", "envs": {"prod": prod}})
        return {"project": project, "database_url": database_url,
                "secrets": [project.token, postgres_server.password.reveal(), "tok-very-secret-1"]}

    return make


def serving_variables(project: FakeProject) -> dict[str, str]:
    return project.variables("production")


def test_push_env_sets_the_project_variables_once_with_a_masked_plan(
        opsbook: Opsbook, vercel_env: Callable[..., dict[str, Any]]) -> None:
    setup = vercel_env()
    project: FakeProject = setup["project"]
    before = serving_variables(project)

    dry = opsbook.run("deploy.push-env", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "2 to create, 0 to update, 1 to remove" in dry.stderr, dry
    assert "+ API_TOKEN=***" in dry.stderr and "+ FEATURE_LABEL=blue" in dry.stderr and "- STALE_FLAG" in dry.stderr
    assert serving_variables(project) == before

    first = opsbook.run("deploy.push-env", "--json")
    assert first.exit_code == 0, first
    assert first.json()["status"] == "succeeded"
    variables = serving_variables(project)
    assert variables["FEATURE_LABEL"] == "blue" and variables["API_TOKEN"] == "tok-very-secret-1"
    assert "STALE_FLAG" not in variables
    assert variables["DATABASE_URL"].startswith(setup["database_url"].reveal().split("?")[0])
    assert all(v["type"] == "encrypted" and v["target"] == ["production"] for v in project.env.values())

    again = opsbook.run("deploy.push-env", "--dry-run")
    assert again.exit_code == 0, again
    assert "to create" not in again.stderr, again
    calls = len(project.calls)
    second = opsbook.run("deploy.push-env", "--json")
    assert second.exit_code == 0, second
    assert not [c for c in project.calls[calls:] if not c.startswith("GET ")], "a second run changed something"
    assert "deploy.restart" in second.stderr  # the variables take effect in a new deployment

    assert_no_secret(opsbook, *setup["secrets"])


def test_push_env_with_restart_redeploys_with_the_new_variables_and_checks_health(
        opsbook: Opsbook, vercel_env: Callable[..., dict[str, Any]]) -> None:
    setup = vercel_env(protected=True)
    project: FakeProject = setup["project"]
    serving = project.production

    refused = opsbook.run("deploy.push-env", "--restart", stdin="")
    assert refused.exit_code == 2, refused
    assert len(project.deployments) == 2 and project.production == serving

    result = opsbook.run("deploy.push-env", "--restart", "--confirm", "prod", "--json")
    assert result.exit_code == 0, result
    assert project.production != serving and len(project.deployments) == 3
    assert project.serving() is not None and project.serving().state == "READY"

    health = opsbook.run("health")
    assert health.exit_code == 0, health
    assert "vercel deployment" in health.stdout + health.stderr
    preflight = opsbook.run("preflight", "--json")
    checks = {check["name"]: check for check in preflight.json()["checks"]}
    assert checks["vercel deployment"]["status"] == "pass", checks
    assert checks["app health"]["status"] == "pass" and checks["app ready"]["status"] == "pass", checks
    assert_no_secret(opsbook, *setup["secrets"])


def test_a_redeploy_that_fails_to_become_ready_stops_the_run_and_says_so(
        opsbook: Opsbook, vercel_env: Callable[..., dict[str, Any]]) -> None:
    setup = vercel_env(protected=True)
    project: FakeProject = setup["project"]
    serving = project.production
    project.fail_builds = True

    unconfirmed = opsbook.run("deploy.restart", stdin="")
    assert unconfirmed.exit_code == 2, unconfirmed
    assert len(project.deployments) == 2

    failed = opsbook.run("deploy.restart", "--confirm", "prod")
    assert failed.exit_code == 1, failed
    assert "failed to become ready (ERROR)" in failed.stderr, failed
    assert "Traceback" not in failed.stderr
    assert project.production == serving  # production still serves the previous deployment
    assert_no_secret(opsbook, *setup["secrets"])


def test_rollback_promotes_the_previous_ready_deployment_after_confirmation(
        opsbook: Opsbook, vercel_env: Callable[..., dict[str, Any]], vercel_api: FakeVercel) -> None:
    setup = vercel_env(protected=True)
    project: FakeProject = setup["project"]
    project.page_size = 1  # the listing pages through every READY deployment
    older, newest = project.deployments[0].id, project.deployments[1].id
    assert project.production == newest

    dry = opsbook.run("deploy.rollback", "--dry-run")
    assert dry.exit_code == 0, dry
    assert f"promote {older}" in dry.stderr and f"replacing {newest}" in dry.stderr, dry

    unconfirmed = opsbook.run("deploy.rollback", stdin="")
    assert unconfirmed.exit_code == 2, unconfirmed
    assert project.production == newest

    rolled = opsbook.run("deploy.rollback", "--confirm", "prod", "--json")
    assert rolled.exit_code == 0, rolled
    assert project.production == older
    assert "POST /v10/projects/" + project.id + "/promote/" + older in project.calls

    forward = opsbook.run("deploy.rollback", "--release", newest, "--confirm", "prod")
    assert forward.exit_code == 0, forward
    assert project.production == newest
    unknown = opsbook.run("deploy.rollback", "--release", "dpl_nothing", "--confirm", "prod")
    assert unknown.exit_code == 3 and "dpl_nothing is not a READY production deployment" in unknown.stderr, unknown
    assert opsbook.run("deploy.rollback", "--release", older, "--confirm", "prod").exit_code == 0

    none_older = opsbook.run("deploy.rollback", "--confirm", "prod")
    assert none_older.exit_code == 3, none_older
    assert "no READY production deployment older than" in none_older.stderr
    assert_no_secret(opsbook, *setup["secrets"])


def test_a_wrong_token_is_refused_without_showing_it(
        opsbook: Opsbook, vercel_env: Callable[..., dict[str, Any]]) -> None:
    setup = vercel_env()
    opsbook.environ["VERCEL_TOKEN"] = "wrong-token-value-123"
    result = opsbook.run("deploy.push-env", "--dry-run")
    assert result.exit_code == 3, result
    assert "Vercel refused app.vercel.token" in result.stderr, result
    assert_no_secret(opsbook, "wrong-token-value-123", *setup["secrets"])


MIGRATIONS_TABLE = """
CREATE TABLE _prisma_migrations (
    id varchar(36) PRIMARY KEY, checksum varchar(64) NOT NULL, finished_at timestamptz,
    migration_name varchar(255) NOT NULL, logs text, rolled_back_at timestamptz,
    started_at timestamptz NOT NULL DEFAULT now(), applied_steps_count int NOT NULL DEFAULT 0);
INSERT INTO _prisma_migrations (id, checksum, finished_at, migration_name, applied_steps_count)
VALUES ('a', repeat('0', 64), now() - interval '1 day', '20250101120000_init', 1),
       ('b', repeat('1', 64), now(), '20250301120000_add_column', 1);
"""


def test_incident_rollback_promotes_and_warns_of_migrations_newer_than_the_deployment(
        opsbook: Opsbook, vercel_env: Callable[..., dict[str, Any]]) -> None:
    setup = vercel_env(protected=True)
    project: FakeProject = setup["project"]
    older = project.deployments[0].id
    with psycopg.connect(setup["database_url"].reveal(), autocommit=True) as connection:
        connection.execute(MIGRATIONS_TABLE)  # one migration finished after every deployment was built

    opened = opsbook.run("incident.open", "--title", "Checkout errors", "--impact", "major",
                         "--components", "api", "--message", "Checkout returns 500", "--json")
    assert opened.exit_code == 0, opened
    incident_id = opened.json()["incident"]["id"]

    planned = opsbook.run("incident.rollback", incident_id, "--dry-run")
    assert planned.exit_code == 0, planned
    assert f"promote {older}" in planned.stderr, planned
    assert "the database has 1 migration(s) applied after deployment" in planned.stderr
    assert "20250301120000_add_column" in planned.stderr and "20250101120000_init" not in planned.stderr

    unconfirmed = opsbook.run("incident.rollback", incident_id, stdin="")
    assert unconfirmed.exit_code == 2, unconfirmed
    rolled = opsbook.run("incident.rollback", incident_id, "--confirm", "prod")
    assert rolled.exit_code == 0, rolled
    assert project.production == older
    assert_no_secret(opsbook, *setup["secrets"])


def test_runbook_show_lists_the_vercel_steps(opsbook: Opsbook, vercel_env: Callable[..., dict[str, Any]]) -> None:
    vercel_env()
    shown = opsbook.run("runbook.show", "deploy.rollback")
    assert shown.exit_code == 0, shown
    assert "promote the previous ready production deployment" in shown.stdout, shown
    assert "current" not in shown.stdout  # no release symlinks on Vercel
    pushed = opsbook.run("runbook.show", "deploy.push-env")
    assert "set the Vercel project's production environment variables" in pushed.stdout, pushed


def test_secrets_rotate_switches_the_app_through_vercel(
        opsbook: Opsbook, vercel_env: Callable[..., dict[str, Any]]) -> None:
    setup = vercel_env()
    project: FakeProject = setup["project"]
    serving = project.production
    rotated = opsbook.run("secrets.rotate", "--name", "AUTH_SECRET", "--json")
    assert rotated.exit_code == 0, rotated
    secret = stored(opsbook, "prod")["AUTH_SECRET"]
    assert serving_variables(project)["AUTH_SECRET"] == secret
    assert project.production != serving and project.serving().state == "READY"  # redeployed with it
    assert_no_secret(opsbook, secret, *setup["secrets"])


def test_the_drill_points_a_vercel_staging_at_the_restored_database(
        opsbook: Opsbook, postgres_server: Any, s3_server: Any, vercel_api: FakeVercel) -> None:
    prod_url = postgres_server.create_database(f"vprod_{uuid.uuid4().hex[:8]}")
    staging_url = postgres_server.create_database(f"vstaging_{uuid.uuid4().hex[:8]}")
    with psycopg.connect(prod_url.reveal(), autocommit=True) as connection:
        connection.execute("CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders SELECT generate_series(1, 7)")
    project = vercel_api.new_project({"DATABASE_URL": prod_url.reveal()})  # staging's app still on prod's data
    backups = s3_server.make_bucket().bucket
    opsbook.environ.update({"PROD_DB": prod_url.reveal(), "STAGING_DB": staging_url.reveal(),
                            "VERCEL_TOKEN": project.token, "S3_SECRET": s3_server.secret_access_key.reveal()})

    def bucket(prefix: str) -> dict[str, Any]:
        return {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": backups,
                "access_key_id": s3_server.access_key_id, "secret_access_key": "${env:S3_SECRET}", "prefix": prefix}

    opsbook.write_inventory({"project": "vdrill", "default_env": "prod", "envs": {
        "prod": {"database": {"url": "${env:PROD_DB}"}, "backups": bucket("prod/"), "storage": bucket("images/"),
                 "drill": {"target": "staging"}},
        "staging": {"database": {"url": "${env:STAGING_DB}"}, "backups": bucket("staging/"),
                    "app": {"platform": "vercel", "health_timeout": 10,
                            "vercel": {"project_id": project.id, "team_id": project.team_id,
                                       "token": "${env:VERCEL_TOKEN}", "api": vercel_api.base_url},
                            "health_url": vercel_api.url(project, "/api/health"),
                            "ready_url": vercel_api.url(project, "/api/ready")}},
    }})
    assert opsbook.run("backup", "--env", "prod").exit_code == 0
    serving = project.production
    result = opsbook.run("drill", "--env", "prod", "--json")
    assert "drill" in result.json(), result
    report = result.json()["drill"]
    staging = next(step for step in report["steps"] if step["name"] == "staging")
    assert staging["status"] == "passed", report
    assert project.production != serving  # redeployed with the restored database's URL
    assert project.variables("production")["DATABASE_URL"].startswith(staging_url.reveal().split("?")[0])
    assert_no_secret(opsbook, project.token, postgres_server.password.reveal())


def test_keys_rotate_pushes_the_new_key_redeploys_checks_and_revokes_the_old(
        opsbook: Opsbook, postgres_server: Any, s3_server: Any, vercel_api: FakeVercel) -> None:
    """aws-iam keys (moto, signatures and permissions enforced) for an app on Vercel: the new key becomes the
    project's variables, a redeploy serves with it (its ready check reaches the bucket), then the old key goes."""
    user = f"app-{uuid.uuid4().hex[:8]}"
    old = s3_server.create_access_key(user)
    assets, backups = s3_server.make_bucket().bucket, s3_server.make_bucket().bucket
    database_url = postgres_server.create_database(f"vercel_{uuid.uuid4().hex[:8]}")
    serving_with_old_key = {"DATABASE_URL": database_url.reveal(), "S3_ENDPOINT": s3_server.endpoint,
                            "S3_REGION": "us-east-1", "S3_BUCKET": assets,
                            "S3_ACCESS_KEY_ID": old[0], "S3_SECRET_ACCESS_KEY": old[1].reveal()}
    with s3_server.enforce_auth():
        project = vercel_api.new_project(serving_with_old_key, deployments=1)
        opsbook.environ.update({"APP_DATABASE_URL": database_url.reveal(), "VERCEL_TOKEN": project.token,
                                "S3_KEY_ID": old[0], "S3_SECRET": old[1].reveal()})
        ready_url = vercel_api.url(project, "/api/ready")
        opsbook.write_inventory({"project": "verceltest", "default_env": "prod", "envs": {"prod": {
            "database": {"url": "${env:APP_DATABASE_URL}"},
            "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": assets,
                        "access_key_id": "${env:S3_KEY_ID}", "secret_access_key": "${env:S3_SECRET}"},
            "backups": {"bucket": backups, "prefix": "prod/"},
            "keys": {"provider": "aws-iam", "iam_user": user, "probe_timeout": 2},
            "app": {"platform": "vercel", "health_timeout": 10,
                    "vercel": {"project_id": project.id, "team_id": project.team_id, "token": "${env:VERCEL_TOKEN}",
                               "api": vercel_api.base_url, "build_timeout": 20},
                    "health_url": vercel_api.url(project, "/api/health"), "ready_url": ready_url}}}})
        assert http_status(ready_url) == 200
        serving = project.production

        dry = opsbook.run("keys.rotate", "--dry-run")
        assert dry.exit_code == 0, dry
        assert "would create a new aws-iam key" in dry.stderr and "would revoke the old key" in dry.stderr, dry
        assert not [c for c in project.calls if not c.startswith("GET ")] and project.production == serving

        result = opsbook.run("keys.rotate", "--json")
        assert result.exit_code == 0, result
        steps = {e["step"]: e["state"] for e in opsbook.journal(result.json()["run_id"]) if e["event"] == "step"}
        assert [name for name in steps if name.startswith(("push-env", "restart"))], steps
        secrets = stored(opsbook, "prod")
        new = (secrets["STORAGE_ACCESS_KEY_ID"], secrets["STORAGE_SECRET_ACCESS_KEY"])
        assert new[0] != old[0]
        variables = serving_variables(project)
        assert (variables["S3_ACCESS_KEY_ID"], variables["S3_SECRET_ACCESS_KEY"]) == new
        assert project.production != serving and project.serving().state == "READY"
        assert http_status(ready_url) == 200  # the redeployed app reaches the bucket with the new key
        assert refused(s3_server, assets, old[0], old[1]) == "InvalidAccessKeyId"
        assert refused(s3_server, assets, new[0], Secret(new[1])) is None
        assert iam_keys(s3_server, user, (new[0], Secret(new[1]))) == [new[0]]
    assert_no_secret(opsbook, project.token, old[1].reveal(), new[1], postgres_server.password.reveal())
