"""inv provision end to end through the real CLI: real PostgreSQL, moto (S3 + IAM with credentials
enforced, the aws-iam key provider), sshd with the test app on a host."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from ops.envfile import parse_env_file
from ops.keys import verify_admin_password
from ops.secret_store import SecretStore
from ops.secrets import Secret, mask_identifier
from tests.cli import CliResult, Opsbook, http_status
from tests.fixtures.provision import iam_keys
from tests.fixtures.s3 import refused
from tests.fixtures.secrets import stored


def admin_password(result: CliResult) -> str:
    lines = result.stderr.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("Admin password for staging"))
    return lines[index + 2].strip()


def buckets(s3: Any, fresh: Any) -> set[str]:
    client = s3.client(access_key_id=fresh["auditor"][0], secret_access_key=fresh["auditor"][1])
    return {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}


def server_facts(server: Any, fresh: Any) -> tuple[bool, bool]:
    with psycopg.connect(server.url().reveal()) as connection:
        role = connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (fresh["role"],)).fetchone()
        database = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                      (fresh["database"],)).fetchone()
    return role is not None, database is not None


def seeded_rows(server: Any, fresh: Any) -> int:
    with psycopg.connect(server.url(fresh["database"]).reveal()) as connection:
        return connection.execute("SELECT count(*) FROM items WHERE name = 'seeded'").fetchone()[0]


def test_provision_fresh_environment_end_to_end(opsbook, fresh, postgres_server, s3_server):
    host = fresh["host"]

    # A dry run on the fresh environment plans the whole checklist and changes nothing anywhere.
    dry = opsbook.run("provision", "--dry-run")
    assert dry.exit_code == 0, dry
    for planned in (f"would create bucket {fresh['bucket']} and set 1 lifecycle rule(s)",
                    f"would create role {fresh['role']}", f"would create database {fresh['database']}",
                    "would create a new aws-iam key", "would generate AUTH_SECRET", "would generate the admin password",
                    f"would create {host.env_file} on web1", "would apply 1 migration(s) to the new database",
                    "would run the seed command on web1", "would restart web1"):
        assert planned in dry.stderr, (planned, dry)
    assert server_facts(postgres_server, fresh) == (False, False)
    assert not {fresh["bucket"], fresh["backups"]} & buckets(s3_server, fresh)
    assert iam_keys(s3_server, fresh) == [fresh["admin_key"][0]]
    assert not host.env_file.exists() and host.pid() is None
    assert not SecretStore(opsbook.state_dir, "staging").path.exists()

    first = opsbook.run("provision", "--json")
    assert first.exit_code == 0, first
    assert first.json()["status"] == "succeeded"
    password = admin_password(first)

    # The app runs on the provisioned database (migrated, seeded) with the key made for it.
    assert http_status(host.health_url) == 200 and http_status(host.ready_url) == 200
    secrets = stored(opsbook)
    values = parse_env_file(host.env_file.read_text())
    assert oct(host.env_file.stat().st_mode & 0o777) == "0o600"
    assert values["DATABASE_URL"].startswith(f"postgresql://{fresh['role']}:")
    assert values["S3_ACCESS_KEY_ID"] == secrets["STORAGE_ACCESS_KEY_ID"] != fresh["admin_key"][0]
    assert iam_keys(s3_server, fresh) == [values["S3_ACCESS_KEY_ID"]]  # the inventory's key revoked at the end
    assert len(values["AUTH_SECRET"]) >= 32 and values["NEXTAUTH_SECRET"] == values["AUTH_SECRET"]
    assert values["ADMIN_PASSWORD_HASH"] == secrets["ADMIN_PASSWORD_HASH"]
    assert verify_admin_password(Secret(password), values["ADMIN_PASSWORD_HASH"])
    assert not verify_admin_password(Secret(password + "x"), values["ADMIN_PASSWORD_HASH"])
    assert seeded_rows(postgres_server, fresh) == 1
    client = s3_server.client(access_key_id=fresh["auditor"][0], secret_access_key=fresh["auditor"][1])
    rules = client.get_bucket_lifecycle_configuration(Bucket=fresh["bucket"])["Rules"]
    assert [rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] for rule in rules] == [7]

    # A second run finds everything in place: an empty plan, nothing shown, the seed not run again.
    started = host.pid()
    second = opsbook.run("provision", "--json")
    assert second.exit_code == 0, second
    assert second.json()["status"] == "nothing to do"
    assert all(step["change"] is None for step in second.json()["steps"]), second.json()["steps"]
    assert "Admin password" not in second.stderr
    assert seeded_rows(postgres_server, fresh) == 1 and host.pid() == started

    # No secret anywhere (outputs, journals, --json), except the admin password's one line.
    produced = opsbook.everything_produced()
    assert produced.count(password) == 1
    for secret in [*fresh["secrets"], *secrets.values()]:
        assert secret not in produced
    journal = (opsbook.state_dir / "runs" / f"{first.json()['run_id']}.jsonl").read_text()
    assert password not in journal and password not in first.stdout


def test_provision_then_rotate_converge_on_one_key(opsbook, fresh, postgres_server, s3_server):
    """The key provision makes is the environment's key: the inventory's (bootstrap) key, of the same IAM
    user, is revoked once the app serves with the new one, so the first rotation needs no IAM clean-up;
    decommissioning then revokes the one key left."""
    host, bootstrap = fresh["host"], fresh["admin_key"]
    dry = opsbook.run("provision", "--dry-run")
    assert dry.exit_code == 0, dry
    assert f"would revoke the inventory's key {mask_identifier(bootstrap[0])}" in dry.stderr, dry

    provisioned = opsbook.run("provision")
    assert provisioned.exit_code == 0, provisioned
    app_key = stored(opsbook)["STORAGE_ACCESS_KEY_ID"]
    assert iam_keys(s3_server, fresh) == [app_key] != [bootstrap[0]]
    assert refused(s3_server, fresh["bucket"], *bootstrap) == "InvalidAccessKeyId"
    assert parse_env_file(host.env_file.read_text())["S3_ACCESS_KEY_ID"] == app_key
    assert http_status(host.ready_url) == 200
    assert not any(name.startswith(("STORAGE_NEXT", "STORAGE_PREVIOUS")) for name in stored(opsbook))
    assert opsbook.run("provision", "--json").json()["status"] == "nothing to do"

    rotated = opsbook.run("keys.rotate")
    assert rotated.exit_code == 0, rotated
    secrets = stored(opsbook)
    new_key = (secrets["STORAGE_ACCESS_KEY_ID"], Secret(secrets["STORAGE_SECRET_ACCESS_KEY"]))
    assert iam_keys(s3_server, fresh) == [new_key[0]] != [app_key]
    assert refused(s3_server, fresh["bucket"], *new_key) is None
    assert parse_env_file(host.env_file.read_text())["S3_ACCESS_KEY_ID"] == new_key[0]
    assert http_status(host.ready_url) == 200

    # The end of its life: the rotated key, the only one left, is revoked; the environment is refused.
    done = opsbook.run("decommission", "--confirm", "staging")
    assert done.exit_code == 0, done
    assert iam_keys(s3_server, fresh) == [] and refused(s3_server, fresh["bucket"], *new_key) == "InvalidAccessKeyId"
    assert opsbook.run("keys.rotate").exit_code == 2
    produced = opsbook.everything_produced()
    assert not any(secret in produced for secret in [*fresh["secrets"], new_key[1].reveal()])


def test_failed_seed_stops_the_run_and_undoes_what_it_made(opsbook, fresh, postgres_server, s3_server):
    import yaml

    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["staging"]["hosts"][0]["app"]["seed"] = "echo 'no seed data here' >&2; exit 3"
    opsbook.write_inventory(inventory)

    failed = opsbook.run("provision")
    assert failed.exit_code == 1, failed
    assert "step 12 (seed the database once" in failed.stderr and "exited with code 3" in failed.stderr
    assert "no seed data here" in failed.stderr
    journal = opsbook.journal(opsbook.latest_run_id())
    assert journal[-1]["status"] == "failed" and journal[-1]["stopped_at"] == "seed"
    undone = {entry["step"] for entry in journal if entry.get("state") == "undone"}
    assert undone == {"database-role", "database", "storage-key"}
    # Nothing half-made is left: no role, database or app key, no app started; the generated secrets stay
    # in the store, so the admin password already shown still matches the hash the next run pushes.
    assert server_facts(postgres_server, fresh) == (False, False)
    assert iam_keys(s3_server, fresh) == [fresh["admin_key"][0]]
    assert fresh["host"].pid() is None
    assert "STORAGE_ACCESS_KEY_ID" not in stored(opsbook) and "ADMIN_PASSWORD_HASH" in stored(opsbook)


@pytest.mark.parametrize(("database", "expected"), [
    ({"url": "postgresql://app@db.example.com/shop?sslmode=require"}, []),
    ({"url": "postgresql://app@db.example.com/shop"}, ["database.url has no sslmode"]),
    ({"url": "postgresql://app@127.0.0.1:5432/shop"}, []),  # loopback: nothing on the wire to encrypt
    ({"url": "postgresql://app@pool.example.com:6543/shop?sslmode=require",
      "direct_url": "postgresql://app@db.example.com/shop?sslmode=require"}, ["has no pgbouncer=true"]),
    ({"url": "postgresql://app@pool.example.com:6543/shop?sslmode=require&pgbouncer=true",
      "direct_url": "postgresql://app@db.example.com/shop?sslmode=require"}, []),
])
def test_database_url_advice(tmp_path, database, expected):
    from ops import inventory
    from runbooks.provision import database_url_advice

    opsbook = Opsbook(tmp_path)
    opsbook.write_inventory({"project": "advice", "envs": {"staging": {"database": database}}})
    advice = database_url_advice(inventory.load(opsbook.inventory).environment("staging"))
    assert len(advice) == len(expected) and all(part in line for part, line in zip(expected, advice, strict=True))
