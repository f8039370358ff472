"""Point-in-time recovery of a database server reached over SSH (`pitr.host`): the suite's sshd on loopback
serves "the database host" (this machine), with a PostgreSQL cluster of this module's own as its server.
pitr.setup and pitr.base do their work on the server's machine over SSH (the engine's files, the restart,
barman-cloud-backup and its retention); the SQL still goes over the database URL; `restore --to-time` runs
here. The tests share the cluster and build on each other's state only through `archived`, which makes
what is missing (each test also passes alone)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.cli import Opsbook, wait_for
from tests.fixtures.postgres import row_counts, running_cluster, system_bin_dir
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.ssh import SshServer, free_port

pytestmark = pytest.mark.skipif(shutil.which("barman-cloud-backup") is None,
                                reason="barman-cloud (barman-cli-cloud) is not installed")


@pytest.fixture(scope="module")
def database_server() -> Iterator[Any]:
    """The database host's server: pitr.setup changes its settings and restarts it (over SSH)."""
    with running_cluster(system_bin_dir()) as server:
        server.create_database("shop")
        with psycopg.connect(server.url("shop").reveal(), autocommit=True) as connection:
            connection.execute('CREATE TABLE "Brand" (id serial PRIMARY KEY, name text)')
            connection.execute("""INSERT INTO "Brand" (name) SELECT 'brand ' || n FROM generate_series(1, 20) n""")
        yield server


@pytest.fixture(scope="module")
def bucket(s3_server: Any) -> str:
    return s3_server.make_bucket().bucket


@pytest.fixture
def pitr(opsbook: Opsbook, database_server: Any, postgres_server: Any, s3_server: Any, bucket: str,
         ssh_server: SshServer) -> dict[str, Any]:
    """`src`, whose server is on the SSH host `db1` (one of its hosts), and `dst`, a database on this machine."""
    opsbook.environ.update({"SRC_URL": database_server.url("shop").reveal(),
                            "DST_URL": postgres_server.url(f"dst_{uuid.uuid4().hex[:8]}").reveal(),
                            "S3_KEY_ID": s3_server.access_key_id, "S3_SECRET": s3_server.secret_access_key.reveal()})
    backups = {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket,
               "access_key_id": "${env:S3_KEY_ID}", "secret_access_key": "${env:S3_SECRET}"}
    opsbook.write_inventory({"project": "pitrssh", "default_env": "src", "envs": {
        "src": {"database": {"url": "${env:SRC_URL}"}, "backups": {**backups, "prefix": "src/"},
                "ssh": {"user": ssh_server.user, "port": ssh_server.port, "key_file": ssh_server.key_filename},
                "hosts": [{"name": "db1", "address": "127.0.0.1"}],
                "pitr": {"host": "db1", "data_dir": str(database_server.data_dir)}},
        "dst": {"database": {"url": "${env:DST_URL}"}, "backups": {**backups, "prefix": "dst/"}},
    }})
    return {"secrets": [database_server.password.reveal(), postgres_server.password.reveal(),
                        s3_server.secret_access_key.reveal()],
            "config_dir": database_server.data_dir.parent / "opsbook-pitr-src"}


def ok(result: Any) -> Any:
    assert result.exit_code == 0, str(result)
    return result


def setting(server: Any, name: str) -> str:
    with psycopg.connect(server.url().reveal()) as connection:
        return connection.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()[0]


def logins(ssh_server: SshServer) -> int:
    return ssh_server.log_file.read_text().count("Accepted publickey")


