"""`--env prod,staging` and `--env all` on the read-only tasks, through the real CLI, on real PostgreSQL and moto
S3: one block and one summary line per environment, the worst exit code, one --json object, each environment's
own pings; a decommissioned environment left out of `all`; the tasks that change things refuse a list."""

from __future__ import annotations

import select
import shlex
import signal
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from ops import backup_manifest as bm
from ops.clock import iso_z
from ops.secrets import Secret
from ops.storage import open_storage
from tests.cli import Opsbook
from tests.fixtures.backups import backups_section, write_inventory
from tests.fixtures.manifests import manifest
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.shop import make_database
from tests.fixtures.ssh import free_port

REPOSITORY = Path(__file__).resolve().parents[2]
SECTION = "### Several environments at once"
TOKEN = "c3b1e0-fleet-ping-token"  # the ping URLs' path: a credential, never shown
DEAD_PASSWORD = "dead-pw-4411-fleet"


def store(storage: Any, env: str, database: str, age: timedelta) -> str:
    """A complete backup of `env`'s `database` that finished `age` ago, verified an hour later."""
    finished = datetime.now(UTC) - age
    backup_id = f"{finished:%Y%m%dT%H%M%SZ}-{len(list(storage.list()))}"
    written = manifest(backup_id, env=env, started_at=iso_z(finished - timedelta(seconds=12)),
                       finished_at=iso_z(finished), database=bm.DatabaseInfo(database, "app@db/app", "15.4", 15),
                       object=bm.StoredObject(bm.dump_key(backup_id, False), 4, "a" * 64, 4))
    storage.put_bytes(written.object.key, b"dump")
    bm.write_manifest(storage, written)
    bm.append_verification(storage, backup_id, bm.Verification(
        iso_z(finished + timedelta(hours=1)), "checksum", True, "r", "tester", "size and sha256 match"))
    return backup_id


@pytest.fixture
def fleet(opsbook: Opsbook, postgres_server: Any, s3_server: Any) -> dict[str, Any]:
    """`prod`: a reachable database and a fresh backup. `staging`: its database does not answer and its newest
    backup is 30 h old (limit 26 h). `old`: decommissioned."""
    name, url = make_database(postgres_server)
    bucket = s3_server.make_bucket().bucket
    dead = Secret(f"postgresql://app:{DEAD_PASSWORD}@127.0.0.1:{free_port()}/shop_staging")
    envs = {env: {"backups": backups_section(s3_server.endpoint, bucket, f"{env}/", retention={"max_age_hours": 26})}
            for env in ("prod", "staging", "old")}
    envs["old"]["decommissioned"] = True
    write_inventory(opsbook, s3_server, envs, {"prod": url, "staging": dead, "old": url})
    backups = {env: open_storage(s3_server.config(bucket, prefix=f"{env}/")) for env in envs}
    ids = {"prod": store(backups["prod"], "prod", name, timedelta(hours=3)),
           "staging": store(backups["staging"], "staging", "shop_staging", timedelta(hours=30)),
           "old": store(backups["old"], "old", name, timedelta(days=40))}
    return {"ids": ids, "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal(), TOKEN,
                                    DEAD_PASSWORD]}


def summary(result: Any) -> dict[str, list[str]]:
    """The summary's line per environment (the block after the last blank line), split into its words:
    {env: [outcome words…, "exit", code, …]}."""
    block = result.stderr.rstrip().rsplit("\n\n", 1)[-1].splitlines()
    assert block[0].split()[1:2] == ["on"] and block[0].endswith(":"), result.stderr
    return {line.split()[0]: line.split()[1:] for line in block if line.startswith("  ")}


def test_a_healthy_and_a_broken_environment_one_line_each_and_the_worst_exit_code(opsbook, fleet):
    checked = opsbook.run("backup.check", "--env", "prod,staging")
    assert checked.exit_code == 3, checked
    assert checked.stderr.index("== prod ==") < checked.stderr.index("== staging ==")
    assert "backup.check of prod" in checked.stderr and "backup.check of staging" in checked.stderr
    lines = summary(checked)
    assert set(lines) == {"prod", "staging"}, checked.stderr
    assert lines["prod"] == ["ok", "exit", "0"]
    assert lines["staging"][:4] == ["check", "failed", "exit", "3"] and "newest:" in lines["staging"]
    assert checked.stderr.rstrip().splitlines()[-1] == \
        "backup.check: exit 3 (check failed), the worst of 2 environments: 1 ok, 1 check failed"

    health = opsbook.run("health", "--env", "prod, staging")  # the database of staging does not answer
    assert health.exit_code == 3, health
    assert summary(health)["prod"] == ["ok", "exit", "0"]
    assert summary(health)["staging"][:4] == ["check", "failed", "exit", "3"]
    assert "FAIL database" in health.stderr.split("== staging ==")[1]

    status = opsbook.run("status", "--env", "staging,prod", "--json")  # in the order given
    assert status.exit_code == 3, status
    assert [entry["env"] for entry in status.json()["environments"]] == ["staging", "prod"]
    assert summary(status)["prod"] == ["ok", "exit", "0"], status
    assert status.json()["environments"][1]["result"]["last_backup"]["id"] == fleet["ids"]["prod"]
    assert "database" in status.json()["environments"][0]["result"]["errors"]
    assert "Traceback" not in checked.output + health.output + status.output
    assert_no_secret(opsbook, *fleet["secrets"])


