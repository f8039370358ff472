"""The README's break-glass restore, run verbatim with standard tools on a backup opsbook made.

The commands come from the README itself (the fenced block after the break-glass marker), so
the test fails as soon as the documented procedure and the backup format drift apart.
"""

from __future__ import annotations

import json
import shutil
import uuid

import psycopg
import pyrage
import pytest

from tests.cli import Opsbook
from tests.fixtures.backups import backups_section, write_inventory
from tests.fixtures.break_glass import TOOLS, break_glass_commands, operator_environment, run_commands
from tests.fixtures.postgres import row_counts
from tests.fixtures.shop import make_database


@pytest.fixture(scope="module")
def standard_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"break-glass tools missing: {', '.join(missing)} (./opsbook installs them)")


def test_the_readme_block_is_found_and_uses_only_standard_tools():
    script = break_glass_commands()
    assert "opsbook" not in script and "inv " not in script
    for tool in ("aws s3api list-objects-v2", "aws s3 cp", "sha256sum -c", "age -d", "zstd -d", "createdb",
                 "pg_restore --no-owner", "-j 2"):
        assert tool in script, f"the break-glass block no longer runs {tool!r}"


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_break_glass_restores_the_latest_complete_backup(encrypted, standard_tools, opsbook: Opsbook,
                                                         postgres_server, s3_server, tmp_path):
    _, source_url = make_database(postgres_server)
    bucket = s3_server.make_bucket().bucket
    identity = pyrage.x25519.Identity.generate()
    identity_file = tmp_path / "backup-key.txt"
    identity_file.write_text(f"# public key: {identity.to_public()}\n{identity}\n")
    extra = {"encrypt_to": [str(identity.to_public())]} if encrypted else {}
    write_inventory(opsbook, s3_server, {"prod": {"backups": backups_section(
        s3_server.endpoint, bucket, "prod/", **extra)}}, {"prod": source_url})

    made = opsbook.run("backup", "--env", "prod", "--no-prune", "--json")
    assert made.exit_code == 0, made
    backup_id = made.json()["backup"]["backup_id"]
    client = s3_server.client()
    manifest_key = f"prod/backups/{backup_id}/manifest.json"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    assert manifest["object"]["key"].endswith(".age") is encrypted
    # Newer than the real one but without a manifest: a dead upload the commands must pass over.
    client.put_object(Bucket=bucket, Key="prod/backups/99991231T235959Z-dead/dump.pgc.zst", Body=b"partial")
    # The source moves on after the backup: the restore must match the manifest, not today's data.
    with psycopg.connect(source_url.reveal(), autocommit=True) as connection:
        connection.execute("""INSERT INTO "Brand" (name, slug) VALUES ('after the backup', 'late')""")

    target_db = f"breakglass_{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "restore"
    workdir.mkdir()
    environment = operator_environment(s3_server, postgres_server, bucket, "prod/", target_db, tmp_path,
                                       identity_file if encrypted else None)
    ran = run_commands(break_glass_commands(), workdir, environment)
    assert ran.returncode == 0, f"exit {ran.returncode}\n--- stdout\n{ran.stdout}\n--- stderr\n{ran.stderr}"

    assert f"latest complete backup: {backup_id}" in ran.stdout
    assert "dump.stored: OK" in ran.stdout
    assert f"all row counts match: {target_db} holds backup {backup_id}" in ran.stdout
    restored = row_counts(postgres_server.url(target_db))
    assert restored == manifest["row_counts"]
    assert restored["public.Brand"] == row_counts(source_url)["public.Brand"] - 1 == 20
    assert (workdir / "dump.stored").read_bytes().startswith(b"age-encryption.org/v1") is encrypted


def test_break_glass_stops_on_a_damaged_dump(standard_tools, opsbook: Opsbook, postgres_server, s3_server,
                                             tmp_path):
    _, source_url = make_database(postgres_server)
    bucket = s3_server.make_bucket().bucket
    write_inventory(opsbook, s3_server, {"prod": {"backups": backups_section(s3_server.endpoint, bucket, "")}},
                    {"prod": source_url})
    made = opsbook.run("backup", "--env", "prod", "--no-prune", "--json")
    assert made.exit_code == 0, made
    key = made.json()["backup"]["key"]
    client = s3_server.client()
    stored = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    stored[len(stored) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(stored))

    target_db = f"breakglass_{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "restore"
    workdir.mkdir()
    ran = run_commands(break_glass_commands(), workdir,
                       operator_environment(s3_server, postgres_server, bucket, "", target_db, tmp_path, None))
    assert ran.returncode != 0 and "FAILED" in ran.stdout + ran.stderr, ran
    with psycopg.connect(postgres_server.url().reveal()) as connection:
        assert connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target_db,)).fetchone() is None


def test_break_glass_with_roles_restores_onto_an_empty_server_with_owners_and_grants(
        standard_tools, opsbook: Opsbook, postgres_server, second_postgres_server, s3_server, tmp_path):
    _, source_url = make_database(postgres_server)
    suffix = uuid.uuid4().hex[:6]
    owner, reader = f"bgown_{suffix}", f"bgread_{suffix}"
    with psycopg.connect(postgres_server.url().reveal(), autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {owner} LOGIN; CREATE ROLE {reader}; GRANT {reader} TO {owner}")
    with psycopg.connect(source_url.reveal(), autocommit=True) as connection:
        connection.execute(f'ALTER TABLE "Brand" OWNER TO {owner}; GRANT SELECT ON "Image" TO {reader}')
    bucket = s3_server.make_bucket().bucket
    identity = pyrage.x25519.Identity.generate()
    identity_file = tmp_path / "backup-key.txt"
    identity_file.write_text(f"# public key: {identity.to_public()}\n{identity}\n")
    write_inventory(opsbook, s3_server, {"prod": {"backups": backups_section(
        s3_server.endpoint, bucket, "prod/", encrypt_to=[str(identity.to_public())])}}, {"prod": source_url})
    made = opsbook.run("backup", "--env", "prod", "--no-prune", "--json")
    assert made.exit_code == 0, made

    target_db = f"breakglass_{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "restore"
    workdir.mkdir()
    environment = operator_environment(s3_server, second_postgres_server, bucket, "prod/", target_db, tmp_path,
                                       identity_file)
    ran = run_commands(break_glass_commands(), workdir, {**environment, "WITH_ROLES": "1"})
    assert ran.returncode == 0, f"exit {ran.returncode}\n--- stdout\n{ran.stdout}\n--- stderr\n{ran.stderr}"
    assert "globals.stored: OK" in ran.stdout and "all row counts match" in ran.stdout
    assert f"CREATE ROLE {owner};" in (workdir / "roles.sql").read_text()
    assert "CREATE ROLE postgres;" not in (workdir / "roles.sql").read_text()  # it exists there: left alone
    with psycopg.connect(second_postgres_server.url(target_db).reveal()) as connection:
        assert connection.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'Brand'"
                                  ).fetchone() == (owner,)
        granted = connection.execute("""SELECT has_table_privilege(%s, '"Image"', 'SELECT'),
                                     pg_has_role(%s, %s, 'MEMBER')""", (reader, owner, reader)).fetchone()
        assert granted == (True, True)
