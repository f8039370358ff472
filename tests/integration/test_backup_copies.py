"""backups.copies through the real CLI: a copy on a second, separate S3 server (streamed) and one beside the
backup bucket (server-side), on real PostgreSQL; the copy outlives the backup bucket and restores."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from ops.backup_manifest import DatabaseInfo, Manifest, StoredObject, ToolInfo, dump_key, write_manifest
from ops.clock import iso_z
from ops.journal import new_run_id
from ops.storage import open_storage
from tests.cli import Opsbook, wait_for
from tests.fixtures.backups import backups_section, store_backup, write_inventory
from tests.fixtures.break_glass import TOOLS, break_glass_commands, operator_environment, run_commands
from tests.fixtures.postgres import row_counts
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.shop import make_database


def keys(server: Any, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in server.client().list_objects_v2(Bucket=bucket).get("Contents", []))


def backup_keys(server: Any, bucket: str, backup_id: str) -> list[str]:
    return [key for key in keys(server, bucket) if f"/backups/{backup_id}/" in key]


def copies_of(opsbook: Opsbook, backup_id: str) -> dict[str, Any]:
    listed = opsbook.run("backup.list", "--env", "staging", "--json")
    assert listed.exit_code == 0, listed
    return next(b for b in listed.json()["backups"] if b["id"] == backup_id)


@pytest.fixture
def copied(opsbook: Opsbook, postgres_server: Any, s3_server: Any, s3_copy_server: Any) -> dict[str, Any]:
    """staging backs up to a bucket on the session S3, with two copies: `offsite` on the second server
    (its own keys: streamed) and `nearby` in another bucket of the same server and keys (server-side)."""
    name, url = make_database(postgres_server)
    primary = s3_server.make_bucket().bucket
    nearby = s3_server.make_bucket().bucket
    offsite = s3_copy_server.make_bucket().bucket
    copies = [{"name": "offsite", "provider": "s3", "endpoint": s3_copy_server.endpoint, "region": "us-east-1",
               "bucket": offsite, "prefix": "far/", "access_key_id": "${env:OFFSITE_KEY_ID}",
               "secret_access_key": "${env:OFFSITE_SECRET}"},
              {"name": "nearby", "bucket": nearby, "prefix": "near/"}]
    write_inventory(opsbook, s3_server, {"staging": {
        "backups": backups_section(s3_server.endpoint, primary, "staging/", copies=copies)}}, {"staging": url})
    opsbook.environ.update(OFFSITE_KEY_ID=s3_copy_server.access_key_id,
                           OFFSITE_SECRET=s3_copy_server.secret_access_key.reveal())
    return {"database": name, "url": url, "primary": primary, "nearby": nearby, "offsite": offsite,
            "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal(),
                        s3_copy_server.secret_access_key.reveal()]}


def test_the_copies_outlive_the_backup_bucket_and_restore(opsbook, copied, postgres_server, s3_server, s3_copy_server,
                                                         tmp_path):
    dry = opsbook.run("backup", "--env", "staging", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "→ nearby (server-side)" in dry.stderr and "→ offsite (streamed)" in dry.stderr
    assert keys(s3_copy_server, copied["offsite"]) == [] and keys(s3_server, copied["nearby"]) == []

    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    backup_id = made.json()["backup"]["backup_id"]
    assert sorted((c["copy"], c["how"]) for c in made.json()["copies"]) == [
        ("nearby", "server-side"), ("offsite", "streamed")]
    manifest = json.loads(s3_server.client().get_object(
        Bucket=copied["primary"], Key=f"staging/backups/{backup_id}/manifest.json")["Body"].read())
    for server, bucket, prefix in ((s3_copy_server, copied["offsite"], "far/"), (s3_server, copied["nearby"], "near/")):
        client = server.client()
        assert json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}backups/{backup_id}/manifest.json")
                          ["Body"].read()) == manifest
        dumped = client.get_object(Bucket=bucket, Key=f"{prefix}{manifest['object']['key']}")["Body"].read()
        assert hashlib.sha256(dumped).hexdigest() == manifest["object"]["sha256"]
        roles = client.get_object(Bucket=bucket, Key=f"{prefix}{manifest['globals']['key']}")["Body"].read()
        assert hashlib.sha256(roles).hexdigest() == manifest["globals"]["sha256"]  # the roles travel with it
    listed = copies_of(opsbook, backup_id)
    assert (listed["copies"], listed["copy_missing"]) == ({"offsite": True, "nearby": True}, [])

    verified = opsbook.run("backup.verify", "--env", "staging", "--json")
    assert verified.exit_code == 0, verified
    assert sorted(str(r["copy"]) for r in verified.json()["verified"]) == ["None", "nearby", "offsite"]
    one = opsbook.run("backup.verify", "--env", "staging", "--copy", "offsite", "--json")
    assert one.exit_code == 0, one
    assert [(r["id"], r["copy"], r["ok"]) for r in one.json()["verified"]] == [(backup_id, "offsite", True)]
    assert f"far/backups/{backup_id}/verification.json" in keys(s3_copy_server, copied["offsite"])

    # The backup bucket is lost; the live data is damaged.
    client = s3_server.client()
    for key in keys(s3_server, copied["primary"]):
        client.delete_object(Bucket=copied["primary"], Key=key)
    client.delete_bucket(Bucket=copied["primary"])
    with psycopg.connect(copied["url"].reveal(), autocommit=True) as connection:
        connection.execute('DELETE FROM "Image" WHERE id % 3 = 0')

    refused = opsbook.run("restore", "--env", "staging", "--backup", backup_id)
    assert refused.exit_code == 3, refused
    assert "--copy offsite or --copy nearby" in refused.stderr and "Traceback" not in refused.output
    restored = opsbook.run("restore", "--env", "staging", "--copy", "offsite", "--json")
    assert restored.exit_code == 0, restored
    assert restored.json()["restored"]["backup_id"] == backup_id
    assert row_counts(copied["url"]) == manifest["row_counts"]
    assert_no_secret(opsbook, *copied["secrets"])

    # The README's break-glass block, verbatim, on the copy.
    assert not [tool for tool in TOOLS if shutil.which(tool) is None], "break-glass tools missing"
    target_db = f"breakglass_{uuid.uuid4().hex[:8]}"
    workdir = tmp_path / "restore"
    workdir.mkdir()
    environment = operator_environment(s3_copy_server, postgres_server, copied["offsite"], "far/", target_db,
                                       tmp_path, None)
    ran = run_commands(break_glass_commands(), workdir, environment)
    assert ran.returncode == 0, f"exit {ran.returncode}\n--- stdout\n{ran.stdout}\n--- stderr\n{ran.stderr}"
    assert f"all row counts match: {target_db} holds backup {backup_id}" in ran.stdout
    assert row_counts(postgres_server.url(target_db)) == manifest["row_counts"]


def manifest_ids(server: Any, bucket: str) -> list[str]:
    """The ids of the backups with a manifest in `bucket`, oldest first."""
    return sorted(key.split("/")[-2] for key in keys(server, bucket) if key.endswith("/manifest.json"))


def test_a_failing_copy_exits_1_keeps_the_backup_and_is_filled_in_later(opsbook, copied, s3_server, s3_copy_server):
    opsbook.environ["OFFSITE_SECRET"] = "not-the-offsite-secret"
    failed = opsbook.run("backup", "--env", "staging")
    assert failed.exit_code == 1, failed
    assert "copy missing: offsite" in failed.stderr and "refused our keys" in failed.stderr
    assert "Traceback" not in failed.output
    [first] = manifest_ids(s3_server, copied["primary"])
    assert manifest_ids(s3_server, copied["nearby"]) == [first]
    unverifiable = opsbook.run("backup.verify", "--env", "staging")  # the others are verified all the same
    assert unverifiable.exit_code == 1 and "1 copy(ies) could not be read" in unverifiable.stderr, unverifiable
    assert f"staging/backups/{first}/verification.json" in keys(s3_server, copied["primary"])
    assert f"near/backups/{first}/verification.json" in keys(s3_server, copied["nearby"])
    opsbook.environ["OFFSITE_SECRET"] = s3_copy_server.secret_access_key.reveal()
    listed = opsbook.run("backup.list", "--env", "staging", "--json")
    assert [(b["id"], b["copies"], b["copy_missing"]) for b in listed.json()["backups"]] == [
        (first, {"offsite": False, "nearby": True}, ["offsite"])]
    assert "nearby copy missing: offsite" in listed.stderr, listed

    dry = opsbook.run("backup.copy", "--env", "staging", "--id", first, "--dry-run")
    assert dry.exit_code == 0 and f"{first} → offsite (streamed)" in dry.stderr, dry
    assert keys(s3_copy_server, copied["offsite"]) == []
    filled = opsbook.run("backup.copy", "--env", "staging", "--id", first, "--json")
    assert filled.exit_code == 0, filled
    assert [(c["id"], c["copy"]) for c in filled.json()["copied"]] == [(first, "offsite")]

    # The next backup fills in what a copy missed.
    opsbook.environ["OFFSITE_SECRET"] = "not-the-offsite-secret"
    assert opsbook.run("backup", "--env", "staging").exit_code == 1
    [missed] = sorted(set(manifest_ids(s3_server, copied["primary"])) - {first})
    opsbook.environ["OFFSITE_SECRET"] = s3_copy_server.secret_access_key.reveal()
    assert manifest_ids(s3_copy_server, copied["offsite"]) == [first]
    nightly = opsbook.run("backup", "--env", "staging", "--json")
    assert nightly.exit_code == 0, nightly
    latest = nightly.json()["backup"]["backup_id"]
    assert sorted(c["id"] for c in nightly.json()["copies"] if c["copy"] == "offsite") == sorted([missed, latest])
    assert manifest_ids(s3_copy_server, copied["offsite"]) == sorted([first, missed, latest])
    assert_no_secret(opsbook, *copied["secrets"])


def test_prune_prunes_each_copy_by_the_same_policy(opsbook, copied, s3_server, s3_copy_server):
    now = datetime.now(UTC)
    offsite = open_storage(s3_copy_server.config(copied["offsite"], prefix="far/"))
    primary = open_storage(s3_server.config(copied["primary"], prefix="staging/"))
    ids = {when: [store_backup(storage, now - timedelta(days=when)) for storage in (primary, offsite)]
           for when in (0, 3, 10)}
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["staging"]["backups"]["retention"] = {"keep_last": 1, "daily": 0, "weekly": 0, "monthly": 0,
                                                           "min_keep": 1}
    opsbook.write_inventory(inventory)
    dry = opsbook.run("backup.prune", "--env", "staging", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "on copy offsite" in dry.stderr and "copy offsite: by the same policy 2 to delete" in dry.stderr
    assert len([k for k in keys(s3_copy_server, copied["offsite"]) if k.endswith("manifest.json")]) == 3
    pruned = opsbook.run("backup.prune", "--env", "staging", "--json")
    assert pruned.exit_code == 0, pruned
    assert pruned.json()["copies"]["offsite"]["keep"] == [ids[0][1]]
    assert [k for k in keys(s3_copy_server, copied["offsite"]) if k.endswith("manifest.json")] == [
        f"far/backups/{ids[0][1]}/manifest.json"]
    assert [k for k in keys(s3_server, copied["primary"]) if k.endswith("manifest.json")] == [
        f"staging/backups/{ids[0][0]}/manifest.json"]


def store_large_backup(storage: Any, size: int) -> str:
    """A complete backup whose dump is `size` random bytes, written as backup writes one (manifest last)."""
    finished = datetime.now(UTC)
    backup_id = new_run_id(finished)
    key = dump_key(backup_id, encrypted=False)
    data = os.urandom(size)
    storage.put_bytes(key, data)
    write_manifest(storage, Manifest(
        id=backup_id, project="backuptest", env="staging", run_id=backup_id,
        database=DatabaseInfo("shop", "app@127.0.0.1:5432/shop", "15.4", 15), pg_dump=ToolInfo("15.4", 15),
        snapshot="00000003-1", started_at=iso_z(finished - timedelta(seconds=5)), finished_at=iso_z(finished),
        seconds=5.0, object=StoredObject(key, size, hashlib.sha256(data).hexdigest(), size)))
    return backup_id


def peak_rss_mib(opsbook: Opsbook, *args: str) -> float:
    """The CLI's own peak RSS (VmHWM, counted from its exec: not the size of this process it forked from)."""
    process = opsbook.start(*args)
    peak_kib = 0
    while process.poll() is None:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kib = max([peak_kib, *(int(line.split()[1]) for line in status.splitlines()
                                        if line.startswith("VmHWM:"))])
        time.sleep(0.02)  # the transfer takes seconds; its peak (the parts in flight) lasts through it
    stderr = process.stderr.read() if process.stderr else ""
    assert process.returncode == 0 and peak_kib, stderr
    return peak_kib / 1024


