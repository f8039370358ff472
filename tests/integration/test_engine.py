"""The engine's promises, proven on a real runbook (provision) through the real CLI."""

from __future__ import annotations

import signal
from typing import Any

import psycopg
import pytest
from psycopg import sql

from ops.secret_store import SecretStore
from tests.cli import Opsbook, wait_for
from tests.fixtures.secrets import assert_no_secret


def role_exists(server: Any, role: str) -> bool:
    with psycopg.connect(server.url().reveal()) as connection:
        return connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def database_exists(server: Any, name: str) -> bool:
    with psycopg.connect(server.url().reveal()) as connection:
        return connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def bucket_exists(s3: Any, bucket: str) -> bool:
    return bucket in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}


def states(journal: list[dict[str, Any]], step: str) -> list[str]:
    return [e["state"] for e in journal if e["event"] == "step" and e["step"] == step]


def stored_secrets(opsbook: Opsbook) -> list[str]:
    """Every value the workspace's secret store keeps for staging, revealed."""
    return [value.reveal() for value in SecretStore(opsbook.state_dir, "staging").read().values()]


def test_dry_run_then_apply_then_nothing_to_do(opsbook, staging, postgres_server, s3_server):
    dry = opsbook.run("provision", "--env", "staging", "--dry-run")
    assert dry.exit_code == 0, dry
    assert f"would create role {staging['role']}" in dry.stderr
    assert f"would create bucket {staging['bucket']}" in dry.stderr
    assert not role_exists(postgres_server, staging["role"])
    assert not database_exists(postgres_server, staging["database"])
    assert not bucket_exists(s3_server, staging["bucket"])
    assert not SecretStore(opsbook.state_dir, "staging").path.exists()

    first = opsbook.run("provision", "--env", "staging", "--json")
    assert first.exit_code == 0, first
    assert first.json()["status"] == "succeeded"
    assert role_exists(postgres_server, staging["role"]) and database_exists(postgres_server, staging["database"])
    assert bucket_exists(s3_server, staging["bucket"]) and bucket_exists(s3_server, staging["backups"])

    second = opsbook.run("provision", "--env", "staging", "--json")
    assert second.exit_code == 0, second
    assert second.json()["status"] == "nothing to do"
    assert all(step["change"] is None for step in second.json()["steps"])

    # the role logs in with the generated password, which only the 0600 store holds
    password = SecretStore(opsbook.state_dir, "staging").get("DATABASE_PASSWORD")
    assert oct(SecretStore(opsbook.state_dir, "staging").path.stat().st_mode & 0o777) == "0o600"
    with psycopg.connect(host="127.0.0.1", port=postgres_server.port, user=staging["role"],
                         password=password.reveal(), dbname=staging["database"]) as connection:
        assert connection.execute("SELECT current_user").fetchone()[0] == staging["role"]

    # the journal copy lands in the backup bucket under audit/
    run_id = first.json()["run_id"]
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=staging["backups"]).get("Contents", [])]
    assert f"staging/audit/{run_id}.jsonl" in keys
    journal = opsbook.journal(run_id)
    assert journal[0]["operator"] == "tester" and journal[0]["inventory_hash"]
    assert states(journal, "database-role") == ["planned", "started", "applied", "verified"]
    assert_no_secret(opsbook, *staging["secrets"], *stored_secrets(opsbook))


def test_protected_environment_needs_the_typed_name(opsbook, staging, postgres_server):
    refused = opsbook.run("provision", "--env", "prod")
    assert refused.exit_code == 2, refused
    assert "--confirm prod" in refused.stderr
    assert not role_exists(postgres_server, staging["role"])

    wrong = opsbook.run("provision", "--env", "prod", "--confirm", "staging")
    assert wrong.exit_code == 2 and not role_exists(postgres_server, staging["role"])

    confirmed = opsbook.run("provision", "--env", "prod", "--confirm", "prod")
    assert confirmed.exit_code == 0, confirmed
    assert role_exists(postgres_server, staging["role"])


