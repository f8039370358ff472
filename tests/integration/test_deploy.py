"""deploy.push-env / deploy.restart / deploy.rollback against a real sshd, test apps, PostgreSQL and moto S3."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ops import inventory
from ops.envfile import parse_env_file, render_env_file
from ops.secret_store import SecretStore
from ops.secrets import Secret
from tests.cli import Opsbook
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.ssh import AppHost, SshServer, host_entry

BROKEN_DATABASE_URL = "postgresql://nobody@127.0.0.1:1/nothing"


@pytest.fixture
def deploy_env(opsbook: Opsbook, ssh_server: SshServer, postgres_server: Any, s3_server: Any,
               app_host_factory: Callable[..., list[AppHost]]) -> Callable[..., dict[str, Any]]:
    """make(host_app={"web2": {...}}) -> the workspace's `staging` on three app hosts, and its secrets."""

    def make(host_app: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        hosts = app_host_factory(("web1", "web2", "web3"))
        database_url = postgres_server.create_database(f"deploy_{uuid.uuid4().hex[:8]}")
        bucket = s3_server.make_bucket()
        opsbook.environ.update({"APP_DATABASE_URL": database_url.reveal(),
                                "APP_S3_SECRET": s3_server.secret_access_key.reveal()})
        staging = {
            "database": {"url": "${env:APP_DATABASE_URL}"},
            "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": s3_server.region,
                        "bucket": bucket.bucket, "access_key_id": s3_server.access_key_id,
                        "secret_access_key": "${env:APP_S3_SECRET}"},
            "hosts": [host_entry(ssh_server, h, **(host_app or {}).get(h.name, {})) for h in hosts],
            "app": {"health_timeout": 10, "env": {"NODE_ENV": "production"}},
        }
        opsbook.write_inventory({"project": "deploytest", "default_env": "staging", "envs": {"staging": staging}})
        return {"hosts": {h.name: h for h in hosts}, "database_url": database_url,
                "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal()]}

    return make


def load_env(opsbook: Opsbook, monkeypatch: pytest.MonkeyPatch) -> inventory.Environment:
    for key, value in opsbook.process_environment().items():
        if key.startswith(("OPS_", "APP_")):
            monkeypatch.setenv(key, value)
    return inventory.load(opsbook.inventory).environment("staging")


# --- push-env ------------------------------------------------------------------------------


def test_push_env_writes_each_host_once_with_prev_and_masked_plan(
        opsbook: Opsbook, deploy_env: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    setup = deploy_env()
    hosts: dict[str, AppHost] = setup["hosts"]
    hosts["web1"].env_file.write_text("OLD=1\n")

    dry = opsbook.run("deploy.push-env", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "would update" in dry.stderr and "would create" in dry.stderr
    assert "+ S3_SECRET_ACCESS_KEY=***" in dry.stderr and "- OLD" in dry.stderr
    assert hosts["web1"].env_file.read_text() == "OLD=1\n"
    assert not hosts["web2"].env_file.exists()

    first = opsbook.run("deploy.push-env", "--json")
    assert first.exit_code == 0, first
    assert first.json()["status"] == "succeeded"
    env = load_env(opsbook, monkeypatch)
    for name, app_host in hosts.items():
        text = app_host.env_file.read_text()
        assert text == render_env_file(env, name)
        values = parse_env_file(text)
        assert values["DATABASE_URL"] == setup["database_url"].reveal()
        assert values["S3_SECRET_ACCESS_KEY"] == setup["secrets"][1]
        assert values["NODE_ENV"] == "production"
        assert stat.S_IMODE(app_host.env_file.stat().st_mode) == 0o600
        assert not list(app_host.app_dir.glob("*.tmp-*"))
    assert (hosts["web1"].app_dir / ".env.prev").read_text() == "OLD=1\n"

    again = opsbook.run("deploy.push-env")
    assert again.exit_code == 0 and "nothing to do" in again.stderr, again

    hosts["web2"].env_file.chmod(0o644)
    before = hosts["web2"].env_file.read_text()
    loosened = opsbook.run("deploy.push-env")
    assert loosened.exit_code == 0 and "set mode 0600" in loosened.stderr, loosened
    assert stat.S_IMODE(hosts["web2"].env_file.stat().st_mode) == 0o600
    assert hosts["web2"].env_file.read_text() == before

    # A secret stored after the steps were planned once is what the next run writes.
    auth_secret = f"auth-{uuid.uuid4().hex}"
    SecretStore(opsbook.state_dir, "staging").set("AUTH_SECRET", Secret(auth_secret))
    third = opsbook.run("deploy.push-env")
    assert third.exit_code == 0, third
    assert "+ NEXTAUTH_SECRET=***" in third.stderr
    assert parse_env_file(hosts["web3"].env_file.read_text())["BETTER_AUTH_SECRET"] == auth_secret
    assert "AUTH_SECRET" not in (hosts["web3"].app_dir / ".env.prev").read_text()
    assert_no_secret(opsbook, *setup["secrets"], auth_secret)


READER = """
import hashlib, json, os, sys
path, stop = sys.argv[1], sys.argv[2]
seen = {}
while not os.path.exists(stop):
    try:
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
    except FileNotFoundError:
        continue
    seen[digest] = seen.get(digest, 0) + 1
print(json.dumps(seen))
"""


def test_a_reader_never_sees_a_partial_env_file(
        opsbook: Opsbook, deploy_env: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    import hashlib
    import json
    import subprocess
    import sys

    from ops.cli import execute
    from ops.deploy_steps import PushEnvStep
    from ops.engine import Runbook
    from ops.output import Output

    # A plain (not secret) value large enough that a non-atomic write would be seen half-way.
    setup = deploy_env({"web1": {"env": {"PADDING": "p" * 300_000}}})
    env = load_env(opsbook, monkeypatch)
    store = SecretStore(env.inventory.state_dir, env.name)
    path: Path = setup["hosts"]["web1"].env_file
    versions = [Secret(f"auth-{letter}-{uuid.uuid4().hex}") for letter in "ab"]
    complete: set[str] = set()
    for version in versions:
        store.set("AUTH_SECRET", version)
        complete.add(hashlib.sha256(render_env_file(env, "web1").encode()).hexdigest())

    stop = tmp_path / "stop-reading"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        with open(os.devnull, "w") as quiet:
            for round_ in range(4):
                store.set("AUTH_SECRET", versions[round_ % 2])
                runbook = Runbook("deploy.push-env", "push-env on web1", [PushEnvStep("web1")])
                execute(runbook, env, Output(stream=quiet))
    finally:
        stop.touch()
        seen = json.loads(reader.communicate(timeout=30)[0])
    assert sum(seen.values()) > 10
    partial = {digest: count for digest, count in seen.items() if digest not in complete}
    assert not partial, f"{sum(partial.values())} of {sum(seen.values())} reads saw a partial file"
    assert set(seen) == complete


# --- rolling restart -----------------------------------------------------------------------


def test_rolling_restart_stops_at_the_failure_threshold_and_names_the_host(
        opsbook: Opsbook, deploy_env: Callable[..., dict[str, Any]]) -> None:
    setup = deploy_env({"web2": {"env": {"DATABASE_URL": BROKEN_DATABASE_URL}, "health_timeout": 1}})
    hosts: dict[str, AppHost] = setup["hosts"]
    assert opsbook.run("deploy.push-env").exit_code == 0

    stopped = opsbook.run("deploy.restart", "--json")
    assert stopped.exit_code == 1, stopped
    report = {entry["host"]: entry for entry in stopped.json()["hosts"]}
    assert {name: entry["status"] for name, entry in report.items()} == {
        "web1": "restarted", "web2": "failed", "web3": "not attempted"}
    assert hosts["web2"].health_url in report["web2"]["detail"]
    assert "web2" in stopped.stderr and "more than --max-fail 0" in stopped.stderr
    assert "not attempted: web3" in stopped.stderr
    assert hosts["web1"].pid() is not None and hosts["web3"].pid() is None

    tolerated = opsbook.run("deploy.restart", "--max-fail", "1", "--batch", "3", "--json")
    assert tolerated.exit_code == 0, tolerated
    statuses = {entry["host"]: entry["status"] for entry in tolerated.json()["hosts"]}
    assert statuses == {"web1": "restarted", "web2": "failed", "web3": "restarted"}
    assert "within --max-fail 1" in tolerated.stderr
    assert hosts["web3"].pid() is not None

    # push-env --restart restarts only what needs it: web2, still unhealthy, so it stops there.
    only_broken = opsbook.run("deploy.push-env", "--restart", "--dry-run")
    assert "would restart web2 (1 of 3 host(s)" in only_broken.stderr, only_broken
    assert_no_secret(opsbook, *setup["secrets"])


# --- rollback ------------------------------------------------------------------------------


def make_releases(app_host: AppHost, releases: dict[str, list[str]], current: str) -> None:
    for release, migrations in releases.items():
        for migration in migrations:
            folder = app_host.app_dir / "releases" / release / "prisma" / "migrations" / migration
            folder.mkdir(parents=True)
            (folder / "migration.sql").write_text("SELECT 1;\n")
    (app_host.app_dir / "current").symlink_to(f"releases/{current}")


def record_applied(database_url: Secret, names: list[str]) -> None:
    import psycopg

    from ops.migrations import CREATE_MIGRATIONS_TABLE

    with psycopg.connect(database_url.reveal(), autocommit=True) as connection:
        connection.execute(CREATE_MIGRATIONS_TABLE)
        for name in names:
            connection.execute("INSERT INTO _prisma_migrations (id, checksum, finished_at, migration_name,"
                               " applied_steps_count) VALUES (%s, %s, now(), %s, 1)",
                               (str(uuid.uuid4()), "0" * 64, name))


def test_rollback_switches_current_restarts_and_warns_about_a_newer_schema(
        opsbook: Opsbook, deploy_env: Callable[..., dict[str, Any]]) -> None:
    setup = deploy_env()
    hosts: dict[str, AppHost] = setup["hosts"]
    releases = {"20250101": ["m1_init"], "20250201": ["m1_init", "m2_drafts"]}
    for app_host in hosts.values():
        make_releases(app_host, releases, current="20250201")
    record_applied(setup["database_url"], ["m1_init", "m2_drafts"])
    started = opsbook.run("deploy.push-env", "--restart", "--batch", "3")
    assert started.exit_code == 0, started
    pids = {name: h.pid() for name, h in hosts.items()}
    assert all(pids.values())

    dry = opsbook.run("deploy.rollback", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "does not know (m2_drafts)" in dry.stderr
    assert all(os.readlink(h.app_dir / "current") == "releases/20250201" for h in hosts.values())

    rolled = opsbook.run("deploy.rollback", "--json")
    assert rolled.exit_code == 0, rolled
    assert "warning: the database has 1 migration(s) release 20250101 does not know (m2_drafts)" in rolled.stderr
    for name, app_host in hosts.items():
        assert os.readlink(app_host.app_dir / "current") == "releases/20250101"
        assert app_host.pid() not in (None, pids[name])  # restarted
    assert [entry["status"] for entry in rolled.json()["hosts"]] == ["restarted"] * 3

    nothing_older = opsbook.run("deploy.rollback")
    assert nothing_older.exit_code == 3, nothing_older
    assert "no previous release to roll back to" in nothing_older.stderr
    assert "Traceback" not in nothing_older.output
    assert_no_secret(opsbook, *setup["secrets"])
