"""Triage against real PostgreSQL, moto S3 and an sshd app host: it names each broken part in turn."""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from ops import inventory
from ops.journal import Journal, new_run_id
from ops.triage import run_triage
from tests.cli import Opsbook, wait_for
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.shop import DEMO_MIGRATIONS

PLANTED_KEY = "sk_live_planted_0123456789abcdef"
PLANTED_PASSWORD = "hunter2-planted-password"


@pytest.fixture
def web(tmp_path: Path, postgres_server: Any, s3_server: Any, app_host_factory: Any) -> dict[str, Any]:
    from ops.migrations import apply_pending

    (host,) = app_host_factory(("web1",))
    database_url = postgres_server.create_database()
    apply_pending(database_url, DEMO_MIGRATIONS)
    bucket = s3_server.make_bucket()
    s3_server.client().put_object(Bucket=bucket.bucket, Key="images/logo.png", Body=b"\x89PNG sample")
    host.env_file.write_text(f"DATABASE_URL={database_url.reveal()}\nSTRIPE_SECRET_KEY={PLANTED_KEY}\n"
                             f"LOG_LEVEL=info\n")
    subprocess.run(host.restart_command, shell=True, check=True, capture_output=True, timeout=60)
    with open(host.app_dir / "app.log", "a") as log:  # what a careless app prints
        log.write(f"charging card with key {PLANTED_KEY}\n"
                  f"retrying postgresql://shop:{PLANTED_PASSWORD}@db.internal:5432/shop\n")
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump({"project": "triagetest", "envs": {"web": {
        "database": {"url": database_url.reveal()},
        "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": bucket.bucket, "access_key_id": s3_server.access_key_id,
                    "secret_access_key": s3_server.secret_access_key.reveal()},
        "ssh": {"user": host.host.user, "port": host.host.port, "key_file": host.host.key_filename},
        "hosts": [{"name": "web1", "address": "127.0.0.1"}],
        "app": {"env_file": str(host.env_file), "health_url": host.health_url, "ready_url": host.ready_url,
                "log_command": host.log_command},
    }}}))
    env = inventory.load(path).environment("web")
    journal = Journal(env.inventory.state_dir / "runs", new_run_id())
    journal.write("run", runbook="deploy.restart", env="web", operator="alice", dry_run=False)
    journal.write("finished", status="failed", exit_code=1)
    return {"env": env, "host": host, "run_id": journal.run_id,
            "secrets": [PLANTED_KEY, PLANTED_PASSWORD, postgres_server.password.reveal(),
                        s3_server.secret_access_key.reveal()]}


def report_text(report: Any) -> str:
    """Everything the report shows: its Markdown and its JSON."""
    return report.markdown() + json.dumps(report.to_json(), default=str)


def test_triage_of_a_healthy_environment_collects_scope_changes_and_redacted_logs(web):
    report = run_triage(web["env"], log_lines=20)
    assert report.ok, report.summary()
    assert {f.part for f in report.findings} == {"host web1", "app health on web1", "app ready on web1",
                                                 "database", "storage"}
    assert "images/logo.png" in next(f.detail for f in report.findings if f.part == "storage")
    assert report.activity["max_connections"] > 0 and sum(report.activity["connections"].values()) >= 1
    assert [run["run_id"] for run in report.recent_runs] == [web["run_id"]]
    assert report.recent_runs[0]["status"] == "failed"
    assert {m["name"] for m in report.recent_migrations} == {p.name for p in DEMO_MIGRATIONS.iterdir() if p.is_dir()}
    (logs,) = report.logs
    assert len(logs.lines) == 20 or "listening on" in "\n".join(logs.lines)
    assert "charging card with key ***" in logs.lines
    assert any("postgresql://shop:***@db.internal" in line for line in logs.lines)
    markdown = report.markdown()
    assert "All probes passed." in markdown and "deploy.restart by alice, failed" in markdown
    assert_no_secret(report_text(report), *web["secrets"])


def test_triage_names_the_failing_part_when_each_is_broken_in_turn(web):
    env, host = web["env"], web["host"]

    host.stop()
    report = run_triage(env)
    assert report.failing_parts() == ["app health on web1", "app ready on web1"]
    assert "no answer" in report.failing[0].detail and host.health_url in report.failing[0].detail
    assert "**FAIL**" in report.markdown() and "2 failing" in report.summary()
    subprocess.run(host.restart_command, shell=True, check=True, capture_output=True, timeout=60)

    broken_database = env.with_overrides(
        {"database": {"url": f"postgresql://nobody:{PLANTED_PASSWORD}@127.0.0.1:1/shop"}})
    report = run_triage(broken_database)
    assert report.failing_parts() == ["database"]
    assert "127.0.0.1:1" in report.failing[0].detail and report.failing[0].hint

    broken_storage = env.with_overrides({"storage": {"bucket": "no-such-bucket-for-triage"}})
    report = run_triage(broken_storage)
    assert report.failing_parts() == ["storage"]
    assert "no-such-bucket-for-triage" in report.failing[0].detail
    assert_no_secret(report_text(report), *web["secrets"])


# --- the database's and the storage's side, through `inv incident.open` -----------------------------

HELD_LITERAL = "held-by-blocker-4242"
WAITING_LITERAL = "card-4111-planted-in-a-query"