def test_failure_stops_undoes_and_journals(opsbook, staging, postgres_server):
    # CREATE DATABASE copies template1 and fails while anyone is connected to it: a real failure.
    with psycopg.connect(postgres_server.url("template1").reveal()):
        failed = opsbook.run("provision", "--env", "staging")
    assert failed.exit_code == 1, failed
    assert "step 4 (create the database" in failed.stderr and "failed" in failed.stderr
    assert "undone: create the database role" in failed.stderr
    assert not role_exists(postgres_server, staging["role"])  # compensated
    assert not database_exists(postgres_server, staging["database"])

    journal = opsbook.journal(opsbook.latest_run_id())
    assert states(journal, "database") == ["planned", "started", "failed"]
    assert states(journal, "database-role")[-1] == "undone"
    assert journal[-1]["event"] == "finished" and journal[-1]["status"] == "failed"
    assert journal[-1]["stopped_at"] == "database"
    assert "template1" in journal[-1]["reason"]

    listed = opsbook.run("runs.list")
    assert "failed" in listed.stderr and "database" in listed.stderr
    assert_no_secret(opsbook, *staging["secrets"], *stored_secrets(opsbook))


def test_killed_run_resumes_skipping_verified_steps_and_locks_out_a_second_run(opsbook, staging, postgres_server):
    # An uncommitted CREATE ROLE of the same name makes the run's CREATE ROLE wait: a deterministic pause.
    blocker = psycopg.connect(postgres_server.url().reveal())
    blocker.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(staging["role"])))
    process = opsbook.start("provision", "--env", "staging")
    try:
        run_id = wait_for(lambda: opsbook.journals() and opsbook.latest_run_id(), what="the run's journal")
        wait_for(lambda: "started" in states(opsbook.journal(run_id), "database-role"), what="the role step")

        second = opsbook.run("provision", "--env", "staging")
        assert second.exit_code == 75, second
        assert f"run {run_id}" in second.stderr and "tester@" in second.stderr

        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        with psycopg.connect(postgres_server.url().reveal(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
                          (f"opsbook run {run_id}%",))
        blocker.rollback()
        blocker.close()

    assert opsbook.journal(run_id)[-1]["event"] != "finished"
    listed = opsbook.run("runs.list")
    assert "unfinished" in listed.stderr

    resumed = opsbook.run("runs.resume", run_id, "--json")
    assert resumed.exit_code == 0, resumed
    assert "already verified" in resumed.stderr
    assert f"took over the lock of run {run_id}" in resumed.stderr  # its holder was killed
    journal = opsbook.journal(resumed.json()["run_id"])
    assert journal[0]["resumes"] == run_id
    assert states(journal, "storage-bucket")[-1] == "skipped"
    assert states(journal, "database-role")[-1] == "verified"
    assert states(journal, "database")[-1] == "verified"
    assert role_exists(postgres_server, staging["role"]) and database_exists(postgres_server, staging["database"])
    assert_no_secret(opsbook, *staging["secrets"], *stored_secrets(opsbook))


def test_runbook_show_renders_the_steps_that_run(opsbook, staging):
    shown = opsbook.run("runbook.show", "provision", "--env", "staging")
    assert shown.exit_code == 0, shown
    lines = [line for line in shown.stdout.splitlines() if line[:1].isdigit()]
    assert lines == [
        f"1. [ ] create the app bucket {staging['bucket']}",
        f"2. [ ] create the backup bucket {staging['backups']}",
        f"3. [ ] create the database role {staging['role']} with a generated password",
        f"4. [ ] create the database {staging['database']} owned by {staging['role']}",
    ]


@pytest.mark.parametrize("unreachable", ["database", "storage"])
def test_dry_run_that_cannot_be_planned_exits_3(opsbook, staging, unreachable):
    inventory = opsbook.inventory.read_text()
    if unreachable == "database":
        opsbook.environ["ADMIN_DATABASE_URL"] = "postgresql://postgres:pw@127.0.0.1:1/postgres"
    else:
        opsbook.write_inventory(inventory.replace("endpoint: http://127.0.0.1:", "endpoint: http://127.0.0.1:1#"))
    dry = opsbook.run("provision", "--env", "staging", "--dry-run")
    assert dry.exit_code == 3, dry
    assert "the plan cannot be made" in dry.stderr
    assert "Traceback" not in dry.output


def test_a_run_whose_database_lock_cannot_be_taken_is_a_failed_precondition(opsbook, staging):
    """A backup (which locks the database before it plans) meets an unreachable database: exit 3, as its dry run."""
    opsbook.environ["ADMIN_DATABASE_URL"] = "postgresql://postgres:pw@127.0.0.1:1/postgres"
    for dry_run in (["--dry-run"], []):
        result = opsbook.run("backup", "--env", "staging", *dry_run)
        assert result.exit_code == 3, result
        assert "cannot connect to PostgreSQL" in result.stderr and "Traceback" not in result.output
