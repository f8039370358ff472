"""Triage against real PostgreSQL, moto S3 and an sshd app host: it names each broken part in turn."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops import inventory
from ops.journal import Journal, new_run_id
from ops.triage import run_triage

DEMO_MIGRATIONS = Path(__file__).resolve().parents[2] / "ops" / "demo" / "prisma" / "migrations"
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


def assert_no_secret(report: Any, secrets: list[str]) -> None:
    produced = report.markdown() + json.dumps(report.to_json(), default=str)
    assert not [secret for secret in secrets if secret in produced]


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
    assert_no_secret(report, web["secrets"])


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
    assert_no_secret(report, web["secrets"])
