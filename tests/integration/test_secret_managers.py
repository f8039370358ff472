"""Secrets read from managers and kept in them, through the real CLI: `${cmd:…}` with a script playing a
manager CLI, `${aws-sm:…}` and the aws-sm store on moto's Secrets Manager, real PostgreSQL and S3."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import yaml

from tests.cli import Opsbook
from tests.fixtures.managers import manager_cli, manager_settings, secrets_manager
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