@pytest.fixture
def shop(opsbook: Opsbook, postgres_server: Any, s3_server: Any, ssh_server: Any) -> dict[str, Any]:
    """`shop`: a database whose server log is read over SSH on `db1`; `gone`: the same with a missing bucket."""
    from ops.migrations import apply_pending

    database_url = postgres_server.create_database()
    apply_pending(database_url, DEMO_MIGRATIONS)
    with psycopg.connect(database_url.reveal(), autocommit=True) as connection:
        connection.execute("""INSERT INTO "Brand" (slug, name, "updatedAt") VALUES ('acme', 'Acme', now())""")
    bucket = s3_server.make_bucket()
    s3_server.client().put_object(Bucket=bucket.bucket, Key="images/logo.png", Body=b"\x89PNG sample")
    opsbook.environ.update({"DATABASE_URL": database_url.reveal(), "S3_SECRET": s3_server.secret_access_key.reveal()})
    server_log = postgres_server.socket_dir / "server.log"

    def environment(bucket_name: str) -> dict[str, Any]:
        return {
            "database": {"url": "${env:DATABASE_URL}", "log_command": f"tail -n 300 {shlex.quote(str(server_log))}",
                         "log_host": {"name": "db1", "address": "127.0.0.1", "user": ssh_server.user,
                                      "port": ssh_server.port, "key_file": ssh_server.key_filename}},
            "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                        "bucket": bucket_name, "access_key_id": s3_server.access_key_id,
                        "secret_access_key": "${env:S3_SECRET}"},
            "incidents": {"log_lines": 40},
        }

    opsbook.write_inventory({"project": "triagecli", "envs": {
        "shop": environment(bucket.bucket), "gone": environment(f"{bucket.bucket}-missing")}})
    return {"url": database_url.reveal(),
            "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal()]}


def open_incident(opsbook: Opsbook, env: str) -> tuple[dict[str, Any], str]:
    result = opsbook.run("incident.open", "--env", env, "--title", "Checkout hangs", "--impact", "major",
                         "--components", "checkout", "--json")
    assert result.exit_code == 0, result
    folder = opsbook.state_dir / "incidents" / result.json()["incident"]["id"]
    return json.loads((folder / "triage.json").read_text()), (folder / "triage.md").read_text()


def test_triage_names_blocked_and_blocking_statements_and_reads_the_database_log(opsbook, shop, s3_server):
    url = shop["url"]
    marker = f"no_such_table_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as noisy:  # two errors for the server log
        with pytest.raises(psycopg.errors.UndefinedTable):
            noisy.execute(f'SELECT * FROM "{marker}"')
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):  # the value is echoed in the log
            noisy.execute(f"SELECT '{s3_server.secret_access_key.reveal()}'::int")
    blocker = psycopg.connect(url)  # holds the row lock in an open transaction
    waiter = psycopg.connect(url, autocommit=True)
    blocker_pid, waiter_pid = blocker.info.backend_pid, waiter.info.backend_pid
    blocker.execute(f"""UPDATE "Brand" SET name = '{HELD_LITERAL}' WHERE slug = 'acme'""")
    waiting = threading.Thread(target=waiter.execute,
                               args=(f"""UPDATE "Brand" SET name = '{WAITING_LITERAL}' WHERE slug = 'acme'""",))
    waiting.start()
    try:
        with psycopg.connect(url, autocommit=True) as observer:
            wait_for(lambda: observer.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                              (waiter_pid,)).fetchone()[0], what="the row lock wait")
        triage, markdown = open_incident(opsbook, "shop")
    finally:
        blocker.rollback()
        waiting.join(timeout=30)
        blocker.close()
        waiter.close()

    [blocked] = triage["database_activity"]["blocking"]
    assert blocked["pid"] == waiter_pid and blocked["blocked_by"] == [blocker_pid]
    assert blocked["query"] == """UPDATE "Brand" SET name = '…' WHERE slug = '…'"""
    [holder] = blocked["blockers"]
    assert holder["pid"] == blocker_pid and holder["state"] == "idle in transaction"
    assert holder["query"] == """UPDATE "Brand" SET name = '…' WHERE slug = '…'"""
    assert waiter_pid in [q["pid"] for q in triage["database_activity"]["longest_queries"]]
    [locks] = [f for f in triage["findings"] if f["part"] == "database locks"]
    assert locks["status"] == "warn" and str(blocker_pid) in locks["detail"]
    assert f"pid {waiter_pid}" in markdown and "blocked by pid" in markdown

    database_log = triage["database_log"]
    assert database_log["host"] == "db1" and database_log["error"] is None
    assert any(f'relation "{marker}" does not exist' in line for line in database_log["lines"])
    assert any("invalid input syntax for type integer" in line and "***" in line for line in database_log["lines"])
    assert "### Database log of db1" in markdown and marker in markdown

    produced = opsbook.everything_produced()
    for secret in [*shop["secrets"], HELD_LITERAL, WAITING_LITERAL]:
        assert secret not in produced, secret


def test_triage_shows_what_the_storage_answered(opsbook, shop, s3_server):
    with s3_server.enforce_auth():  # the inventory's key is no IAM key: refused
        triage, _ = open_incident(opsbook, "shop")
    [storage] = [f for f in triage["findings"] if f["part"] == "storage"]
    assert storage["status"] == "fail" and "InvalidAccessKeyId" in storage["detail"], storage
    assert "does not exist in our records" in storage["detail"]

    triage, _ = open_incident(opsbook, "gone")
    [storage] = [f for f in triage["findings"] if f["part"] == "storage"]
    assert storage["status"] == "fail" and "NoSuchBucket" in storage["detail"], storage
    assert "The specified bucket does not exist" in storage["detail"]
    produced = opsbook.everything_produced()
    assert not [secret for secret in shop["secrets"] if secret in produced]
