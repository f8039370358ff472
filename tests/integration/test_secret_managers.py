"""Secrets read from managers and kept in them, through the real CLI: `${cmd:…}` with a script playing a
manager CLI, `${aws-sm:…}` and the aws-sm store on moto's Secrets Manager, real PostgreSQL and S3."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ops.envfile import parse_env_file
from ops.keys import verify_admin_password
from ops.secret_store import SecretStore
from ops.secrets import Secret, mask_identifier
from tests.cli import Opsbook, wait_for
from tests.fixtures.managers import manager_cli, manager_settings, secrets_manager, serve_kubernetes_api
from tests.fixtures.provision import iam_keys
from tests.fixtures.s3 import refused
from tests.fixtures.secrets import assert_no_secret


def statuses(result: Any) -> dict[str, str]:
    return {check["name"]: check["status"] for check in result.json()["checks"]}


def error_line(result: Any) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("error:"))


@pytest.fixture
def referenced(opsbook: Opsbook, postgres_server: Any, s3_server: Any) -> dict[str, Any]:
    """Environment `web`: its database URL from a manager CLI, its storage secret from Secrets Manager."""
    database_url = postgres_server.create_database()
    planted = f"planted-{uuid.uuid4().hex}"
    script = manager_cli(opsbook.root / "bin", {"db": database_url.reveal(), "planted": planted})
    name = f"opsbook-test/{uuid.uuid4().hex[:8]}"
    secrets_manager(s3_server).create_secret(Name=name, SecretString=json.dumps(
        {"s3": s3_server.secret_access_key.reveal(), "unused": planted}))
    bucket = s3_server.make_bucket()
    opsbook.environ.update({"SM_KEY_ID": s3_server.access_key_id, "SM_SECRET": s3_server.secret_access_key.reveal()})
    inventory = {"project": "managers", "default_env": "web", "envs": {"web": {
        "secret_managers": {**manager_settings(s3_server), "command_timeout_seconds": 2},
        "database": {"url": f"${{cmd:{script} read db}}"},
        "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket.bucket,
                    "access_key_id": s3_server.access_key_id, "secret_access_key": f"${{aws-sm:{name}#s3}}"},
    }}}
    opsbook.write_inventory(inventory)
    return {"inventory": inventory, "script": script, "name": name, "planted": planted,
            "secrets": [database_url.reveal(), postgres_server.password.reveal(), planted,
                        s3_server.secret_access_key.reveal()]}


def rewrite(opsbook: Opsbook, inventory: dict[str, Any], path: str, value: str) -> None:
    changed = yaml.safe_load(yaml.safe_dump(inventory))
    node = changed["envs"]["web"]
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    opsbook.write_inventory(changed)


def test_references_resolve_from_a_manager_cli_and_secrets_manager(opsbook, referenced):
    result = opsbook.run("health", "--env", "web", "--json")
    assert result.exit_code == 0, result
    assert statuses(result) == {"database": "pass", "storage bucket": "pass"}

    shown = opsbook.run("inventory.show", "--env", "web", "--json")
    assert shown.exit_code == 0, shown
    config = shown.json()["config"]
    assert config["database"]["url"] == f"*** (from ${{cmd:{referenced['script']} read db}})"
    assert config["storage"]["secret_access_key"] == f"*** (from ${{aws-sm:{referenced['name']}#s3}})"
    assert_no_secret(opsbook, *referenced["secrets"])


def test_a_failing_or_hanging_command_is_one_line_naming_the_reference(opsbook, referenced):
    script, inventory = referenced["script"], referenced["inventory"]
    rewrite(opsbook, inventory, "database.url", f"${{cmd:{script} fail}}")
    failed = opsbook.run("health", "--env", "web")
    assert failed.exit_code == 2, failed
    line = error_line(failed)
    assert "envs.web.database.url" in line and f"${{cmd:{script} fail}}" in line and "exited 4" in line, line

    rewrite(opsbook, inventory, "database.url", f"${{cmd:{script} hang}}")
    started = time.monotonic()
    hung = opsbook.run("health", "--env", "web")
    assert hung.exit_code == 2 and time.monotonic() - started < 20, hung
    assert "did not finish within 2s" in error_line(hung), hung

    rewrite(opsbook, inventory, "database.url", "${cmd:/nonexistent/manager read db}")
    missing = opsbook.run("health", "--env", "web")
    assert missing.exit_code == 2 and "not found" in error_line(missing), missing

    rewrite(opsbook, inventory, "database.url", "${cmd:manager 'unbalanced}")
    malformed = opsbook.run("inventory.check")
    assert malformed.exit_code == 2 and "cannot be split into words" in malformed.stderr, malformed
    assert "Traceback" not in "\n".join(opsbook.transcript)
    assert_no_secret(opsbook, *referenced["secrets"])


def test_a_missing_secret_or_json_key_names_the_reference(opsbook, referenced):
    name, inventory = referenced["name"], referenced["inventory"]
    rewrite(opsbook, inventory, "storage.secret_access_key", "${aws-sm:opsbook-test/no-such-secret}")
    missing = opsbook.run("health", "--env", "web")
    assert missing.exit_code == 2, missing
    line = error_line(missing)
    assert "envs.web.storage.secret_access_key" in line and "${aws-sm:opsbook-test/no-such-secret}" in line
    assert "has no secret 'opsbook-test/no-such-secret'" in line, line

    rewrite(opsbook, inventory, "storage.secret_access_key", f"${{aws-sm:{name}#nope}}")
    no_key = opsbook.run("health", "--env", "web")
    assert no_key.exit_code == 2, no_key
    assert f"secret '{name}' has no key 'nope'" in error_line(no_key), no_key
    assert "s3, unused" in no_key.stderr  # the keys it has, named, never their values
    assert "Traceback" not in "\n".join(opsbook.transcript)
    assert_no_secret(opsbook, *referenced["secrets"])


# --- the aws-sm store: one secret per environment, the same state from every machine ------------------------

LEASE_SECONDS = 2  # a killed run's lease is taken over 3 s after its last renewal
STORE_KEYS = {"DATABASE_PASSWORD", "STORAGE_ACCESS_KEY_ID", "STORAGE_SECRET_ACCESS_KEY", "AUTH_SECRET",
              "ADMIN_PASSWORD_HASH"}


def kept(client: Any, name: str, stage: str = "AWSCURRENT") -> dict[str, str]:
    return json.loads(client.get_secret_value(SecretId=name, VersionStage=stage)["SecretString"])


def applied(workspace: Opsbook, step: str) -> bool:
    journals = workspace.journals()
    return bool(journals) and any(e.get("step") == step and e.get("state") == "applied"
                                  for e in workspace.journal(journals[-1].stem))


@pytest.fixture
def managed(opsbook: Opsbook, fresh: dict[str, Any], s3_server: Any, tmp_path: Any) -> dict[str, Any]:
    """`fresh` with its store in Secrets Manager (signed with the auditor's allow-all IAM key, as an
    operator's or a job's role would), a value planted there for the app, and a second machine."""
    name = f"opsbook-test/{fresh['role']}/staging"
    client = secrets_manager(s3_server, fresh["auditor"])
    planted = f"planted-{uuid.uuid4().hex}"
    client.create_secret(Name=f"{name}-app", SecretString=json.dumps({"greeting": planted}))
    opsbook.environ.update({"SM_KEY_ID": fresh["auditor"][0], "SM_SECRET": fresh["auditor"][1].reveal()})
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    staging = inventory["envs"]["staging"]
    staging.update({"secret_managers": manager_settings(s3_server), "secrets": {"store": "aws-sm", "aws_secret": name},
                    "locks": {"lease_seconds": LEASE_SECONDS}})
    staging["hosts"][0]["app"]["env"]["GREETING"] = f"${{aws-sm:{name}-app#greeting}}"
    opsbook.write_inventory(inventory)
    second = Opsbook(tmp_path / "second")
    second.root.mkdir()
    second.environ.update(opsbook.environ)
    second.write_inventory(inventory)
    return {"name": name, "client": client, "planted": planted, "second": second}


def test_the_aws_sm_store_is_shared_by_two_machines_and_resumes_a_killed_rotation(opsbook, fresh, managed,
                                                                                    s3_server, postgres_server):
    first, second, client, name, host = opsbook, managed["second"], managed["client"], managed["name"], fresh["host"]
    provisioned = first.run("provision")
    assert provisioned.exit_code == 0, provisioned
    assert not (first.state_dir / "secrets").exists()
    provisioned_map = kept(client, name)
    assert set(provisioned_map) >= STORE_KEYS, sorted(provisioned_map)
    versions = client.list_secret_version_ids(SecretId=name)["Versions"]
    assert len(versions) > 1 and any("AWSPREVIOUS" in v["VersionStages"] for v in versions), versions
    values = parse_env_file(host.env_file.read_text())
    assert values["S3_ACCESS_KEY_ID"] == provisioned_map["STORAGE_ACCESS_KEY_ID"]
    assert values["GREETING"] == managed["planted"]  # the app gets it; opsbook never shows it

    # A rotation killed once its new key is in the manager, finished by the second machine from there.
    process = first.start("keys.rotate")
    wait_for(lambda: applied(first, "create-key") or process.poll() is not None, timeout=60, what="create-key")
    process.kill()
    first.collect(process)
    during = kept(client, name)
    assert {"STORAGE_NEXT_ACCESS_KEY_ID", "STORAGE_PREVIOUS_ACCESS_KEY_ID"} & set(during), sorted(during)
    time.sleep(LEASE_SECONDS + 2)
    finished = second.run("keys.rotate")
    assert finished.exit_code == 0, finished
    rotated_map = kept(client, name)
    new_key = (rotated_map["STORAGE_ACCESS_KEY_ID"], rotated_map["STORAGE_SECRET_ACCESS_KEY"])
    assert new_key[0] != provisioned_map["STORAGE_ACCESS_KEY_ID"]
    assert not any(key.startswith(("STORAGE_NEXT", "STORAGE_PREVIOUS")) for key in rotated_map), sorted(rotated_map)
    assert iam_keys(s3_server, fresh) == [new_key[0]]
    assert refused(s3_server, fresh["bucket"], provisioned_map["STORAGE_ACCESS_KEY_ID"],
                   Secret(provisioned_map["STORAGE_SECRET_ACCESS_KEY"])) == "InvalidAccessKeyId"
    assert parse_env_file(host.env_file.read_text())["S3_ACCESS_KEY_ID"] == new_key[0]

    # The admin password: a new hash, the one before kept as the previous version.
    admin = first.run("secrets.rotate", "--name", "ADMIN_PASSWORD")
    assert admin.exit_code == 0, admin
    password = admin.stderr.split("password manager):", 1)[1].split()[0]
    assert verify_admin_password(Secret(password), kept(client, name)["ADMIN_PASSWORD_HASH"])
    assert kept(client, name, "AWSPREVIOUS")["ADMIN_PASSWORD_HASH"] == rotated_map["ADMIN_PASSWORD_HASH"]

    # The second machine sees the same key and secrets, and backs up with the rotated key.
    statuses = [workspace.run("keys.status", "--json") for workspace in (first, second)]
    assert all(result.exit_code == 0 for result in statuses), statuses
    assert statuses[0].json()["key_id"] == statuses[1].json()["key_id"] == mask_identifier(new_key[0])
    backup = second.run("backup")
    assert backup.exit_code == 0, backup
    notices = second.state_dir / "notices.md"  # a failed backup tells the channels: nothing leaks there either
    broken = yaml.safe_load(second.inventory.read_text())
    broken["envs"]["staging"]["notify"] = [{"kind": "file", "path": str(notices)}]
    database = broken["envs"]["staging"]["database"]  # nothing listens there; the password comes from the store
    database["url"] = database["url"].replace(f":{postgres_server.port}/", ":1/")
    second.write_inventory(broken)
    failed = second.run("backup")
    assert failed.exit_code == 3 and "backup" in notices.read_text(), failed
    second.write_inventory(yaml.safe_load(first.inventory.read_text()))
    reports = [workspace.run("secrets.status", "--json") for workspace in (first, second)]
    assert all(result.exit_code == 0 for result in reports), reports
    assert reports[0].json() == reports[1].json()
    listed = {entry["name"]: entry for entry in reports[1].json()["secrets"]}
    assert set(listed) >= STORE_KEYS and reports[1].json()["store"] == {"kind": "aws-sm", "location": (
        f"AWS Secrets Manager secret {name}")}
    assert listed["ADMIN_PASSWORD_HASH"]["rotation"] == "secrets.rotate --name ADMIN_PASSWORD"
    assert listed["STORAGE_ACCESS_KEY_ID"]["rotation"] == "keys.rotate"
    assert listed["hosts.0.app.env.GREETING"]["source"] == f"${{aws-sm:{name}-app#greeting}}"

    final = kept(client, name)
    for workspace in (first, second):
        assert not (workspace.state_dir / "secrets").exists()
        produced = workspace.everything_produced()
        assert produced.count(password) == (1 if workspace is first else 0)
        assert_no_secret(produced, managed["planted"], *fresh["secrets"],
                         *(value for value in {**provisioned_map, **during, **final}.values() if len(value) > 8))


# --- secrets.status and secrets.move on the file store ------------------------------------------------------


def test_secrets_status_and_moving_the_file_store_into_secrets_manager(opsbook, staging, s3_server):
    values = {"DATABASE_PASSWORD": f"db-{uuid.uuid4().hex}", "AUTH_SECRET": f"auth-{uuid.uuid4().hex}"}
    store = SecretStore(opsbook.state_dir, "prod")
    store.update({key: Secret(value) for key, value in values.items()})
    old = time.time() - 3 * 86400
    os.utime(store.path, (old, old))
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["prod"]["secrets"] = {"max_age_days": {"AUTH_SECRET": 2}}
    opsbook.write_inventory(inventory)

    due = opsbook.run("secrets.status", "--env", "prod", "--json")
    assert due.exit_code == 3, due
    assert due.json()["overdue"] == ["AUTH_SECRET"] and "AUTH_SECRET of prod past its rotation age" in due.stderr
    listed = {entry["name"]: entry for entry in due.json()["secrets"]}
    assert listed["AUTH_SECRET"]["rotation"] == "secrets.rotate --name AUTH_SECRET"
    assert listed["DATABASE_PASSWORD"]["source"] == "the store (prod.env)"
    assert not listed["DATABASE_PASSWORD"]["overdue"]
    assert listed["database.admin_url"]["source"] == "${env:ADMIN_DATABASE_URL}"
    assert "AUTH_SECRET: from the store (prod.env); changed " in due.stderr and "3 days ago" in due.stderr

    # The move needs the inventory to name the manager first: opsbook reads the store it names.
    unnamed = opsbook.run("secrets.move", "--env", "prod", "--to", "aws-sm", "--confirm", "prod")
    assert unnamed.exit_code == 2 and "secrets.store is file, not aws-sm" in unnamed.stderr, unnamed
    name = f"opsbook-test/{uuid.uuid4().hex[:8]}/prod"
    opsbook.environ.update({"SM_KEY_ID": s3_server.access_key_id, "SM_SECRET": s3_server.secret_access_key.reveal()})
    inventory["envs"]["prod"].update({"secret_managers": manager_settings(s3_server),
                                      "secrets": {"store": "aws-sm", "aws_secret": name}})
    opsbook.write_inventory(inventory)
    client = secrets_manager(s3_server)

    planned = opsbook.run("secrets.move", "--env", "prod", "--to", "aws-sm", "--dry-run")
    assert planned.exit_code == 0, planned
    assert f"would copy 2 entries from prod.env into AWS Secrets Manager secret {name}" in planned.stderr, planned
    assert "AUTH_SECRET (value never shown)" in planned.stderr and f"would remove {store.path}" in planned.stderr
    assert store.path.exists() and name not in {s["Name"] for s in client.list_secrets()["SecretList"]}
    refused = opsbook.run("secrets.move", "--env", "prod", "--to", "aws-sm")
    assert refused.exit_code == 2 and "--confirm prod" in refused.stderr and store.path.exists(), refused

    moved = opsbook.run("secrets.move", "--env", "prod", "--to", "aws-sm", "--confirm", "prod", "--json")
    assert moved.exit_code == 0 and moved.json()["status"] == "succeeded", moved
    assert kept(client, name) == values and not store.path.exists()
    again = opsbook.run("secrets.move", "--env", "prod", "--to", "aws-sm", "--confirm", "prod", "--json")
    assert again.exit_code == 0 and again.json()["status"] == "nothing to do", again
    now_in_manager = opsbook.run("secrets.status", "--env", "prod", "--json")
    assert now_in_manager.json()["store"]["kind"] == "aws-sm", now_in_manager
    assert {e["name"] for e in now_in_manager.json()["secrets"]} >= set(values)
    assert_no_secret(opsbook, *values.values(), *staging["secrets"])


# --- the kubernetes store: the Secret the CronJobs read, written through the API ----------------------------


@pytest.fixture
def kubernetes_api() -> Any:
    api = serve_kubernetes_api(f"token-{uuid.uuid4().hex}")
    yield api
    api.server.shutdown()


def test_moving_the_file_store_into_the_kubernetes_secret_the_cronjobs_read(opsbook, staging, kubernetes_api):
    values = {"DATABASE_PASSWORD": f"db-{uuid.uuid4().hex}", "AUTH_SECRET": f"auth-{uuid.uuid4().hex}"}
    SecretStore(opsbook.state_dir, "staging").update({key: Secret(value) for key, value in values.items()})
    kubernetes_api.secrets[("shop", "opsbook-staging")] = {  # the Secret as `kubectl create secret` left it
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "opsbook-staging", "namespace": "shop", "resourceVersion": "1"},
        "data": {"S3_SECRET_ACCESS_KEY": "b3BlcmF0b3ItcHV0LXRoaXM="}}
    opsbook.environ["K8S_TOKEN"] = kubernetes_api.token
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["staging"].update({
        "schedule": {"kubernetes": {"image": "ghcr.io/acme/opsbook:1", "namespace": "shop"}},
        "secrets": {"store": "kubernetes", "kubernetes": {"api": kubernetes_api.url, "token": "${env:K8S_TOKEN}"}}})
    opsbook.write_inventory(inventory)

    moved = opsbook.run("secrets.move", "--to", "kubernetes", "--json")
    assert moved.exit_code == 0 and moved.json()["status"] == "succeeded", moved
    assert "Kubernetes Secret shop/opsbook-staging" in moved.stderr
    assert not SecretStore(opsbook.state_dir, "staging").path.exists()
    written = kubernetes_api.secrets[("shop", "opsbook-staging")]
    data = {key: base64.b64decode(value).decode() for key, value in written["data"].items()}
    assert data == {**values, "S3_SECRET_ACCESS_KEY": "operator-put-this"}  # the operator's key kept
    assert kubernetes_api.received, "nothing was written through the API"
    for document in kubernetes_api.received:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)

    status = opsbook.run("secrets.status", "--json")
    assert status.exit_code == 0 and status.json()["store"]["kind"] == "kubernetes", status
    assert {e["name"] for e in status.json()["secrets"]} >= set(values)
    opsbook.environ["K8S_TOKEN"] = "wrong-token"
    refused = opsbook.run("secrets.status")
    assert refused.exit_code == 1 and "the API answered 401" in refused.stderr, refused
    assert_no_secret(opsbook, *values.values(), kubernetes_api.token, *staging["secrets"])
