"""One environment's whole life, run the way its operators run it, through the real CLI on the suite's servers.

`prod` is protected and gets its storage keys from aws-iam on moto's IAM server with credentials enforced; the
inventory's storage key belongs to the IAM user named in `keys.iam_user`. Its app runs on an sshd host, its
database on the session's PostgreSQL. `staging` is the second environment, where prod's backups are restored
and drilled. One run, stage after stage, each followed by what an operator would look at:

provision → migrate.status → migrate → deploy.push-env → deploy.restart → backup → restore into staging →
drill → keys.rotate → secrets.rotate → incident open/update/resolve → decommission
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ops.demo.seed import MIGRATIONS_DIR, image_objects
from ops.envfile import parse_env_file
from ops.keys import verify_admin_password
from ops.secrets import Secret
from tests.cli import REPOSITORY, CliResult, Opsbook, http_status
from tests.fixtures.postgres import row_counts
from tests.fixtures.s3 import iam_keys, refused
from tests.fixtures.secrets import assert_no_secret, stored
from tests.fixtures.ssh import AppHost

RELEASE_MIGRATION = "20250201000000_brand_notes"
IMAGES = 5
SECRET_NAMES = ("SECRET", "SECRET_ACCESS_KEY", "PASSWORD", "PASSWORD_HASH")
SEED = (f"import os, sys; sys.path.insert(0, {str(REPOSITORY)!r}); import psycopg; "
        "from ops.demo.seed import insert_demo_data; "
        "insert_demo_data(psycopg.connect(os.environ['DATABASE_URL'], autocommit=True))")


def ok(result: CliResult) -> CliResult:
    assert result.exit_code == 0, str(result)
    return result


def app_key(host: Any) -> tuple[str, Secret]:
    """The storage key pair the app on `host` serves with: its env file's."""
    values = parse_env_file(host.env_file.read_text())
    return values["S3_ACCESS_KEY_ID"], Secret(values["S3_SECRET_ACCESS_KEY"])


def stored_secrets(opsbook: Opsbook, env: str) -> list[str]:
    """The secret store's secret values (not the key id or the note of which run seeded)."""
    return [value for name, value in stored(opsbook, env).items() if name.endswith(SECRET_NAMES)]


def shown_password(result: CliResult, heading: str) -> str:
    """The admin password a run showed once, on the line after its heading (and a blank line)."""
    lines = result.stderr.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(heading))
    return lines[index + 2].strip()


def make_checkout(root: Path) -> Path:
    """The app's repository: the demo migrations, committed (decommissioning bundles it)."""
    checkout = root / "app"
    shutil.copytree(MIGRATIONS_DIR, checkout / "prisma" / "migrations")
    commit(checkout, "first release", init=True)
    return checkout


def commit(checkout: Path, message: str, *, init: bool = False) -> None:
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    if init:
        subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", message], check=True)


def host_entry(host: Any, **app: Any) -> dict[str, Any]:
    return {"name": host.name, "address": "127.0.0.1", "user": host.host.user, "port": host.host.port,
            "key_file": host.host.key_filename,
            "app": {"dir": str(host.app_dir), "env_file": str(host.env_file), "restart": host.restart_command,
                    "health_url": host.health_url, "ready_url": host.ready_url, "log_command": host.log_command,
                    **app}}


def app_settings(checkout: Path, **env: str) -> dict[str, Any]:
    migrations = checkout / "prisma" / "migrations"
    return {"repository": str(checkout), "migrations": {"engine": "native", "dir": "prisma/migrations"},
            "health_timeout": 15, "env": {"APP_MIGRATIONS_DIR": str(migrations), **env}}


def storage(s3: Any, bucket: str, variable: str) -> dict[str, Any]:
    return {"provider": "s3", "endpoint": s3.endpoint, "region": "us-east-1", "bucket": bucket,
            "access_key_id": f"${{env:{variable}_KEY_ID}}", "secret_access_key": f"${{env:{variable}_SECRET}}"}


