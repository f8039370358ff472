"""inv backup / backup.list / backup.verify through the real CLI, on real PostgreSQL and moto S3."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ops.secrets import Secret
from tests.cli import Opsbook, terminal_lines, wait_for
from tests.fixtures.backups import backups_section, write_inventory
from tests.fixtures.postgres import row_counts
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.shop import databases_like, make_database, unprivileged_url


def stored_keys(s3_server: Any, bucket: str) -> list[str]:
    return [item["Key"] for item in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def dangling_uploads(client: Any, bucket: str) -> list[str]:
    return [upload["Key"] for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def step_states(opsbook: Opsbook, run_id: str, step: str) -> list[str]:
    return [e["state"] for e in opsbook.journal(run_id) if e["event"] == "step" and e["step"] == step]


@pytest.fixture(scope="module")
def big_database(postgres_server: Any) -> tuple[str, Secret]:
    """~80 MB of poorly compressible text: a backup of it is still uploading when a test strikes."""
    return make_database(postgres_server, big_rows=80_000)


@pytest.fixture
def staging(opsbook: Opsbook, postgres_server: Any, s3_server: Any) -> dict[str, Any]:
    name, url = make_database(postgres_server)
    bucket = s3_server.make_bucket().bucket
    write_inventory(opsbook, s3_server, {"staging": {
        "backups": backups_section(s3_server.endpoint, bucket, "staging/", metrics_file="metrics/backup.prom")}},
        {"staging": url})
    return {"database": name, "url": url, "bucket": bucket,
            "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal()]}


def test_backup_then_list_verify_and_deep_verify(opsbook, staging, postgres_server, s3_server):
    dry = opsbook.run("backup", "--env", "staging", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "would dump" in dry.stderr and "pg_dump 15" in dry.stderr
    assert stored_keys(s3_server, staging["bucket"]) == []

    made = opsbook.run("backup", "--env", "staging", "--tag", "nightly", "--keep", "--json")
    assert made.exit_code == 0, made
    backup_id = made.json()["backup"]["backup_id"]
    keys = stored_keys(s3_server, staging["bucket"])
    assert f"staging/backups/{backup_id}/manifest.json" in keys
    manifest = json.loads(s3_server.client().get_object(
        Bucket=staging["bucket"], Key=f"staging/backups/{backup_id}/manifest.json")["Body"].read())
    stored = s3_server.client().get_object(Bucket=staging["bucket"], Key=f"staging/{manifest['object']['key']}")
    assert manifest["object"]["sha256"] == hashlib.sha256(stored["Body"].read()).hexdigest()
    assert manifest["row_counts"] == row_counts(staging["url"])
    assert manifest["row_counts"]["public.Image"] == 500
    assert manifest["migrations"] == ["20250101120000_init"]
    assert {"name": "plpgsql", "version": "1.0"} in manifest["extensions"]
    assert (manifest["tags"], manifest["keep"], manifest["env"]) == (["nightly"], True, "staging")
    assert manifest["database"]["server_major"] == 15 and manifest["pg_dump"]["major"] >= 15
    assert manifest["snapshot"] and manifest["object"]["encryption"] is None
    assert step_states(opsbook, made.json()["run_id"], "manifest")[-1] == "verified"

    metrics = (opsbook.root / "metrics" / "backup.prom").read_text()
    assert f'opsbook_backup_size_bytes{{env="staging"}} {manifest["object"]["size"]}' in metrics
    assert 'opsbook_backup_last_success_timestamp_seconds{env="staging"}' in metrics

    listed = opsbook.run("backup.list", "--env", "staging", "--json")
    assert listed.exit_code == 0, listed
    assert [(b["id"], b["tags"], b["keep"], b["verified"]) for b in listed.json()["backups"]] == [
        (backup_id, ["nightly"], True, None)]
    assert listed.json()["incomplete"] == [] and listed.json()["uploads"] == []

    checked = opsbook.run("backup.verify", "--env", "staging", "--json")
    assert checked.exit_code == 0, checked
    deep = opsbook.run("backup.verify", "--env", "staging", "--id", backup_id, "--deep")
    assert deep.exit_code == 0, deep
    assert "restored into a scratch database: 4 tables" in deep.stderr
    assert databases_like(postgres_server, f"{staging['database']}\\_\\_verify%") == []
    listed = opsbook.run("backup.list", "--env", "staging")
    assert "deep" in listed.stderr.splitlines()[2]  # title, header, the backup
    records = json.loads(s3_server.client().get_object(
        Bucket=staging["bucket"], Key=f"staging/backups/{backup_id}/verification.json")["Body"].read())
    assert [(r["kind"], r["ok"]) for r in records] == [("checksum", True), ("deep", True)]
    assert_no_secret(opsbook, *staging["secrets"])


def test_a_locked_backup_survives_a_delete_and_a_prune(opsbook, postgres_server, s3_server):
    _name, url = make_database(postgres_server)
    bucket = s3_server.unique_bucket_name("locked")
    client = s3_server.client()
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    single = {"keep_last": 1, "daily": 1, "weekly": 1, "monthly": 1, "min_keep": 1}
    unlockable = s3_server.make_bucket().bucket
    for name in (unlockable, bucket):
        write_inventory(opsbook, s3_server, {"staging": {"backups": backups_section(
            s3_server.endpoint, name, "staging/", lock_days=2, retention=single)}}, {"staging": url})
        if name == unlockable:  # refused before anything is dumped
            refused = opsbook.run("backup", "--env", "staging")
            assert refused.exit_code == 3 and "the bucket has no Object Lock" in refused.stderr, refused
            assert stored_keys(s3_server, unlockable) == []
    first = opsbook.run("backup", "--env", "staging", "--json")
    assert first.exit_code == 0, first
    first_id = first.json()["backup"]["backup_id"]
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"staging/backups/{first_id}/manifest.json")
                          ["Body"].read())
    assert manifest["lock"]["mode"] == "governance"
    until = manifest["lock"]["retain_until"]
    assert manifest["globals"]["key"] == f"backups/{first_id}/globals.sql.zst"
    for name in ("dump.pgc.zst", "globals.sql.zst", "manifest.json"):
        head = client.head_object(Bucket=bucket, Key=f"staging/backups/{first_id}/{name}")
        assert (head["ObjectLockMode"], head["ObjectLockRetainUntilDate"].strftime("%Y-%m-%dT%H:%M:%SZ")) == (
            "GOVERNANCE", until)

    # what a leaked key would try: delete the dump's very version (a plain delete only adds a marker)
    dump = f"staging/backups/{first_id}/dump.pgc.zst"
    version = client.head_object(Bucket=bucket, Key=dump)["VersionId"]
    with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key=dump, VersionId=version)

    second = opsbook.run("backup", "--env", "staging", "--json")  # its retention leaves the first held
    assert second.exit_code == 0, second
    pruned = opsbook.run("backup.prune", "--env", "staging", "--json")
    assert pruned.exit_code == 0, pruned
    assert f"held   {first_id}" in pruned.stderr and f"held until {until} by the object lock" in pruned.stderr
    held = {d["id"]: d["decision"] for d in pruned.json()["decisions"]}
    assert held == {first_id: "held", second.json()["backup"]["backup_id"]: "keep"}
    assert client.get_object(Bucket=bucket, Key=dump, VersionId=version)["VersionId"] == version
    assert client.head_object(Bucket=bucket, Key=f"staging/backups/{first_id}/manifest.json")  # still listed


def test_on_r2_a_bucket_lock_rule_holds_the_backups(opsbook, postgres_server, s3_server, cloudflare_api):
    _name, url = make_database(postgres_server)
    account = cloudflare_api.new_account()
    bucket = s3_server.make_bucket().bucket
    single = {"keep_last": 1, "daily": 1, "weekly": 1, "monthly": 1, "min_keep": 1}
    write_inventory(opsbook, s3_server, {"staging": {
        "backups": backups_section(s3_server.endpoint, bucket, "staging/", provider="r2", lock_days=3,
                                   retention=single),
        "keys": {"provider": "cloudflare", "account_id": account.account_id,
                 "api_token": "${env:CLOUDFLARE_API_TOKEN}", "api_base": cloudflare_api.base_url}}},
        {"staging": url})
    s3_server.client().put_bucket_versioning(  # every write of a key kept: a rewrite shows as a second version
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    opsbook.environ["CLOUDFLARE_API_TOKEN"] = "not-a-token"
    refused = opsbook.run("backup", "--env", "staging")
    assert refused.exit_code == 3 and "Workers R2 Storage: Edit" in refused.stderr, refused  # a failed check
    assert stored_keys(s3_server, bucket) == []
    opsbook.environ["CLOUDFLARE_API_TOKEN"] = account.api_token.reveal()
    cloudflare_api.bucket_locks[account.account_id][bucket] = [  # someone else's rule: kept as it is
        {"id": "uploads", "enabled": True, "prefix": "uploads/", "condition": {"type": "Indefinite"}}]
    first = opsbook.run("backup", "--env", "staging", "--json")
    assert first.exit_code == 0, first
    rule = {"id": "opsbook-backups-staging", "enabled": True, "prefix": "staging/backups/",
            "condition": {"type": "Age", "maxAgeSeconds": 3 * 86400}}
    assert [r["id"] for r in cloudflare_api.bucket_locks[account.account_id][bucket]] == ["uploads", rule["id"]]
    assert cloudflare_api.bucket_locks[account.account_id][bucket][1] == rule
    second = opsbook.run("backup", "--env", "staging", "--json")
    assert second.exit_code == 0, second
    assert [call for call in cloudflare_api.calls(account.account_id) if call.startswith("PUT")] == [
        f"PUT /r2/buckets/{bucket}/lock"]  # the rule was there: set once
    first_id = first.json()["backup"]["backup_id"]
    manifest = json.loads(s3_server.client().get_object(
        Bucket=bucket, Key=f"staging/backups/{first_id}/manifest.json")["Body"].read())
    assert manifest["lock"]["mode"] == "r2-bucket-lock"
    pruned = opsbook.run("backup.prune", "--env", "staging", "--json")
    assert pruned.exit_code == 0, pruned
    assert f"held until {manifest['lock']['retain_until']} by the object lock" in pruned.stderr
    assert first_id in {d["id"] for d in pruned.json()["decisions"] if d["decision"] == "held"}

    # R2 refuses to rewrite an object the rule holds: a verification's record must never need to
    for _ in range(2):  # the second is the one that would rewrite the record
        checked = opsbook.run("backup.verify", "--env", "staging", "--id", first_id)
        assert checked.exit_code == 0, checked
    client = s3_server.client()
    written = [version["Key"] for version in client.list_object_versions(Bucket=bucket, Prefix=rule["prefix"])
               ["Versions"]]
    assert sorted(key for key in set(written) if written.count(key) > 1) == [], "objects under the rule rewritten"
    records = json.loads(client.get_object(Bucket=bucket, Key=f"staging/verifications/{first_id}.json")["Body"].read())
    assert [(record["kind"], record["ok"]) for record in records] == [("checksum", True)] * 2
    watched = opsbook.run("backup.check", "--env", "staging", "--json")
    assert watched.json()["last_verification"]["id"] == first_id, watched


def test_on_a_terminal_the_upload_shows_a_progress_bar_and_with_json_none(opsbook, staging):
    shown = opsbook.run_on_terminal("backup", "--env", "staging")
    assert shown.exit_code == 0, shown
    bars = [line for line in terminal_lines(shown.stderr) if line.startswith("uploaded") and "━" in line]
    assert bars and " kB" in bars[-1] and "kB/s" in bars[-1], shown.stderr  # bytes so far, the rate
    as_json = opsbook.run_on_terminal("backup", "--env", "staging", "--json")  # a script reads it: no bar
    assert as_json.exit_code == 0, as_json
    assert "━" not in as_json.stderr and "\x1b[" not in as_json.stderr, as_json
    assert_no_secret(opsbook, *staging["secrets"])


def test_a_failing_dump_leaves_no_backup(opsbook, staging, postgres_server, s3_server):
    opsbook.environ["DB_URL_STAGING"], password = unprivileged_url(postgres_server, staging["database"])
    failed = opsbook.run("backup", "--env", "staging")
    assert failed.exit_code == 1, failed
    assert "permission denied" in failed.stderr and "Traceback" not in failed.output
    assert not any(key.endswith("manifest.json") or "/dump" in key for key in stored_keys(s3_server,
                                                                                        staging["bucket"]))
    assert dangling_uploads(s3_server.client(), staging["bucket"]) == []
    assert opsbook.run("backup.list", "--env", "staging", "--json").json()["backups"] == []
    assert_no_secret(opsbook, password, *staging["secrets"])


def test_killed_mid_upload_leaves_nothing_listed_and_the_next_backup_succeeds(
        opsbook, postgres_server, s3_server, big_database):
    _name, url = big_database
    bucket = s3_server.make_bucket().bucket
    write_inventory(opsbook, s3_server, {"staging": {"backups": backups_section(s3_server.endpoint, bucket, "s/")}},
                    {"staging": url})
    client = s3_server.client()
    first = opsbook.start("backup", "--env", "staging", "--no-prune")
    try:
        wait_for(lambda: dangling_uploads(client, bucket) or first.poll() is not None, timeout=60,
                 what="the backup's multipart upload")
        assert first.poll() is None, "the backup ended before the test could interrupt it"
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-upload, still holding its locks
        second = opsbook.run("backup", "--env", "staging")
        assert second.exit_code == 75, second
        assert "locked by run" in second.stderr and "(backup)" in second.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    listed = opsbook.run("backup.list", "--env", "staging", "--json")
    assert listed.json()["backups"] == [] and listed.json()["uploads"], listed

    # The next backup succeeds while the app keeps writing: its row counts come from the dump's own
    # snapshot, so the deep verification (restored rows against the manifest) agrees exactly.
    with concurrent_writes(url):
        after = opsbook.run("backup", "--env", "staging", "--no-prune", "--json")
    assert after.exit_code == 0, after
    assert [b["id"] for b in opsbook.run("backup.list", "--env", "staging", "--json").json()["backups"]] == [
        after.json()["backup"]["backup_id"]]
    deep = opsbook.run("backup.verify", "--env", "staging", "--deep")
    assert deep.exit_code == 0, deep


@contextlib.contextmanager
def concurrent_writes(url: Secret) -> Iterator[None]:
    """Inserts rows, one transaction each, until the block ends."""
    stop = threading.Event()
    inserted = []

    def write() -> None:
        with psycopg.connect(url.reveal(), autocommit=True) as connection:
            while not stop.is_set():
                connection.execute("INSERT INTO \"Image\" (caption, bytes) VALUES ('during the backup', 1)")
                inserted.append(1)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join(timeout=30)
    assert len(inserted) > 10, "the writer did not overlap the backup"


@contextlib.contextmanager
def separate_moto_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A moto server in its own process, so a test can kill it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def answering() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
            return False

        wait_for(answering, timeout=30, what="the separate moto server")
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.kill()
        process.wait(timeout=30)


def test_storage_dying_mid_upload_fails_clearly_with_nothing_kept(opsbook, s3_server, big_database):
    _name, url = big_database
    with separate_moto_server() as (endpoint, moto_process):
        import boto3.session
        from botocore.config import Config

        session = boto3.session.Session(aws_access_key_id=s3_server.access_key_id, region_name="us-east-1",
                                        aws_secret_access_key=s3_server.secret_access_key.reveal())
        other = session.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
        other.create_bucket(Bucket="doomed")
        write_inventory(opsbook, s3_server, {"staging": {"backups": backups_section(endpoint, "doomed", "s/")}},
                        {"staging": url})
        running = opsbook.start("backup", "--env", "staging", "--no-prune")
        wait_for(lambda: dangling_uploads(other, "doomed") or running.poll() is not None, timeout=60,
                 what="the backup's multipart upload")
        assert running.poll() is None, "the backup ended before the storage could be stopped"
        moto_process.kill()
        result = opsbook.collect(running, timeout=120)
    assert result.exit_code == 1, result
    assert endpoint in result.stderr and "cannot reach" in result.stderr and "Traceback" not in result.output
    run_id = opsbook.latest_run_id()
    assert step_states(opsbook, run_id, "dump")[-1] == "failed"
    assert "manifest" not in {e.get("step") for e in opsbook.journal(run_id) if e.get("state") == "started"}


def test_pg_dump_older_than_the_server_is_refused_naming_both(opsbook, s3_server, postgres18_server):
    url = postgres18_server.create_database("shop18")
    bucket = s3_server.make_bucket().bucket
    write_inventory(opsbook, s3_server, {"staging": {"backups": backups_section(s3_server.endpoint, bucket, "s/")}},
                    {"staging": url})
    for arguments in (["--dry-run"], []):
        refused = opsbook.run("backup", "--env", "staging", *arguments)
        assert refused.exit_code == 3, refused
        assert "PostgreSQL 18" in refused.stderr and "pg_dump 15" in refused.stderr
        assert "postgresql-client-18" in refused.stderr  # says what to do
    assert stored_keys(s3_server, bucket) == []
    assert_no_secret(opsbook, postgres18_server.password.reveal())


def test_backup_of_the_sandbox():
    from ops.sandbox import Sandbox

    base = Path(tempfile.mkdtemp(prefix="opsbook-backup-sandbox-"))
    base.chmod(0o755)  # the sandbox's cluster runs as `postgres` when we are root
    workspace = Opsbook(base / "workspace")
    workspace.root.mkdir()
    workspace.root.chmod(0o755)
    workspace.write_inventory({"project": "sandboxtest", "default_env": "local", "envs": {"local": {"sandbox": True}}})
    try:
        made = workspace.run("backup", "--env", "local", "--json", timeout=300)
        assert made.exit_code == 0, made
        listed = workspace.run("backup.list", "--json")
        assert [b["id"] for b in listed.json()["backups"]] == [made.json()["backup"]["backup_id"]]
        started = time.monotonic()
        checked = workspace.run("backup.verify", "--deep")
        assert checked.exit_code == 0, checked
        assert time.monotonic() - started < 60
    finally:
        Sandbox(workspace.state_dir / "sandbox").destroy()
        shutil.rmtree(base, ignore_errors=True)
