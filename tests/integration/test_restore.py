"""inv restore through the real CLI: verified before the target is touched, swapped only when row counts match."""

from __future__ import annotations

import json
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pyrage
import pytest

from ops.secrets import Secret
from tests.cli import Opsbook, wait_for
from tests.fixtures.backups import backups_section, write_inventory
from tests.fixtures.postgres import row_counts
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.shop import databases_like, make_database

SAMPLES = {"Brand": 'SELECT id, name, slug FROM "Brand" ORDER BY id',
           "Image": 'SELECT id, "brandId", caption, bytes FROM "Image" ORDER BY id',
           "User": 'SELECT id, email, created FROM "User" ORDER BY email'}


def rows(url: Secret, query: str) -> list[tuple]:
    with psycopg.connect(url.reveal()) as connection:
        return connection.execute(query).fetchall()


def marker(url: Secret) -> list[tuple]:
    return rows(url, "SELECT note FROM marker")


def make_target(server: Any) -> tuple[str, Secret]:
    """The environment to be replaced: a database with a `marker` table the backup does not have."""
    name, url = make_database(server)
    with psycopg.connect(url.reveal(), autocommit=True) as connection:
        connection.execute("CREATE TABLE marker (note text); INSERT INTO marker VALUES ('before the restore')")
    return name, url


@pytest.fixture
def envs(opsbook: Opsbook, postgres_server: Any, s3_server: Any, tmp_path: Path) -> dict[str, Any]:
    """staging (the source, with its backup bucket) and prod (protected, the target)."""
    identity = pyrage.x25519.Identity.generate()
    key_file = opsbook.root / "backup-key.txt"
    key_file.write_text(f"# public key: {identity.to_public()}\n{identity}\n")
    source_name, source_url = make_database(postgres_server)
    target_name, target_url = make_target(postgres_server)
    buckets = {name: s3_server.make_bucket().bucket for name in ("staging", "prod")}
    return {"source": (source_name, source_url), "target": (target_name, target_url), "buckets": buckets,
            "identity": identity, "key_file": key_file,
            "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal(), str(identity)]}


def configure(opsbook: Opsbook, s3_server: Any, envs: dict[str, Any], **staging_backups: Any) -> None:
    write_inventory(opsbook, s3_server, {
        "staging": {"backups": backups_section(s3_server.endpoint, envs["buckets"]["staging"], "staging/",
                                               **staging_backups)},
        "prod": {"protected": True, "backups": backups_section(s3_server.endpoint, envs["buckets"]["prod"], "prod/")},
    }, {"staging": envs["source"][1], "prod": envs["target"][1]})


def test_restore_into_another_environment_swaps_only_a_matching_copy(opsbook, envs, postgres_server, s3_server):
    configure(opsbook, s3_server, envs)
    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    (_source_name, source_url), (target_name, target_url) = envs["source"], envs["target"]

    refused = opsbook.run("restore", "--env", "prod", "--from", "staging")
    assert refused.exit_code == 2 and "--confirm prod" in refused.stderr, refused
    assert marker(target_url) == [("before the restore",)]

    planned = opsbook.run("restore", "--env", "prod", "--from", "staging", "--dry-run")
    assert planned.exit_code == 0 and "would download" in planned.stderr, planned
    assert databases_like(postgres_server, f"{target_name}\\_\\_%") == []

    app = psycopg.connect(target_url.reveal(), autocommit=True)  # the app, connected to the old database
    restored = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod", "--json")
    assert restored.exit_code == 0, restored
    assert restored.json()["restored"]["backup_id"] == made.json()["backup"]["backup_id"]
    with pytest.raises(psycopg.OperationalError):
        app.execute("SELECT 1")  # its session was ended by the swap
    app.close()

    manifest_counts = json.loads(s3_server.client().get_object(
        Bucket=envs["buckets"]["staging"],
        Key=f"staging/backups/{made.json()['backup']['backup_id']}/manifest.json")["Body"].read())["row_counts"]
    assert row_counts(target_url) == manifest_counts == row_counts(source_url)
    for query in SAMPLES.values():
        assert rows(target_url, query) == rows(source_url, query)
    assert databases_like(postgres_server, f"{target_name}\\_\\_%") == []  # old one dropped, no scratch left
    assert not list((opsbook.state_dir / "restore").glob("*.pgc"))  # the decoded dump is gone

    with psycopg.connect(target_url.reveal(), autocommit=True) as connection:
        connection.execute("CREATE TABLE marker (note text); INSERT INTO marker VALUES ('second')")
    # parallel mode: download and verify into a private file first, then pg_restore -j 2
    kept = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod", "--keep-old",
                       "--jobs", "2")
    assert kept.exit_code == 0, kept
    [old] = databases_like(postgres_server, f"{target_name}\\_\\_old\\_%")
    assert marker(Secret(postgres_server.url(old).reveal())) == [("second",)]
    assert_no_secret(opsbook, *envs["secrets"])