@dataclass
class Life:
    """What the stages share: the workspace and servers, prod's host and keys, every secret seen so far."""

    opsbook: Opsbook
    s3: Any
    webhook: Any
    inventory: dict[str, Any]
    web1: AppHost
    stage1: AppHost
    checkout: Path
    user: str  # prod's IAM user (keys.iam_user)
    inventory_key: tuple[str, Secret]
    auditor: tuple[str, Secret]  # the test's own eyes on IAM and S3: another IAM user, allowed everything
    assets: str
    prod_url: Secret
    staging_url: Secret
    secrets: list[str]
    passwords: list[str] = field(default_factory=list)  # admin passwords: each shown once
    keys_after_provisioning: list[str] = field(default_factory=list)
    provisioned_key: tuple[str, Secret] = ("", Secret(""))
    new_key: tuple[str, Secret] = ("", Secret(""))

    def ok(self, *args: str) -> CliResult:
        return ok(self.opsbook.run(*args))

    def iam_keys(self, *, active_only: bool = False) -> list[str]:
        return iam_keys(self.s3, self.user, self.auditor, active_only=active_only)

    def refused(self, key: tuple[str, Secret]) -> str | None:
        return refused(self.s3, self.assets, *key)


@pytest.fixture
def life(opsbook: Opsbook, postgres_server: Any, s3_server: Any, app_host_factory: Any, webhook_receiver: Any,
         tmp_path: Path) -> Iterator[Life]:
    """prod exists only in the inventory (and as its IAM user with the inventory's key); staging is running."""
    suffix = uuid.uuid4().hex[:8]
    user = f"app-prod-{suffix}"
    inventory_key = s3_server.create_access_key(user)
    staging_key = s3_server.create_access_key(f"app-staging-{suffix}")
    auditor = s3_server.create_access_key(f"auditor-{suffix}")
    web1, stage1 = app_host_factory(("web1", "stage1"))
    checkout = make_checkout(tmp_path)
    role, database, assets = f"app_{suffix}", f"shop_{suffix}", f"prod-assets-{suffix}"
    staging_url = postgres_server.create_database(f"staging_{suffix}")
    staging_buckets = [s3_server.make_bucket().bucket for _ in ("assets", "backups")]
    webhook = webhook_receiver.url()
    opsbook.environ.update({
        "ADMIN_DATABASE_URL": postgres_server.url().reveal(), "STAGING_DATABASE_URL": staging_url.reveal(),
        "PROD_KEY_ID": inventory_key[0], "PROD_SECRET": inventory_key[1].reveal(),
        "STAGING_KEY_ID": staging_key[0], "STAGING_SECRET": staging_key[1].reveal(), "SLACK_WEBHOOK_URL": webhook})
    inventory = {"project": "lifecycle", "default_env": "staging", "envs": {
        "prod": {
            "protected": True,
            "database": {"url": f"postgresql://{role}@127.0.0.1:{postgres_server.port}/{database}",
                         "admin_url": "${env:ADMIN_DATABASE_URL}"},
            "storage": storage(s3_server, assets, "PROD"),
            "backups": {"bucket": f"prod-backups-{suffix}", "prefix": "prod/"},
            "keys": {"provider": "aws-iam", "iam_user": user, "probe_timeout": 10},
            "hosts": [host_entry(web1, seed=f"{shlex.quote(sys.executable)} -c {shlex.quote(SEED)}")],
            "app": app_settings(checkout),
            "targets": {"rpo_hours": 24, "rto_minutes": 10},
            "drill": {"target": "staging", "sample_images": IMAGES},
            "notify": [{"kind": "webhook", "url": "${env:SLACK_WEBHOOK_URL}", "timeout": 5, "retries": 1},
                       {"kind": "file", "path": "status.md", "audience": "public"}],
        },
        "staging": {
            "database": {"url": "${env:STAGING_DATABASE_URL}"},
            "storage": storage(s3_server, staging_buckets[0], "STAGING"),
            "backups": {"bucket": staging_buckets[1], "prefix": "staging/"},
            "hosts": [host_entry(stage1)],
            "app": app_settings(checkout),
        },
    }}
    opsbook.write_inventory(inventory)
    with s3_server.enforce_auth():
        yield Life(opsbook=opsbook, s3=s3_server, webhook=webhook_receiver, inventory=inventory, web1=web1,
                   stage1=stage1, checkout=checkout, user=user, inventory_key=inventory_key, auditor=auditor,
                   assets=assets, prod_url=postgres_server.url(database), staging_url=staging_url,
                   secrets=[postgres_server.password.reveal(), inventory_key[1].reveal(), staging_key[1].reveal(),
                            auditor[1].reveal(), webhook.rsplit("/", 1)[-1]])