def test_a_refused_environment_is_worse_than_a_failed_check(opsbook, fleet):
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["scratch"] = {"database": {"url": "${env:DB_URL_PROD}"}}  # no backups section
    opsbook.write_inventory(inventory)
    result = opsbook.run("backup.check", "--env", "staging,scratch")
    assert result.exit_code == 2, result
    assert summary(result)["scratch"][:3] == ["refused", "exit", "2"]
    assert summary(result)["staging"][:4] == ["check", "failed", "exit", "3"]
    unknown = opsbook.run("backup.check", "--env", "prod,stagign")
    assert unknown.exit_code == 2 and "did you mean 'staging'?" in unknown.stderr, unknown
    assert "== prod ==" not in unknown.stderr  # nothing runs before the list is known to be right
    assert opsbook.run("backup.check", "--env", "prod,,staging").exit_code == 2


def test_all_skips_a_decommissioned_environment_and_json_holds_a_result_per_environment(opsbook, fleet):
    result = opsbook.run("backup.check", "--env", "all", "--json")
    assert result.exit_code == 3, result
    data = result.json()
    assert (data["task"], data["ok"], data["exit_code"]) == ("backup.check", False, 3)
    assert [entry["env"] for entry in data["environments"]] == ["prod", "staging"]
    assert data["skipped"] == [{"env": "old", "reason": "decommissioned"}]
    assert "backup.check: skipping old: decommissioned" in result.stderr and "== old ==" not in result.stderr
    prod, staging = data["environments"]
    assert (prod["exit_code"], prod["ok"], prod["outcome"], prod["error"]) == (0, True, "ok", None)
    assert prod["result"]["newest"]["id"] == fleet["ids"]["prod"] and prod["result"]["ok"] is True
    assert (staging["exit_code"], staging["outcome"]) == (3, "check failed")
    assert staging["result"]["newest"]["id"] == fleet["ids"]["staging"]
    assert [problem["check"] for problem in staging["result"]["problems"]] == ["newest"]
    assert "newest" in staging["error"]

    named = opsbook.run("drill.due", "--env", "old")  # named, a decommissioned environment still answers
    assert named.exit_code == 3 and "== old ==" not in named.stderr, named
    assert_no_secret(opsbook, *fleet["secrets"])


def test_each_environment_pings_its_own_monitor(opsbook, fleet, webhook_receiver):
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    for env in ("prod", "staging", "old"):
        inventory["envs"][env]["monitor"] = {"url": webhook_receiver.url(f"/ping/{TOKEN}/{env}"), "timeout": 2}
    opsbook.write_inventory(inventory)
    result = opsbook.run("backup.check", "--env", "all")
    assert result.exit_code == 3, result
    seen = [(urlsplit(r.path).path.removeprefix(f"/ping/{TOKEN}"), parse_qs(urlsplit(r.path).query)["rid"][0],
             r.body.decode()) for r in webhook_receiver.requests]
    assert [path for path, _rid, _body in seen] == ["/prod/start", "/prod", "/staging/start", "/staging/3"]
    assert seen[0][1] == seen[1][1] != seen[2][1] == seen[3][1]  # each start paired with its own end
    assert "backup.check on prod: succeeded (exit 0)" in seen[1][2]
    assert "backup.check on staging: check failed (exit 3)" in seen[3][2]
    assert "warning" not in result.stderr
    assert_no_secret(opsbook, *fleet["secrets"])
    assert_no_secret("\n".join(body for _path, _rid, body in seen), *fleet["secrets"])