def test_excluded_table_data_is_left_out_and_every_check_expects_none(opsbook, envs, postgres_server, s3_server):
    (_name, source_url), (_target_name, target_url) = envs["source"], envs["target"]
    with psycopg.connect(source_url.reveal(), autocommit=True) as connection:
        connection.execute('CREATE TABLE "Session" (id serial PRIMARY KEY, "userId" uuid REFERENCES "User"(id));'
                           'INSERT INTO "Session" ("userId") SELECT id FROM "User";'
                           'CREATE SCHEMA audit; CREATE TABLE audit."AuditLog" (id serial PRIMARY KEY, note text);'
                           "INSERT INTO audit.\"AuditLog\" (note) SELECT 'event ' || g FROM generate_series(1, 30) g")
    configure(opsbook, s3_server, envs, exclude_table_data=["Session", "audit.AuditLog"])
    planned = opsbook.run("backup", "--env", "staging", "--dry-run")
    assert "without the rows of audit.AuditLog, public.Session" in planned.stderr, planned
    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    backup_id = made.json()["backup"]["backup_id"]
    manifest = json.loads(s3_server.client().get_object(
        Bucket=envs["buckets"]["staging"], Key=f"staging/backups/{backup_id}/manifest.json")["Body"].read())
    assert manifest["excluded_table_data"] == ["audit.AuditLog", "public.Session"]
    assert manifest["row_counts"]["public.Session"] == 50 and manifest["row_counts"]["audit.AuditLog"] == 30

    deep = opsbook.run("backup.verify", "--env", "staging", "--id", backup_id, "--deep")
    assert deep.exit_code == 0, deep
    restored = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod")
    assert restored.exit_code == 0, restored
    counts = row_counts(target_url)  # the public schema's
    assert counts["public.Session"] == 0 and rows(target_url, 'SELECT count(*) FROM audit."AuditLog"') == [(0,)]
    assert {**row_counts(source_url), "public.Session": 0} == counts
    for query in SAMPLES.values():
        assert rows(target_url, query) == rows(source_url, query)


def test_a_damaged_backup_is_refused_before_the_target_is_touched(opsbook, envs, postgres_server, s3_server):
    configure(opsbook, s3_server, envs)
    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    backup_id, bucket = made.json()["backup"]["backup_id"], envs["buckets"]["staging"]
    key = f"staging/{made.json()['backup']['key']}"
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    checked = opsbook.run("backup.verify", "--env", "staging", "--id", backup_id)
    assert checked.exit_code == 3, checked
    assert f"backup {backup_id} is damaged" in checked.stderr and "sha256" in checked.stderr
    records = json.loads(client.get_object(Bucket=bucket, Key=f"staging/backups/{backup_id}/verification.json")
                         ["Body"].read())
    assert [(r["kind"], r["ok"]) for r in records] == [("checksum", False)]
    assert "FAILED" in opsbook.run("backup.list", "--env", "staging").stderr

    target_name, target_url = envs["target"]
    for jobs in ("1", "2"):  # streamed into pg_restore, and downloaded whole before pg_restore -j 2
        refused = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod", "--jobs", jobs)
        assert refused.exit_code == 3, refused
        assert f"backup {backup_id} is damaged" in refused.stderr
    assert marker(target_url) == [("before the restore",)]
    assert databases_like(postgres_server, f"{target_name}\\_\\_%") == []
    assert not list((opsbook.state_dir / "restore").glob("*.pgc"))