def test_the_streamed_copy_keeps_memory_to_its_parts(opsbook, copied, s3_server, s3_copy_server):
    primary = open_storage(s3_server.config(copied["primary"], prefix="staging/"))
    small = store_large_backup(primary, 1024 * 1024)
    large = store_large_backup(primary, 96 * 1024 * 1024)
    # Interrupted mid-copy (its multipart upload under way): the copy is left without the backup, and clean.
    offsite = s3_copy_server.client()
    running = opsbook.start("backup.copy", "--env", "staging", "--id", large, "--copy", "offsite")
    wait_for(lambda: offsite.list_multipart_uploads(Bucket=copied["offsite"]).get("Uploads")
             or running.poll() is not None, timeout=60, what="the copy's multipart upload")
    assert running.poll() is None, "the copy ended before the test could interrupt it"
    running.send_signal(signal.SIGINT)
    interrupted = opsbook.collect(running, timeout=60)
    assert interrupted.exit_code == 130, interrupted
    assert backup_keys(s3_copy_server, copied["offsite"], large) == []
    assert not offsite.list_multipart_uploads(Bucket=copied["offsite"]).get("Uploads")

    peaks = {backup_id: peak_rss_mib(opsbook, "backup.copy", "--env", "staging", "--id", backup_id,
                                     "--copy", "offsite") for backup_id in (small, large)}
    # 96 MiB read whole would add at least that much; two 16 MiB parts in flight add about a third of it.
    assert peaks[large] - peaks[small] < 48, peaks
    assert f"far/backups/{large}/manifest.json" in keys(s3_copy_server, copied["offsite"])