def test_setup_and_base_backup_over_ssh_then_restore_to_a_time_here(opsbook, pitr, database_server, postgres_server,
                                                                      s3_server, bucket, ssh_server):
    planned = ok(opsbook.run("pitr.setup", "--env", "src", "--dry-run"))
    assert "on host db1 (" in planned.stderr, "the plan says where the files and the restart go"
    assert setting(database_server, "archive_mode") == "off" and not pitr["config_dir"].exists(), "changed nothing"

    before = logins(ssh_server)
    done = ok(opsbook.run("pitr.setup", "--env", "src", "--json"))
    assert logins(ssh_server) > before, "the server's side went over SSH"
    assert setting(database_server, "archive_mode") == "on", "restarted over SSH: the setting took effect"
    segment = done.json()["archive"]["segment"]
    keys = [item["Key"] for item in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="src/pitr/src/wals/")
            .get("Contents", [])]
    assert any(segment in key for key in keys), keys
    credentials = pitr["config_dir"] / "credentials.env"
    owner = pwd.getpwuid(credentials.stat().st_uid).pw_name
    assert credentials.stat().st_mode & 0o777 == 0o600 and owner == ("postgres" if os.geteuid() == 0 else owner)
    assert s3_server.secret_access_key.reveal() in credentials.read_text()
    for script in pitr["config_dir"].glob("*-wal"):
        assert not any(secret in script.read_text() for secret in pitr["secrets"]), "only the 0600 file has the key"
    assert ok(opsbook.run("pitr.setup", "--env", "src", "--json")).json()["status"] == "nothing to do"

    base = ok(opsbook.run("pitr.base", "--env", "src", "--json")).json()["base"]
    newest = ok(opsbook.run("pitr.list", "--env", "src", "--json")).json()["backups"][0]
    assert newest["backup_id"] == base["backup_id"] and newest["complete"] and newest["gap"] is None
    assert ok(opsbook.run("pitr.status", "--env", "src", "--json")).json()["verdict"] == "ok"

    with psycopg.connect(database_server.url("shop").reveal(), autocommit=True) as connection:
        connection.execute("""INSERT INTO "Brand" (name) VALUES ('after the base backup')""")
        archived = connection.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        wait_for(lambda: connection.execute("SELECT last_archived_wal >= %s FROM pg_stat_archiver",
                                            (archived,)).fetchone()[0], timeout=30, what=f"{archived} archived")
    ok(opsbook.run("restore", "--env", "dst", "--from", "src", "--to-time", "latest"))
    target = postgres_server.url(opsbook.environ["DST_URL"].rsplit("/", 1)[1])
    assert row_counts(target) == row_counts(database_server.url("shop"))
    assert_no_secret(opsbook, *pitr["secrets"])


@pytest.fixture
def archived(opsbook: Opsbook, pitr: dict[str, Any], database_server: Any) -> None:
    """Archiving on (made through the CLI when this test runs alone)."""
    if setting(database_server, "archive_mode") != "on":
        ok(opsbook.run("pitr.setup", "--env", "src"))


def engine_processes(bucket: str) -> list[int]:
    """barman-cloud-backup of this module's bucket running on this machine (the database host), runuser's too."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "barman-cloud-backup" in command and bucket in command:
            found.append(int(entry.name))
    return found


def engine_connected(server: Any) -> bool:
    with psycopg.connect(server.url().reveal()) as connection:
        return connection.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                  "'barman_cloud_backup'").fetchone()[0] > 0


def test_an_interrupted_base_backup_stops_on_the_host_and_is_not_listed_complete(opsbook, pitr, archived,
                                                                                database_server, bucket):
    before = {item["backup_id"] for item in ok(opsbook.run("pitr.list", "--env", "src", "--json")).json()["backups"]
              if item["complete"]}
    running = opsbook.start("pitr.base", "--env", "src")
    wait_for(lambda: engine_processes(bucket), timeout=30, what="barman-cloud-backup running on the host")
    wait_for(lambda: engine_connected(database_server), timeout=60, what="barman-cloud-backup connected")
    running.send_signal(signal.SIGINT)
    interrupted = opsbook.collect(running)
    assert interrupted.exit_code == 130 and "Traceback" not in interrupted.output, str(interrupted)
    assert engine_processes(bucket) == [], "nothing of the backup runs on the host any more"
    listed = ok(opsbook.run("pitr.list", "--env", "src", "--json")).json()["backups"]
    assert {item["backup_id"] for item in listed if item["complete"]} == before
    assert_no_secret(opsbook, *pitr["secrets"])


def test_a_host_not_in_the_inventory_and_an_unreachable_host_are_refused_in_one_line(opsbook, pitr, ssh_server):
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["src"]["pitr"]["host"] = "db9"
    opsbook.write_inventory(inventory)
    unknown = opsbook.run("pitr.setup", "--env", "src", "--dry-run")
    assert unknown.exit_code == 2 and "'db9' is not one of src's hosts (db1)" in unknown.stderr, str(unknown)

    closed = free_port()
    inventory["envs"]["src"]["pitr"]["host"] = {"address": "127.0.0.1", "port": closed}
    opsbook.write_inventory(inventory)
    unreachable = opsbook.run("pitr.base", "--env", "src")
    assert unreachable.exit_code == 3 and "the plan cannot be made" in unreachable.stderr, str(unreachable)
    assert f"connection refused by host database ({ssh_server.user}@127.0.0.1:{closed})" in unreachable.stderr, \
        str(unreachable)
    assert "what to do:" in unreachable.stderr
    for refused in (unknown, unreachable):
        assert "Traceback" not in refused.output
