"""inv health against real PostgreSQL, S3, sshd and app hosts; inventory errors through the CLI."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.cli import Opsbook


@pytest.fixture
def web(opsbook: Opsbook, postgres_server: Any, s3_server: Any, app_hosts: list[Any]) -> dict[str, Any]:
    """Environment `web`: the database, a bucket, two app hosts whose apps run and answer."""
    bucket = s3_server.make_bucket()
    database_url = postgres_server.create_database()
    for host in app_hosts:
        host.env_file.write_text(f"DATABASE_URL={database_url.reveal()}\n")
        subprocess.run(host.restart_command, shell=True, check=True, capture_output=True, timeout=60)
    opsbook.environ.update({"WEB_DATABASE_URL": database_url.reveal(),
                            "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key.reveal()})
    opsbook.write_inventory({
        "project": "healthtest", "default_env": "web",
        "envs": {"web": {
            "database": {"url": "${env:WEB_DATABASE_URL}"},
            "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                        "bucket": bucket.bucket, "access_key_id": s3_server.access_key_id,
                        "secret_access_key": "${env:S3_SECRET_ACCESS_KEY}"},
            "ssh": {"user": app_hosts[0].host.user, "port": app_hosts[0].host.port,
                    "key_file": app_hosts[0].host.key_filename},
            "hosts": [{"name": h.name, "address": "127.0.0.1",
                       "app": {"health_url": h.health_url, "ready_url": h.ready_url}} for h in app_hosts],
        }},
    })
    return {"hosts": app_hosts, "secrets": [database_url.reveal(), postgres_server.password.reveal(),
                                            s3_server.secret_access_key.reveal()]}


def statuses(result) -> dict[str, str]:
    return {check["name"]: check["status"] for check in result.json()["checks"]}


def test_health_passes_on_a_healthy_environment(opsbook, web):
    result = opsbook.run("health", "--env", "web", "--json")
    assert result.exit_code == 0, result
    assert statuses(result) == {
        "database": "pass", "storage bucket": "pass", "host web1": "pass", "host web2": "pass",
        "app health on web1": "pass", "app ready on web1": "pass",
        "app health on web2": "pass", "app ready on web2": "pass"}
    assert "PostgreSQL 1" in result.stderr
    assert all(secret not in opsbook.everything_produced() for secret in web["secrets"])


def test_health_names_each_broken_part(opsbook, web):
    web["hosts"][1].stop()
    result = opsbook.run("health", "--env", "web", "--json")
    assert result.exit_code == 3, result
    failed = {name for name, status in statuses(result).items() if status == "fail"}
    assert failed == {"app health on web2", "app ready on web2"}
    assert "web2" in result.stderr and "health of web: 2 of 8 checks failed" in result.stderr

    opsbook.environ["WEB_DATABASE_URL"] = "postgresql://nobody:wrong-password-123@127.0.0.1:1/none"
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["web"]["ssh"]["port"] = 1  # nothing listens there
    opsbook.write_inventory(inventory)
    result = opsbook.run("health", "--env", "web", "--json")
    assert result.exit_code == 3
    failed = {name for name, status in statuses(result).items() if status == "fail"}
    assert {"database", "host web1", "host web2"} <= failed
    assert "127.0.0.1:1" in result.stderr
    assert "wrong-password-123" not in result.output
    assert "Traceback" not in result.output


def test_inventory_check_reports_all_three_mistakes(opsbook):
    opsbook.write_inventory(
        "project: x\n"
        "envs:\n"
        "  prod:\n"
        "    protectd: true\n"
        "    database: {}\n"
        "    storage: {provider: gcs, bucket: b}\n")
    result = opsbook.run("inventory.check")
    assert result.exit_code == 2, result
    assert "has 3 problem(s)" in result.stderr
    assert "envs.prod.protectd: unknown key; did you mean 'protected'? (line 4)" in result.stderr
    assert "envs.prod.database.url: required (line 5)" in result.stderr
    assert "envs.prod.storage.provider: 'gcs' is not one of" in result.stderr
    assert "Traceback" not in result.output


def test_inventory_check_refuses_broken_urls_duplicate_hosts_and_unknown_default(opsbook):
    opsbook.write_inventory(
        "project: x\n"
        "default_env: prd\n"
        "envs:\n"
        "  prod:\n"
        "    database: {url: '://app:cli-secret-pw@db/app'}\n"
        "    storage: {provider: s3, bucket: b, endpoint: 'not a url:9000'}\n"
        "    hosts:\n"
        "      - {name: web1, address: 10.0.0.5}\n"
        "      - {name: web1, address: 10.0.0.6}\n"
        "  staging: {database: {url: '${env:STAGING_DB_URL}'}}\n")
    result = opsbook.run("inventory.check")
    assert result.exit_code == 2, result
    assert "has 4 problem(s)" in result.stderr, result
    assert "default_env: names no environment ('prd'); did you mean 'prod'? known environments: prod, staging " \
           "(line 2)" in result.stderr
    assert "envs.prod.database.url: not a URL: no scheme" in result.stderr
    assert "envs.prod.storage.endpoint: not a URL: no scheme" in result.stderr
    assert "envs.prod.hosts.1.name: 'web1' is also the name of envs.prod.hosts.0" in result.stderr
    assert [line for line in result.stderr.splitlines() if "envs.prod." in line and "(line " not in line] == []
    assert "cli-secret-pw" not in result.output and "Traceback" not in result.output

    # A reference is checked when a task resolves it: the error names the reference and key, never the value.
    fixes = {"prd": "prod", "'://app:cli-secret-pw@db/app'": "'postgresql://app@db/app'",
             "'not a url:9000'": "'http://127.0.0.1:9'",
             "name: web1, address: 10.0.0.6": "name: web2, address: 10.0.0.6"}
    text = opsbook.inventory.read_text()
    for broken, fixed in fixes.items():
        text = text.replace(broken, fixed)
    opsbook.write_inventory(text)
    assert opsbook.run("inventory.check").exit_code == 0
    opsbook.environ["STAGING_DB_URL"] = "://app:cli-resolved-pw@db/app"
    result = opsbook.run("health", "--env", "staging")
    assert result.exit_code == 2, result
    first_line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert "inventory.yaml, line 10" in first_line and "envs.staging.database.url" in first_line, first_line
    assert "${env:STAGING_DB_URL}" in first_line and "not a URL" in first_line, first_line
    assert "cli-resolved-pw" not in opsbook.everything_produced() and "Traceback" not in result.output


def test_unset_reference_and_syntax_error_are_one_clear_line(opsbook):
    opsbook.write_inventory("project: x\nenvs:\n  prod:\n    database: {url: '${env:PROD_DB_URL}'}\n")
    result = opsbook.run("health", "--env", "prod")
    assert result.exit_code == 2, result
    first_line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert "inventory.yaml, line 4" in first_line and "envs.prod.database.url" in first_line
    assert "${env:PROD_DB_URL} is not set" in first_line

    opsbook.write_inventory("project: x\nenvs:\n  prod: {database: {url: x}\n")
    result = opsbook.run("inventory.check")
    assert result.exit_code == 2 and "YAML syntax error" in result.stderr and "line 4" in result.stderr

    opsbook.write_inventory("project: x\nenvs:\n  prod: {}\n")
    result = opsbook.run("health", "--env", "nope")
    assert result.exit_code == 2 and "no environment named 'nope'" in result.stderr


def test_inventory_show_masks_secrets(opsbook, web):
    result = opsbook.run("inventory.show", "--env", "web")
    assert result.exit_code == 0, result
    assert "*** (from ${env:WEB_DATABASE_URL})" in result.stdout
    assert all(secret not in result.output for secret in web["secrets"])