def test_an_encrypted_backup_needs_its_identity(opsbook, envs, postgres_server, s3_server):
    configure(opsbook, s3_server, envs, encrypt_to=[str(envs["identity"].to_public())])
    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    key = made.json()["backup"]["key"]
    assert key.endswith(".pgc.zst.age")
    stored = s3_server.client().get_object(Bucket=envs["buckets"]["staging"], Key=f"staging/{key}")["Body"].read()
    assert stored.startswith(b"age-encryption.org/v1") and b"PGDMP" not in stored
    assert not stored[100:].startswith(b"\x28\xb5\x2f\xfd")

    hashed = opsbook.run("backup.verify", "--env", "staging")  # no key on this host: checksum only
    assert hashed.exit_code == 0 and "not decrypted" in hashed.stderr, hashed
    refused = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod")
    assert refused.exit_code == 2, refused
    assert "is encrypted" in refused.stderr and "--identity" in refused.stderr
    _target_name, target_url = envs["target"]
    assert marker(target_url) == [("before the restore",)]

    restored = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod",
                           "--identity", str(envs["key_file"]))
    assert restored.exit_code == 0, restored
    assert row_counts(target_url) == row_counts(envs["source"][1])
    assert_no_secret(opsbook, *envs["secrets"])


def test_an_interrupted_restore_leaves_the_target_untouched(opsbook, envs, postgres_server, s3_server):
    configure(opsbook, s3_server, envs)
    source_url = envs["source"][1]
    with psycopg.connect(source_url.reveal(), autocommit=True) as connection:  # enough for pg_restore to take a while
        connection.execute("CREATE TABLE filler AS SELECT g AS id, repeat(md5(g::text), 30) AS body "
                           "FROM generate_series(1, 60000) g")
    made = opsbook.run("backup", "--env", "staging")
    assert made.exit_code == 0, made
    target_name, target_url = envs["target"]
    running = opsbook.start("restore", "--env", "prod", "--from", "staging", "--confirm", "prod")
    wait_for(lambda: databases_like(postgres_server, f"{target_name}\\_\\_restore%") or running.poll() is not None,
             timeout=60, interval=0.01, what="the scratch database")
    assert running.poll() is None, "the restore ended before it could be interrupted"
    running.send_signal(signal.SIGTERM)
    result = opsbook.collect(running, timeout=60)
    assert result.exit_code == 130, result
    assert marker(target_url) == [("before the restore",)]
    assert databases_like(postgres_server, f"{target_name}\\_\\_%") == []
    assert not list((opsbook.state_dir / "restore").glob("*.pgc"))
    journal = opsbook.journal(opsbook.latest_run_id())
    assert journal[-1]["status"] == "interrupted" and journal[-1]["stopped_at"] == "load"


def test_a_restore_killed_during_the_swap_never_leaves_the_name_empty(opsbook, envs, postgres_server, s3_server):
    """Both renames commit together: while the second waits, and after the restore is killed there, the
    target keeps its name; the next restore finishes the job."""
    configure(opsbook, s3_server, envs)
    assert opsbook.run("backup", "--env", "staging").exit_code == 0
    target_name, target_url = envs["target"]
    holder = psycopg.connect(postgres_server.url().reveal())  # a row lock on the copy's catalog row holds its rename
    try:
        running = opsbook.start("restore", "--env", "prod", "--from", "staging", "--confirm", "prod")
        scratch = wait_for(lambda: databases_like(postgres_server, f"{target_name}\\_\\_restore%"), timeout=60,
                           interval=0.01, what="the scratch database")[0]
        holder.execute("SELECT 1 FROM pg_database WHERE datname = %s FOR UPDATE", (scratch,))
        wait_for(lambda: rename_waiting(postgres_server, scratch), timeout=60, what="the rename of the copy")
        assert databases_like(postgres_server, target_name) == [target_name], "the target's name is gone mid-swap"
        running.kill()
        running.communicate(timeout=30)
    finally:
        holder.close()
    wait_for(lambda: not rename_waiting(postgres_server, scratch), timeout=30, what="the killed session to end")
    assert databases_like(postgres_server, target_name) == [target_name]
    with psycopg.connect(postgres_server.url().reveal()) as connection:  # refused until a restore finishes
        assert connection.execute("SELECT datallowconn FROM pg_database WHERE datname = %s",
                                  (target_name,)).fetchone() == (False,)
    again = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod")
    assert again.exit_code == 0, again
    assert databases_like(postgres_server, f"{target_name}\\_\\_%") == []
    assert row_counts(target_url) == row_counts(envs["source"][1])