def test_copies_of_a_locked_backup_are_locked_until_the_same_date(opsbook, postgres_server, s3_server, s3_copy_server):
    """backups.lock_days with copies: the dump, globals and manifest on each copy (server-side on the same
    server, streamed to the other) carry the primary's retention; a delete of a copy's version is refused
    and retention holds the backup on every copy."""
    _name, url = make_database(postgres_server)
    buckets = {"primary": (s3_server, s3_server.unique_bucket_name("locked")),
               "nearby": (s3_server, s3_server.unique_bucket_name("locked")),
               "offsite": (s3_copy_server, s3_copy_server.unique_bucket_name("locked"))}
    for server, bucket in buckets.values():
        server.client().create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    copies = [{"name": "offsite", "provider": "s3", "endpoint": s3_copy_server.endpoint, "region": "us-east-1",
               "bucket": buckets["offsite"][1], "prefix": "far/", "access_key_id": "${env:OFFSITE_KEY_ID}",
               "secret_access_key": "${env:OFFSITE_SECRET}"},
              {"name": "nearby", "bucket": buckets["nearby"][1], "prefix": "near/"}]
    single = {"keep_last": 1, "daily": 0, "weekly": 0, "monthly": 0, "min_keep": 1}
    write_inventory(opsbook, s3_server, {"staging": {"backups": backups_section(
        s3_server.endpoint, buckets["primary"][1], "staging/", copies=copies, lock_days=2, retention=single)}},
        {"staging": url})
    opsbook.environ.update(OFFSITE_KEY_ID=s3_copy_server.access_key_id,
                           OFFSITE_SECRET=s3_copy_server.secret_access_key.reveal())
    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    backup_id = made.json()["backup"]["backup_id"]
    assert sorted((c["copy"], c["how"]) for c in made.json()["copies"]) == [
        ("nearby", "server-side"), ("offsite", "streamed")]
    server, bucket = buckets["primary"]
    manifest = json.loads(server.client().get_object(
        Bucket=bucket, Key=f"staging/backups/{backup_id}/manifest.json")["Body"].read())
    until = manifest["lock"]["retain_until"]
    for name, prefix in (("primary", "staging/"), ("nearby", "near/"), ("offsite", "far/")):
        server, bucket = buckets[name]
        client = server.client()
        for stored in ("dump.pgc.zst", "globals.sql.zst", "manifest.json"):
            head = client.head_object(Bucket=bucket, Key=f"{prefix}backups/{backup_id}/{stored}")
            assert (head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate") and
                    head["ObjectLockRetainUntilDate"].strftime("%Y-%m-%dT%H:%M:%SZ")) == ("GOVERNANCE", until), (
                name, stored)
        dump = f"{prefix}backups/{backup_id}/dump.pgc.zst"
        version = client.head_object(Bucket=bucket, Key=dump)["VersionId"]
        with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
            client.delete_object(Bucket=bucket, Key=dump, VersionId=version)

    newer = {name: store_backup(open_storage(server.config(bucket, prefix=prefix)), datetime.now(UTC))
             for name, (server, bucket), prefix in zip(buckets, buckets.values(), ("staging/", "near/", "far/"),
                                                        strict=True)}  # retention (keep 1) would delete the first
    pruned = opsbook.run("backup.prune", "--env", "staging", "--json")
    assert pruned.exit_code == 0, pruned
    assert {d["id"]: d["decision"] for d in pruned.json()["decisions"]} == {backup_id: "held",
                                                                            newer["primary"]: "keep"}
    for name in ("offsite", "nearby"):
        decided = {d["id"]: d["decision"] for d in pruned.json()["copies"][name]["decisions"]}
        assert decided == {backup_id: "held", newer[name]: "keep"}, (name, decided)
    for name, prefix in (("primary", "staging/"), ("nearby", "near/"), ("offsite", "far/")):
        server, bucket = buckets[name]
        assert f"{prefix}backups/{backup_id}/manifest.json" in keys(server, bucket), name