def test_one_protected_environment_from_provisioning_to_decommissioning(life: Life) -> None:
    provision(life)
    migrate(life)
    push_env_then_restart(life)
    backup_then_restore_into_staging(life)
    drill(life)
    rotate_the_storage_key(life)
    rotate_the_admin_password(life)
    incident(life)
    decommission(life)
    no_secret_shown(life)


def provision(life: Life) -> None:
    """The app runs, migrated and seeded, with the environment's key in its env file."""
    provisioned = life.ok("provision", "--env", "prod", "--confirm", "prod")
    life.passwords.append(shown_password(provisioned, "Admin password for prod"))
    assert http_status(life.web1.ready_url) == 200
    life.provisioned_key = app_key(life.web1)
    assert life.refused(life.provisioned_key) is None
    life.keys_after_provisioning = life.iam_keys(active_only=True)
    assert life.provisioned_key[0] in life.keys_after_provisioning
    assert row_counts(life.prod_url)["public.Brand"] == 20  # the seed ran
    life.secrets += [life.provisioned_key[1].reveal(), *stored_secrets(life.opsbook, "prod")]
    client = life.s3.client(access_key_id=life.provisioned_key[0], secret_access_key=life.provisioned_key[1])
    for key, data in list(image_objects())[:IMAGES]:  # the app stores its first images
        client.put_object(Bucket=life.assets, Key=key, Body=data)


def migrate(life: Life) -> None:
    """A release brings a migration: status says pending, the app is not ready until the deploy applies it."""
    folder = life.checkout / "prisma" / "migrations" / RELEASE_MIGRATION
    folder.mkdir()
    (folder / "migration.sql").write_text('ALTER TABLE "Brand" ADD COLUMN "note" TEXT;\n')
    commit(life.checkout, "brand notes")
    pending = life.opsbook.run("migrate.status", "--env", "prod", "--json")
    assert pending.exit_code == 3 and pending.json()["pending"] == [RELEASE_MIGRATION], str(pending)
    assert http_status(life.web1.ready_url) == 503
    migrated = life.ok("migrate", "--env", "prod", "--confirm", "prod", "--json")
    assert migrated.json()["applied"] == [RELEASE_MIGRATION] and migrated.json()["backup_id"], str(migrated)
    life.ok("migrate.status", "--env", "prod")
    assert http_status(life.web1.ready_url) == 200


def push_env_then_restart(life: Life) -> None:
    """A new setting reaches the env file (the app keeps running), then the restarted app."""
    life.inventory["envs"]["prod"]["app"] = app_settings(life.checkout, APP_RELEASE="2")
    life.opsbook.write_inventory(life.inventory)
    running = life.web1.pid()
    life.ok("deploy.push-env", "--env", "prod", "--confirm", "prod")
    assert parse_env_file(life.web1.env_file.read_text())["APP_RELEASE"] == "2"
    assert app_key(life.web1) == life.provisioned_key and life.web1.pid() == running
    life.ok("deploy.restart", "--env", "prod", "--confirm", "prod")
    assert life.web1.pid() not in (None, running) and http_status(life.web1.ready_url) == 200


def backup_then_restore_into_staging(life: Life) -> None:
    """The nightly backup (unattended: no confirmation) is listed, and staging restored from it has prod's rows."""
    backup_id = life.ok("backup", "--env", "prod", "--json").json()["backup"]["backup_id"]
    listed = life.ok("backup.list", "--env", "prod", "--json")
    assert backup_id in [backup["id"] for backup in listed.json()["backups"]], str(listed)
    restored = life.ok("restore", "--env", "staging", "--from", "prod", "--json")
    assert restored.json()["restored"]["backup_id"] == backup_id, str(restored)
    assert row_counts(life.staging_url) == row_counts(life.prod_url)


def drill(life: Life) -> None:
    """prod's drill into staging (its drill.target): every check passes and the report says so."""
    drilled = life.ok("drill", "--env", "prod", "--json")
    report = drilled.json()["drill"]
    assert report["passed"] is True and report["failures"] == [], str(drilled)
    assert {step["name"]: step["status"] for step in report["steps"]} == {
        name: "passed" for name in ("restore", "migrations", "staging", "images", "rto", "rpo")}
    assert http_status(life.stage1.ready_url) == 200


