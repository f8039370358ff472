"""Point-in-time recovery through barman-cloud, against a PostgreSQL 15 cluster of this module's own (its
archiving is turned on by `inv pitr.setup`, which restarts it) and the session's moto bucket."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from tests.cli import Opsbook, wait_for
from tests.fixtures.postgres import row_counts, running_cluster, system_bin_dir
from tests.fixtures.secrets import assert_no_secret

pytestmark = pytest.mark.skipif(__import__("shutil").which("barman-cloud-backup") is None,
                                reason="barman-cloud (barman-cli-cloud) is not installed")


@pytest.fixture(scope="module")
def source_cluster() -> Iterator[Any]:
    """A cluster of its own: pitr.setup changes its settings and restarts it."""
    with running_cluster(system_bin_dir()) as server:
        server.create_database("shop")
        with psycopg.connect(server.url("shop").reveal(), autocommit=True) as connection:
            connection.execute('CREATE TABLE "Brand" (id serial PRIMARY KEY, name text, at timestamptz DEFAULT now())')
            connection.execute("""INSERT INTO "Brand" (name) SELECT 'brand ' || n FROM generate_series(1, 50) n""")
        yield server


@pytest.fixture(scope="module")
def bucket(s3_server: Any) -> str:
    return s3_server.make_bucket().bucket


@pytest.fixture
def pitr(opsbook: Opsbook, source_cluster: Any, postgres_server: Any, s3_server: Any, bucket: str) -> dict[str, Any]:
    """`src` (the archiving cluster) and `dst` (a database on the session's server), one backup bucket."""
    opsbook.environ.update({"SRC_URL": source_cluster.url("shop").reveal(),
                            "DST_URL": postgres_server.url(f"dst_{uuid.uuid4().hex[:8]}").reveal(),
                            "S3_KEY_ID": s3_server.access_key_id,
                            "S3_SECRET": s3_server.secret_access_key.reveal()})
    backups = {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket,
               "access_key_id": "${env:S3_KEY_ID}", "secret_access_key": "${env:S3_SECRET}"}
    opsbook.write_inventory({"project": "pitrtest", "default_env": "src", "envs": {
        "src": {"database": {"url": "${env:SRC_URL}"}, "backups": {**backups, "prefix": "src/"},
                "pitr": {"data_dir": str(source_cluster.data_dir), "archive_timeout": 60}},
        "dst": {"database": {"url": "${env:DST_URL}"}, "backups": {**backups, "prefix": "dst/"}},
    }})
    return {"secrets": [source_cluster.password.reveal(), postgres_server.password.reveal(),
                        s3_server.secret_access_key.reveal()], "source": source_cluster}


def setting(server: Any, name: str) -> str:
    with psycopg.connect(server.url().reveal()) as connection:
        return connection.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()[0]


def test_setup_then_base_backup_and_list(opsbook, pitr, s3_server, bucket):
    source = pitr["source"]
    planned = opsbook.run("pitr.setup", "--env", "src", "--dry-run")
    assert planned.exit_code == 0, str(planned)
    assert setting(source, "archive_mode") == "off", "a dry run changed nothing"

    done = opsbook.run("pitr.setup", "--env", "src", "--json")
    assert done.exit_code == 0, str(done)
    assert setting(source, "archive_mode") == "on" and setting(source, "wal_level") == "replica"
    segment = done.json()["archive"]["segment"]
    keys = [item["Key"] for item in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="src/pitr/src/wals/")
            .get("Contents", [])]
    assert any(segment in key for key in keys), keys

    again = opsbook.run("pitr.setup", "--env", "src", "--json")
    assert again.exit_code == 0 and again.json()["status"] == "nothing to do", again

    base = opsbook.run("pitr.base", "--env", "src", "--json")
    assert base.exit_code == 0, str(base)
    backup_id = base.json()["base"]["backup_id"]
    listed = opsbook.run("pitr.list", "--env", "src", "--json")
    assert listed.exit_code == 0, str(listed)
    newest = listed.json()["backups"][0]
    assert newest["backup_id"] == backup_id and newest["complete"] and newest["gap"] is None
    assert newest["earliest"] <= newest["latest"], newest
    assert_no_secret(opsbook, *pitr["secrets"])