def rename_waiting(server: Any, database: str) -> bool:
    with psycopg.connect(server.url().reveal()) as connection:
        return bool(connection.execute(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE 'ALTER DATABASE%%RENAME%%'"
            " AND query LIKE %s", (f'%"{database}"%',)).fetchall())


def runs_on(opsbook: Opsbook, env: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(runbook, journal) of each run on `env`, in the order they started."""
    runs = [opsbook.journal(path.stem) for path in opsbook.journals()]
    return [(events[0]["runbook"], events) for events in sorted(runs, key=lambda events: events[0]["time"])
            if events[0]["env"] == env]


def test_restore_in_a_maintenance_window_and_a_failed_one_becomes_an_incident(opsbook, envs, s3_server):
    """`restore --maintenance` on a protected environment: the window starts before the restore applies and
    completes once its verify passed; a restore that fails turns it into an incident on the page."""
    configure(opsbook, s3_server, envs)
    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    opsbook.write_inventory(opsbook.inventory.read_text().replace("  prod:\n", (
        "  prod:\n    notify:\n    - {kind: file, path: public.md, audience: public}\n"
        "    status_page: {title: Shop status, folder: public, components: [{name: api}]}\n"), 1))
    restored = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod",
                           "--maintenance", "Database restore", "--json")
    assert restored.exit_code == 0, restored
    assert restored.json()["restored"]  # the task's own result, not the window's
    assert marker_gone(envs["target"][1])
    (start_name, start), (restore_name, restore), (complete_name, complete) = runs_on(opsbook, "prod")
    assert (start_name, restore_name, complete_name) == ("maintenance.start", "restore", "maintenance.complete")
    applied = [e["time"] for e in restore if e["event"] == "step" and e["state"] == "applied"]
    verified = [e for e in restore if e["event"] == "step" and e["state"] == "verified"]
    assert start[-1]["status"] == "succeeded" and start[-1]["time"] < min(applied)  # announced before it applies
    assert {e["step"] for e in verified} == {"load", "swap"} and max(e["time"] for e in verified) < complete[0]["time"]
    notices = (opsbook.root / "public.md").read_text()
    assert re.findall(r"\*\*Maintenance: (.+)\*\*", notices) == ["In progress", "Completed"]
    windows = opsbook.run("maintenance.list", "--env", "prod", "--json").json()["maintenance"]
    assert [(w["title"], w["state"], w["components"]) for w in windows] == [("Database restore", "completed", ["api"])]

    key, bucket = f"staging/{made.json()['backup']['key']}", envs["buckets"]["staging"]
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    failed = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod",
                         "--maintenance", "Second restore")
    assert failed.exit_code == 3 and "is damaged" in failed.stderr, failed
    assert "opened for the failed maintenance" in failed.stderr
    (incident,) = opsbook.run("incident.list", "--env", "prod", "--json").json()["incidents"]
    assert (incident["title"], incident["state"], incident["components"]) == (
        "Second restore did not complete", "investigating", {"api": "partial_outage"})
    index = json.loads((opsbook.root / "public" / "index.json").read_text())
    assert index["status"]["indicator"] == "partial_outage" and index["maintenance"] == []
    assert re.findall(r"\*\*Maintenance: (.+)\*\*", (opsbook.root / "public.md").read_text()) == [
        "In progress", "Completed", "In progress", "Completed"]
    assert_no_secret(opsbook, *envs["secrets"])


def marker_gone(url: Secret) -> bool:
    """The restored database is the backup's: the target's own `marker` table is gone."""
    with psycopg.connect(url.reveal()) as connection:
        return connection.execute("SELECT to_regclass('marker')").fetchone()[0] is None


def table_hash(url: Secret, table: str) -> str:
    """The table's content as one digest, in key order (independent of opsbook's own hash)."""
    return rows(url, f'SELECT md5(coalesce(string_agg(t::text, \',\' ORDER BY id), \'\')) FROM "{table}" t')[0][0]


def test_one_table_restored_beside_the_live_one_and_its_rows_put_back(opsbook, envs, postgres_server, s3_server,
                                                                     tmp_path):
    configure(opsbook, s3_server, envs)
    source_name, source_url = envs["source"]
    with psycopg.connect(source_url.reveal(), autocommit=True) as connection:
        connection.execute("CREATE TABLE nokey (note text); INSERT INTO nokey VALUES ('a')")
    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    before = table_hash(source_url, "User")

    into = f"{source_name}_users"
    restored = opsbook.run("restore", "--env", "staging", "--table", "User", "--into", into)
    assert restored.exit_code == 0 and into in restored.stderr, restored
    copy = Secret(postgres_server.url(into).reveal())
    assert row_counts(copy) == {"public.User": 50} and table_hash(copy, "User") == before
    refused = opsbook.run("restore", "--env", "staging", "--table", "User", "--into", envs["target"][0])
    assert refused.exit_code == 2 and "not a scratch database" in refused.stderr, refused
    assert marker(envs["target"][1]) == [("before the restore",)]

    with psycopg.connect(source_url.reveal(), autocommit=True) as connection:
        connection.execute("""DELETE FROM "User" WHERE email IN ('user1@example.com', 'user2@example.com',
                              'user3@example.com');
                              UPDATE "User" SET email = 'it''s changed ' || email
                              WHERE email IN ('user4@example.com', 'user5@example.com')""")
    changed = table_hash(source_url, "User")
    out = tmp_path / "user.sql"
    diffed = opsbook.run("restore.diff", "--env", "staging", "--table", "User", "--out", str(out),
                         "--restore-changed", "--json")
    assert diffed.exit_code == 3, diffed.stderr
    found = diffed.json()["diff"]
    assert (found["missing"], found["changed"], found["added_since"], found["same"]) == (3, 2, 0, 45)
    text = out.read_text()
    assert text.count('INSERT INTO "public"."User"') == 3 and text.count('UPDATE "public"."User" SET') == 2
    assert "'user4@example.com'::text" in text and text.rstrip().endswith("COMMIT;")
    assert table_hash(source_url, "User") == changed  # nothing applied without --apply

    assert opsbook.run("restore.diff", "--env", "prod", "--from", "staging", "--table", "User", "--apply",
                       "--confirm", "staging").exit_code == 2  # a protected environment: its own name or nothing
    applied = opsbook.run("restore.diff", "--env", "staging", "--table", "User", "--out", str(out),
                          "--restore-changed", "--apply")
    assert applied.exit_code == 0 and "applied 5 statement(s)" in applied.stderr, applied
    same = opsbook.run("restore.diff", "--env", "staging", "--table", "User", "--json")
    assert same.exit_code == 0, same
    assert same.json()["diff"]["backup_sha256"] == same.json()["diff"]["live_sha256"]
    assert table_hash(source_url, "User") == before == table_hash(copy, "User")

    nokey = opsbook.run("restore.diff", "--env", "staging", "--table", "nokey")
    assert nokey.exit_code == 2 and "has no primary key" in nokey.stderr, nokey
    assert databases_like(postgres_server, f"{source_name}\\_\\_diff%") == []
    assert_no_secret(opsbook, *envs["secrets"])


def test_a_backup_restores_onto_an_empty_server_with_its_owners_and_grants(opsbook, envs, postgres_server,
                                                                            s3_server, second_postgres_server):
    suffix = uuid.uuid4().hex[:6]
    owner, reader, password = f"own_{suffix}", f"read_{suffix}", f"pw-{uuid.uuid4().hex}"
    source_name, source_url = envs["source"]
    with psycopg.connect(postgres_server.url().reveal(), autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {owner} LOGIN PASSWORD '{password}'; "
                           f"CREATE ROLE {reader} NOLOGIN CONNECTION LIMIT 5; GRANT {reader} TO {owner}")
        hashed = connection.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (owner,)).fetchone()[0]
    with psycopg.connect(source_url.reveal(), autocommit=True) as connection:
        connection.execute(f'ALTER TABLE "Brand" OWNER TO {owner}; GRANT SELECT ON "Image" TO {reader}')
    # one role exists on the empty server already: it must not be altered
    with psycopg.connect(second_postgres_server.url().reveal(), autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {reader} NOLOGIN CONNECTION LIMIT 3")
    fresh = Secret(second_postgres_server.url(source_name).reveal())  # no such database yet
    write_inventory(opsbook, s3_server, {
        "staging": {"backups": backups_section(s3_server.endpoint, envs["buckets"]["staging"], "staging/")},
        "fresh": {}}, {"staging": source_url, "fresh": fresh})

    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    backup_id = made.json()["backup"]["backup_id"]
    manifest = json.loads(s3_server.client().get_object(
        Bucket=envs["buckets"]["staging"], Key=f"staging/backups/{backup_id}/manifest.json")["Body"].read())
    stored = manifest["globals"]
    assert stored["key"] == f"backups/{backup_id}/globals.sql.zst" and stored["role_passwords"] is True
    head = s3_server.client().head_object(Bucket=envs["buckets"]["staging"], Key=f"staging/{stored['key']}")
    assert head["ContentLength"] == stored["size"]

    restored = opsbook.run("restore", "--env", "fresh", "--from", "staging", "--with-globals")
    assert restored.exit_code == 0, restored
    assert f"{reader} skipped: exists" in restored.stderr and owner in restored.stderr
    with psycopg.connect(fresh.reveal()) as connection:
        assert connection.execute("""SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'Brand'
                                  """).fetchone() == (owner,)
        assert connection.execute("""SELECT has_table_privilege(%s, '"Image"', 'SELECT'),
                                    has_table_privilege(%s, '"User"', 'SELECT'), pg_has_role(%s, %s, 'MEMBER')""",
                                  (reader, reader, owner, reader)).fetchone() == (True, False, True)
        assert connection.execute("SELECT rolconnlimit, rolpassword = %s FROM pg_authid WHERE rolname IN (%s, %s) "
                                  "ORDER BY rolname = %s", (hashed, reader, owner, owner)).fetchall() == [
            (3, None), (-1, True)]  # the existing role untouched; the created one with its password
    assert row_counts(fresh) == row_counts(source_url)

    client, key = s3_server.client(), f"staging/{stored['key']}"
    damaged = bytearray(client.get_object(Bucket=envs["buckets"]["staging"], Key=key)["Body"].read())
    damaged[len(damaged) // 2] ^= 0x01
    client.put_object(Bucket=envs["buckets"]["staging"], Key=key, Body=bytes(damaged))
    checked = opsbook.run("backup.verify", "--env", "staging", "--id", backup_id)
    assert checked.exit_code == 3 and f"{stored['key']}: sha256" in checked.stderr, checked
    assert_no_secret(opsbook, *envs["secrets"], password, hashed)


def test_a_backup_of_two_databases_restores_both_or_neither_and_one_on_request(opsbook, envs, postgres_server,
                                                                                s3_server):
    (app, app_url), (other, other_url) = envs["source"], make_database(postgres_server)
    bucket, nearby = envs["buckets"]["staging"], s3_server.make_bucket().bucket
    write_inventory(opsbook, s3_server, {"staging": {
        "database": {"url": "${env:DB_URL_STAGING}", "names": [app, other]},
        "backups": backups_section(s3_server.endpoint, bucket, "staging/",
                                   copies=[{"name": "nearby", "bucket": nearby, "prefix": "near/"}])},
        "prod": {"protected": True}}, {"staging": app_url, "prod": envs["target"][1]})
    client = s3_server.client()

    def stored(where: str, prefix: str) -> list[str]:
        return sorted(item["Key"] for item in client.list_objects_v2(Bucket=where).get("Contents", [])
                      if item["Key"].startswith(prefix))

    planned = opsbook.run("backup", "--env", "staging", "--dry-run")
    assert planned.exit_code == 0 and stored(bucket, "") == [], planned
    assert f"would dump {app} (" in planned.stderr and f"would dump {other} (" in planned.stderr
    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    backup_id = made.json()["backup"]["backup_id"]
    folder = f"backups/{backup_id}/"
    assert [d["name"] for d in made.json()["backup"]["databases"]] == [app, other]
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"staging/{folder}manifest.json")["Body"].read())
    keys = [f"{folder}databases/{name}/dump.pgc.zst" for name in (app, other)]
    assert [(d["name"], d["object"]["key"]) for d in manifest["databases"]] == [(app, keys[0]), (other, keys[1])]
    assert manifest["object"]["key"] == keys[0] and manifest["database"]["name"] == app
    assert [d["row_counts"] for d in manifest["databases"]] == [row_counts(app_url), row_counts(other_url)]
    assert stored(bucket, "staging/backups/") == sorted([f"staging/{key}" for key in keys] + [
        f"staging/{folder}globals.sql.zst", f"staging/{folder}manifest.json"])
    assert stored(nearby, f"near/{folder}databases/") == sorted(f"near/{key}" for key in keys)  # both copied
    listed = opsbook.run("backup.list", "--env", "staging", "--json")
    assert [d["name"] for d in listed.json()["backups"][0]["databases"]] == [app, other], listed
    deep = opsbook.run("backup.verify", "--env", "staging", "--deep", "--copy", "nearby")  # each dump there
    assert deep.exit_code == 0 and deep.stderr.count("restored into a scratch database") == 2, deep

    def break_both() -> None:
        for url in (app_url, other_url):
            with psycopg.connect(url.reveal(), autocommit=True) as connection:
                connection.execute('DELETE FROM "Image"; DROP TABLE "User" CASCADE')

    counts_before = row_counts(app_url)
    samples = {url: [rows(url, query) for query in SAMPLES.values()] for url in (app_url, other_url)}

    def intact(url: Secret) -> bool:
        counts = manifest["databases"][0 if url is app_url else 1]["row_counts"]
        return row_counts(url) == counts and [rows(url, query) for query in SAMPLES.values()] == samples[url]

    planned = opsbook.run("restore", "--env", "staging", "--dry-run")  # one load and one swap per database
    assert planned.exit_code == 0 and all(f"would make {name}__restore_" in planned.stderr for name in (app, other))
    assert databases_like(postgres_server, f"{app}\\_\\_%") == [] and row_counts(app_url) == counts_before

    break_both()
    good = client.get_object(Bucket=bucket, Key=f"staging/{keys[1]}")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"staging/{keys[1]}", Body=good[:-10] + b"0123456789")
    refused = opsbook.run("restore", "--env", "staging")  # the second is damaged: neither is swapped
    assert refused.exit_code == 3 and f"backup {backup_id} is damaged" in refused.stderr, refused
    assert "public.User" not in row_counts(app_url) and "public.User" not in row_counts(other_url)
    assert databases_like(postgres_server, f"{app}\\_\\_%") == databases_like(postgres_server, f"{other}\\_\\_%") == []

    client.put_object(Bucket=bucket, Key=f"staging/{keys[1]}", Body=good)
    restored = opsbook.run("restore", "--env", "staging", "--json")
    assert restored.exit_code == 0, restored
    assert sorted(restored.json()["restored"]["databases"]) == sorted([app, other])
    assert restored.json()["restored"]["backup_id"] == backup_id
    assert intact(app_url) and intact(other_url)

    break_both()
    across = opsbook.run("restore", "--env", "prod", "--from", "staging", "--confirm", "prod")
    assert across.exit_code == 2 and "prod's database.names must list as many" in across.stderr, across
    assert marker(envs["target"][1]) == [("before the restore",)]
    unknown = opsbook.run("restore", "--env", "staging", "--database", "nope")
    assert unknown.exit_code == 2 and f"it holds {app}, {other}" in unknown.stderr, unknown
    one = opsbook.run("restore", "--env", "staging", "--database", other)
    assert one.exit_code == 0, one
    assert intact(other_url) and "public.User" not in row_counts(app_url)

    ambiguous = opsbook.run("restore.diff", "--env", "staging", "--table", "Brand")
    assert ambiguous.exit_code == 2 and "holds several databases" in ambiguous.stderr, ambiguous
    picked = opsbook.run("restore.diff", "--env", "staging", "--table", "Brand", "--database", other, "--json")
    assert picked.exit_code == 0 and picked.json()["diff"]["same"] == 20, picked
    assert_no_secret(opsbook, *envs["secrets"])
