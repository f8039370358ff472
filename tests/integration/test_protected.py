"""Protected environments, through the real CLI on the real servers: every run that changes what serves
users needs the typed name or --confirm NAME; the nightly backup and its policy retention do not; a
--confirm that names another environment is refused before anything runs, whatever the task."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable
from typing import Any

import yaml

from tests.cli import REPOSITORY, Opsbook, task_arguments
from tests.fixtures.ssh import AppHost, SshServer, host_entry


def edit_inventory(opsbook: Opsbook, change: Callable[[dict[str, Any]], None]) -> None:
    data = yaml.safe_load(opsbook.inventory.read_text())
    change(data)
    opsbook.write_inventory(data)


def run(opsbook: Opsbook, *args: str) -> Any:
    return opsbook.run(*args, stdin="")  # no terminal: only --confirm can confirm


def tasks_taking_confirm() -> dict[str, Any]:
    sys.path.insert(0, str(REPOSITORY))
    import tasks

    found = {}
    for name in tasks.ns.task_names:
        task = tasks.ns[name]
        arguments = {argument.name: argument for argument in task_arguments(task)}
        if "confirm" in arguments:
            found[name] = task
    return found


def test_restart_of_a_protected_environment_needs_its_name(
        opsbook: Opsbook, staging: dict[str, Any], ssh_server: SshServer, postgres_server: Any, s3_server: Any,
        app_host_factory: Callable[..., list[AppHost]]) -> None:
    (web1,) = app_host_factory(("web1",))
    for bucket in (staging["bucket"], staging["backups"]):  # the app's ready URL heads the first
        s3_server.client().create_bucket(Bucket=bucket)
    database_url = postgres_server.create_database(f"protected_{uuid.uuid4().hex[:8]}")
    opsbook.environ["PROD_DATABASE_URL"] = database_url.reveal()

    def prod_on_a_host(data: dict[str, Any]) -> None:
        prod = data["envs"]["prod"]
        prod["database"] = {"url": "${env:PROD_DATABASE_URL}"}
        prod["hosts"] = [host_entry(ssh_server, web1)]
        prod["app"] = {"health_timeout": 10}

    edit_inventory(opsbook, prod_on_a_host)
    pushed = run(opsbook, "deploy.push-env", "--env", "prod", "--restart", "--confirm", "prod")
    assert pushed.exit_code == 0, pushed
    serving = web1.pid()
    assert serving is not None

    unconfirmed = run(opsbook, "deploy.restart", "--env", "prod")
    assert unconfirmed.exit_code == 2, unconfirmed
    assert "--confirm prod" in unconfirmed.stderr
    assert web1.pid() == serving, "prod was restarted without its name"

    journals = opsbook.journals()
    wrong = run(opsbook, "deploy.restart", "--env", "prod", "--confirm", "staging")
    assert wrong.exit_code == 2, wrong
    assert "--confirm 'staging' does not match the environment 'prod'" in wrong.stderr
    assert "plan for" not in wrong.stderr and opsbook.journals() == journals, "refused only after planning"
    assert web1.pid() == serving

    confirmed = run(opsbook, "deploy.restart", "--env", "prod", "--confirm", "prod", "--json")
    assert confirmed.exit_code == 0, confirmed
    assert [entry["status"] for entry in confirmed.json()["hosts"]] == ["restarted"]
    assert web1.pid() not in (None, serving)


def test_a_confirm_naming_another_environment_is_refused_before_anything_runs(
        opsbook: Opsbook, staging: dict[str, Any]) -> None:
    failed = run(opsbook, "provision", "--env", "prod")  # a run of prod to resume
    assert failed.exit_code == 2, failed
    resumable = opsbook.latest_run_id()
    first_arguments = {"secrets.rotate": ["ADMIN_PASSWORD"], "incident.rollback": ["20260101T0000Z-ab12"],
                       "migrate.resolve": ["20250101120000_init_brands", "--applied"], "runs.resume": [resumable],
                       "restore.diff": ["--table", "User", "--apply"], "backup.copy": ["--id", "20260101T000000Z-ab12"]}
    journals = opsbook.journals()
    walked = tasks_taking_confirm()
    assert {"deploy.restart", "backup.run", "backup.prune", "restore.run", "restore.diff", "drill.run", "decommission",
            "incident.rollback", "runs.resume"} <= set(walked)
    for name, task in walked.items():
        flags = {argument.names[0] for argument in task_arguments(task)}
        where = {"drill.run": ["--env", "staging", "--target", "prod"], "runs.resume": []}.get(name, ["--env", "prod"])
        dry = ["--dry-run"] if "dry-run" in flags else []
        result = run(opsbook, name, *first_arguments.get(name, []), *where, *dry, "--confirm", "staging")
        assert result.exit_code == 2, result
        assert "--confirm 'staging' does not match the environment 'prod'" in result.stderr, result
        assert "Traceback" not in result.output
        assert opsbook.journals() == journals, f"{name} ran before refusing the --confirm"
    second = run(opsbook, "decommission", "--env", "prod", "--confirm", "prod", "--drop-database", "--dry-run",
                 "--confirm-drop", "staging")
    assert second.exit_code == 2 and "--confirm-drop 'staging' does not match" in second.stderr, second
    assert opsbook.journals() == journals


def test_the_nightly_backup_needs_no_confirmation_but_a_pruning_by_hand_does(
        opsbook: Opsbook, staging: dict[str, Any], postgres_server: Any, s3_server: Any) -> None:
    postgres_server.create_brands_database(staging["database"])
    bucket = staging["backups"]
    s3_server.client().create_bucket(Bucket=bucket)
    opsbook.environ["PROD_DATABASE_URL"] = postgres_server.url(staging["database"]).reveal()

    def keep_one(data: dict[str, Any]) -> None:
        prod = data["envs"]["prod"]
        prod["database"]["url"] = "${env:PROD_DATABASE_URL}"
        prod["backups"] = {**prod["backups"], "prefix": "prod/", "retention": {
            "keep_last": 1, "daily": 0, "weekly": 0, "monthly": 0, "min_keep": 1}}

    edit_inventory(opsbook, keep_one)

    def stored() -> set[str]:
        listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="prod/backups/").get("Contents", [])
        return {item["Key"].split("/")[2] for item in listed if item["Key"].endswith("/manifest.json")}

    first = run(opsbook, "backup", "--env", "prod", "--json")
    assert first.exit_code == 0, first
    second = run(opsbook, "backup", "--env", "prod", "--json")
    assert second.exit_code == 0, second
    newest = second.json()["backup"]["backup_id"]
    assert stored() == {newest}, "the retention the backup runs by policy did not prune"

    extra = run(opsbook, "backup", "--env", "prod", "--no-prune", "--json")
    assert extra.exit_code == 0, extra
    latest = extra.json()["backup"]["backup_id"]
    assert stored() == {newest, latest}
    unconfirmed = run(opsbook, "backup.prune", "--env", "prod")
    assert unconfirmed.exit_code == 2, unconfirmed
    assert "--confirm prod" in unconfirmed.stderr and stored() == {newest, latest}
    pruned = run(opsbook, "backup.prune", "--env", "prod", "--confirm", "prod")
    assert pruned.exit_code == 0, pruned
    assert stored() == {latest}

    verified = run(opsbook, "backup.verify", "--env", "prod", "--latest", "--deep")  # a scratch database only
    assert verified.exit_code == 0, verified