def test_keys_status_on_two_environments_with_their_own_providers(opsbook, s3_server):
    """prod: an aws-iam key moto made just now (fresh); staging: a static key whose age nobody knows (due)."""
    iam_user = f"opsbook-{uuid.uuid4().hex[:8]}"
    key_id, secret = s3_server.create_access_key(iam_user)
    bucket = s3_server.make_bucket().bucket
    opsbook.environ.update({"FLEET_KEY_SECRET": secret.reveal(), "S3_ACCESS_KEY_ID": s3_server.access_key_id,
                            "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key.reveal()})

    def storage(key: str, secret_reference: str) -> dict[str, Any]:
        return {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket,
                "access_key_id": key, "secret_access_key": secret_reference}

    opsbook.write_inventory({"project": "fleet", "default_env": "prod", "envs": {
        "prod": {"storage": storage(key_id, "${env:FLEET_KEY_SECRET}"),
                 "keys": {"provider": "aws-iam", "iam_user": iam_user}},
        "staging": {"storage": storage("${env:S3_ACCESS_KEY_ID}", "${env:S3_SECRET_ACCESS_KEY}")}}})
    result = opsbook.run("keys.status", "--env", "all", "--json")
    assert result.exit_code == 3, result
    prod, staging = result.json()["environments"]
    assert (prod["env"], prod["exit_code"], prod["result"]["provider"]) == ("prod", 0, "aws-iam"), result
    assert prod["result"]["overdue"] is False and prod["result"]["age_days"] < 1
    assert (staging["env"], staging["exit_code"], staging["result"]["overdue"]) == ("staging", 3, True)
    assert summary(result)["prod"] == ["ok", "exit", "0"] and summary(result)["staging"][:2] == ["check", "failed"]
    assert_no_secret(opsbook, secret.reveal(), s3_server.secret_access_key.reveal())


def test_an_interrupt_stops_the_run_and_pings_130_for_the_environment_it_stopped(opsbook, fleet, webhook_receiver):
    """prod's database accepts the connection and never answers: health waits on it when the run is interrupted."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nobody reads them
        inventory = yaml.safe_load(opsbook.inventory.read_text())
        for env in ("prod", "staging"):
            inventory["envs"][env]["monitor"] = {"jobs": {"health": webhook_receiver.url(f"/ping/{TOKEN}/{env}")}}
        opsbook.write_inventory(inventory)
        opsbook.environ["DB_URL_PROD"] = f"postgresql://app:{DEAD_PASSWORD}@127.0.0.1:{silent.getsockname()[1]}/shop"
        process = opsbook.start("health", "--env", "prod,staging")
        try:
            assert select.select([silent], [], [], 60)[0], "health never connected to prod's database"
            process.send_signal(signal.SIGINT)
            result = opsbook.collect(process, timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert result.exit_code == 130, result
    assert "== staging ==" not in result.stderr
    assert summary(result)["prod"] == ["interrupted", "exit", "130"]
    assert summary(result)["staging"] == ["not", "run"]
    paths = [urlsplit(r.path).path.removeprefix(f"/ping/{TOKEN}") for r in webhook_receiver.requests]
    assert paths == ["/prod/start", "/prod/130"], paths
    assert_no_secret(opsbook, *fleet["secrets"])


@pytest.mark.parametrize("task", ["backup", "restore", "deploy.restart"])
def test_a_task_that_changes_things_refuses_a_list_of_environments(opsbook, fleet, webhook_receiver, task):
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    ping = webhook_receiver.url(f"/ping/{TOKEN}")
    inventory["envs"]["prod"]["monitor"] = inventory["envs"]["staging"]["monitor"] = {"url": ping, "jobs": {task: ping}}
    opsbook.write_inventory(inventory)
    for spec in ("all", "prod,staging"):
        refused = opsbook.run(task, "--env", spec)
        assert refused.exit_code == 2, refused
        (line,) = refused.stderr.splitlines()
        assert line.startswith(f"error: {task}: --env takes one environment") and f"inv -h {task}" in line
    as_json = opsbook.run(task, "--env", "all", "--json")
    assert as_json.exit_code == 2 and as_json.json()["exit_code"] == 2, as_json
    assert webhook_receiver.requests == [] and opsbook.journals() == []  # nothing ran, nothing pinged


def readme_commands() -> list[list[str]]:
    text = (REPOSITORY / "README.md").read_text()
    assert text.count(SECTION) == 1, f"README.md must have exactly one {SECTION!r} section"
    block = text.split(SECTION, 1)[1].split("\n#", 1)[0].split("<!-- multi-env commands -->", 1)[1]
    return [shlex.split(line.strip())[1:] for line in block.splitlines() if line.startswith("    inv ")]


def test_the_readme_commands_run_as_written(opsbook, fleet):
    commands = readme_commands()
    assert len(commands) >= 3 and all("--env" in command for command in commands), commands
    for command in commands:
        result = opsbook.run(*command)
        assert result.exit_code == 3, result  # staging is stale and its database does not answer
        assert set(summary(result)) == {"prod", "staging"}, result
        if "--json" in command:
            assert [entry["env"] for entry in result.json()["environments"]] == ["prod", "staging"], result
    assert_no_secret(opsbook, *fleet["secrets"])