def rotate_the_storage_key(life: Life) -> None:
    """One new key, in the env file and serving; every key prod had before is refused."""
    rotated = life.opsbook.run("keys.rotate", "--env", "prod", "--confirm", "prod")
    assert rotated.exit_code == 0, (f"{rotated}\n--- active IAM keys of {life.user} after provisioning: "
                                    f"{life.keys_after_provisioning}")
    # What provisioning left is checked here, where a second active key bites: the first rotation.
    assert life.keys_after_provisioning == [life.provisioned_key[0]], "provisioning left a second active key"
    life.new_key = app_key(life.web1)
    life.secrets.append(life.new_key[1].reveal())
    assert life.new_key[0] not in (life.provisioned_key[0], life.inventory_key[0])
    assert life.iam_keys() == [life.new_key[0]]
    assert stored(life.opsbook, "prod")["STORAGE_ACCESS_KEY_ID"] == life.new_key[0]
    assert http_status(life.web1.ready_url) == 200 and life.refused(life.new_key) is None
    for old in (life.provisioned_key, life.inventory_key):
        assert life.refused(old) == "InvalidAccessKeyId", old[0]


def rotate_the_admin_password(life: Life) -> None:
    """A new admin password, shown once, whose hash the restarted app has; the old one no longer matches."""
    running = life.web1.pid()
    rotated = life.ok("secrets.rotate", "--env", "prod", "--name", "ADMIN_PASSWORD", "--confirm", "prod")
    life.passwords.append(shown_password(rotated, "New admin password for prod"))
    values = parse_env_file(life.web1.env_file.read_text())
    assert verify_admin_password(Secret(life.passwords[-1]), values["ADMIN_PASSWORD_HASH"])
    assert not verify_admin_password(Secret(life.passwords[0]), values["ADMIN_PASSWORD_HASH"])
    assert life.web1.pid() not in (None, running) and http_status(life.web1.ready_url) == 200
    assert app_key(life.web1) == life.new_key
    life.secrets += stored_secrets(life.opsbook, "prod")


def incident(life: Life) -> None:
    """Opened, updated, resolved: the record says resolved and the channel heard each step."""
    opened = life.ok("incident.open", "--env", "prod", "--title", "Checkout is slow", "--impact", "minor",
                     "--components", "checkout", "--message", "Some checkouts take 10 s", "--json")
    incident_id = opened.json()["incident"]["id"]
    life.ok("incident.update", "--id", incident_id, "--env", "prod", "--status", "identified",
            "--message", "A slow query on Brand")
    life.ok("incident.resolve", "--id", incident_id, "--env", "prod", "--message", "Index added",
            "--cause", "a missing index")
    shown = life.ok("incident.show", "--id", incident_id, "--env", "prod", "--json")
    assert shown.json()["incident"]["state"] == "resolved", str(shown)
    assert [p["blocks"][0]["text"]["text"] for p in life.webhook.payloads()] == [
        f"{state}: Checkout is slow" for state in ("Investigating", "Identified", "Resolved")]


def decommission(life: Life) -> None:
    """Every key prod ever had revoked, and from then on every run on prod refused (exit 2)."""
    life.ok("decommission", "--env", "prod", "--confirm", "prod", "--json")
    assert life.iam_keys() == []
    for old in (life.provisioned_key, life.new_key, life.inventory_key):
        assert life.refused(old) == "InvalidAccessKeyId", old[0]
    for task in (("backup",), ("health",), ("deploy.restart", "--confirm", "prod"),
                 ("keys.rotate", "--confirm", "prod")):
        later = life.opsbook.run(*task, "--env", "prod")
        assert later.exit_code == 2 and "decommissioned" in later.stderr, str(later)


def no_secret_shown(life: Life) -> None:
    """No secret in any output, journal or file opsbook wrote, nor in a notice; each admin password shown once."""
    assert_no_secret(life.opsbook, *life.secrets)
    produced = life.opsbook.everything_produced()
    assert [produced.count(password) for password in life.passwords] == [1, 1]
    notices = "".join(r.body.decode() for r in life.webhook.requests)
    notices += (life.opsbook.root / "status.md").read_text()
    assert [secret for secret in [*life.secrets, *life.passwords] if secret in notices] == []
