"""inv backup.prune through the real CLI, on moto's S3 server.

The backup history is arranged by writing manifests (with chosen finish times)
and small dump objects straight into the bucket; object ages that S3 does not let
a client choose are set in moto's own state, which lives in this process.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ops.backup_manifest import DatabaseInfo, Manifest, StoredObject, ToolInfo
from ops.retention import BackupInfo, RetentionPolicy, plan_retention
from tests.cli import Opsbook

PREFIX = "staging/"
RETENTION = {"keep_last": 3, "daily": 7, "weekly": 4, "monthly": 6, "min_keep": 3}


@dataclass
class History:
    bucket: str
    backups: list[BackupInfo]
    now: datetime

    def newest(self) -> BackupInfo:
        return max(self.backups, key=lambda b: b.finished_at)


def at_day(now: datetime, days_ago: int, hour: int) -> datetime:
    return (now - timedelta(days=days_ago)).replace(hour=hour, minute=0, second=0, microsecond=0)


def backup_id(finished: datetime) -> str:
    return f"{(finished - timedelta(minutes=5)):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:4]}"


def manifest_for(identifier: str, finished: datetime, *, keep: bool) -> Manifest:
    started = finished - timedelta(minutes=5)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    return Manifest(
        id=identifier, project="prunetest", env="staging", run_id=identifier,
        database=DatabaseInfo("shop", "app@127.0.0.1:5432/shop", "15.8", 15), pg_dump=ToolInfo("15.8", 15),
        snapshot="00000003-0000001B-1", started_at=started.strftime(stamp), finished_at=finished.strftime(stamp),
        seconds=300.0, object=StoredObject(key=f"backups/{identifier}/dump.pgc.zst", size=11, sha256="0" * 64,
                                           dump_size=11),
        row_counts={"public.Brand": 20}, tags=["nightly"], keep=keep)


def put_backup(client: Any, bucket: str, finished: datetime, *, keep: bool = False,
               verified: datetime | None = None) -> BackupInfo:
    identifier = backup_id(finished)
    client.put_object(Bucket=bucket, Key=f"{PREFIX}backups/{identifier}/dump.pgc.zst", Body=b"dump bytes!")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}backups/{identifier}/manifest.json",
                      Body=manifest_for(identifier, finished, keep=keep).dumps())
    if verified is not None:
        record = (f'[{{"at": "{verified:%Y-%m-%dT%H:%M:%SZ}", "kind": "checksum", "ok": true, '
                  f'"run_id": "r", "operator": "tester", "detail": ""}}]')
        client.put_object(Bucket=bucket, Key=f"{PREFIX}backups/{identifier}/verification.json", Body=record.encode())
    return BackupInfo(identifier, finished, 11, keep, verified)


def age_object(bucket: str, key: str, age: timedelta) -> None:
    """Make moto report an object as last written `age` ago (S3 clients cannot set LastModified)."""
    from moto.s3.models import s3_backends

    for backends in s3_backends.values():
        for backend in backends.values():
            if bucket in backend.buckets:
                stored = backend.buckets[bucket].keys[key]
                stored.last_modified = stored.last_modified - age
                return
    raise AssertionError(f"no bucket {bucket} in moto's state")


def keys(s3: Any, bucket: str, prefix: str = PREFIX + "backups/") -> set[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def backup_ids(s3: Any, bucket: str) -> set[str]:
    return {key.split("/")[2] for key in keys(s3, bucket) if key.endswith("/manifest.json")}


@pytest.fixture
def workspace(opsbook: Opsbook, s3_server: Any) -> dict[str, Any]:
    bucket = f"backups-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    opsbook.environ.update({"S3_ACCESS_KEY_ID": s3_server.access_key_id,
                            "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key.reveal()})
    backups = {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket,
               "prefix": PREFIX, "access_key_id": "${env:S3_ACCESS_KEY_ID}",
               "secret_access_key": "${env:S3_SECRET_ACCESS_KEY}", "retention": RETENTION}
    opsbook.write_inventory({"project": "prunetest", "default_env": "staging",
                             "envs": {"staging": {"backups": backups}}})
    return {"bucket": bucket, "secret": s3_server.secret_access_key.reveal()}


def make_history(s3: Any, bucket: str, *, newest_days_ago: int = 1) -> History:
    """Nightly backups at 12:00 UTC for a month, weekly ones back to ~200 days, a keep-flagged one
    400 days old, and two verified extra backups (06:00) of which only the newer one is protected."""
    now, client = datetime.now(UTC), s3.client()
    days = [*range(newest_days_ago, 31), *range(37, 205, 7)]
    backups = [put_backup(client, bucket, at_day(now, day, 12)) for day in days]
    backups.append(put_backup(client, bucket, at_day(now, 400, 12), keep=True))
    for day in (100, 107):  # both days also have a 12:00 backup: 06:00 is no day's, week's or month's newest
        backups.append(put_backup(client, bucket, at_day(now, day, 6), verified=at_day(now, day, 8)))
    return History(bucket, backups, now)


def add_leftovers(s3: Any, history: History) -> dict[str, str]:
    """An incomplete backup from 3 days ago, one from now, and dangling multipart uploads."""
    old, young = backup_id(at_day(history.now, 3, 2)), backup_id(history.now)
    old_key, young_key = f"{PREFIX}backups/{old}/dump.pgc.zst", f"{PREFIX}backups/{young}/dump.pgc.zst"
    client = s3.client()
    client.put_object(Bucket=history.bucket, Key=old_key, Body=b"half a dump")
    age_object(history.bucket, old_key, timedelta(days=3))
    client.put_object(Bucket=history.bucket, Key=young_key, Body=b"a dump in progress")
    # moto reports every multipart upload as initiated in 2010: long dangling
    client.create_multipart_upload(Bucket=history.bucket, Key=f"{PREFIX}backups/{old}/dump.pgc.zst")
    client.create_multipart_upload(Bucket=history.bucket, Key="other-app/big-upload.bin")
    return {"old": old, "young": young}


def expected_plan(history: History, *, force: bool = False) -> tuple[set[str], set[str]]:
    plan = plan_retention(history.backups, RetentionPolicy(**RETENTION), history.now, force=force)
    return {d.backup.id for d in plan.kept}, {d.backup.id for d in plan.deletions}


def test_dry_run_then_prune_keeps_what_the_rules_keep_and_cleans_incomplete_uploads(opsbook, workspace, s3_server):
    bucket = workspace["bucket"]
    history = make_history(s3_server, bucket)
    leftovers = add_leftovers(s3_server, history)
    damaged = backup_id(at_day(history.now, 300, 12))
    s3_server.client().put_object(Bucket=bucket, Key=f"{PREFIX}backups/{damaged}/manifest.json", Body=b"{oops")
    kept, deleted = expected_plan(history)
    before = keys(s3_server, bucket)

    # the dry run deletes nothing and names each decision with its reasons
    dry = opsbook.run("backup.prune", "--env", "staging", "--dry-run", "--json")
    assert dry.exit_code == 0, dry
    assert keys(s3_server, bucket) == before
    assert len(uploads(s3_server, bucket)) == 2
    assert deleted and kept
    decisions = {d["id"]: d for d in dry.json()["decisions"]}
    assert set(decisions) == kept | deleted
    for identifier in deleted:
        assert f"delete {identifier}" in dry.stderr
        assert decisions[identifier]["reasons"] == ["outside every retention rule"]
    for identifier in kept:
        line = next(line for line in dry.stderr.splitlines() if identifier in line)
        assert line.split()[0] == "keep" and decisions[identifier]["reasons"]
    assert "keep_last 1/3" in dry.stderr and "keep flag" in dry.stderr and "newest verified" in dry.stderr
    assert "min_keep 3" in dry.stderr  # the policy is shown
    assert f"remove incomplete backup {leftovers['old']}" in dry.stderr
    assert f"keep incomplete backup {leftovers['young']}" in dry.stderr
    assert "abort the multipart upload of backups/" in dry.stderr

    pruned = opsbook.run("backup.prune", "--env", "staging", "--json")
    assert pruned.exit_code == 0, pruned
    assert pruned.json()["status"] == "succeeded"

    remaining = backup_ids(s3_server, bucket)
    assert remaining == kept | {damaged}
    flagged = next(b.id for b in history.backups if b.keep)
    newer_verified, older_verified = (history.backups[-2].id, history.backups[-1].id)
    assert flagged in remaining and newer_verified in remaining
    assert older_verified not in remaining
    oldest = min((b for b in history.backups if not b.keep), key=lambda b: b.finished_at)
    assert oldest.id not in remaining
    assert {h.id for h in history.backups[:3]} <= remaining  # keep_last 3
    assert len(deleted) > 20
    # a deleted backup leaves no object behind; a kept one keeps all of its objects
    folders = {key.split("/")[2] for key in keys(s3_server, bucket)}
    assert not folders & deleted
    assert f"{PREFIX}backups/{newer_verified}/verification.json" in keys(s3_server, bucket)
    # incomplete: the old one removed, the young one kept; the dangling upload under backups/ aborted only
    assert leftovers["old"] not in folders and leftovers["young"] in folders
    assert uploads(s3_server, bucket) == ["other-app/big-upload.bin"]
    assert f"backup {damaged} kept: its manifest cannot be read" in pruned.stderr

    journal = opsbook.journal(pruned.json()["run_id"])
    outputs = {e["step"]: e["outputs"] for e in journal if e["event"] == "step" and e["state"] == "applied"}
    assert set(outputs["expired-backups"]["deleted"]) == deleted
    assert outputs["incomplete-uploads"]["incomplete_removed"] == [leftovers["old"]]

    again = opsbook.run("backup.prune", "--env", "staging", "--json")
    assert again.exit_code == 0, again
    assert again.json()["status"] == "nothing to do"
    assert "retention keeps all" in again.stderr
    assert workspace["secret"] not in opsbook.everything_produced()


def test_refuses_while_backups_are_failing_unless_forced(opsbook, workspace, s3_server):
    bucket = workspace["bucket"]
    history = make_history(s3_server, bucket, newest_days_ago=5)
    leftovers = add_leftovers(s3_server, history)
    before = keys(s3_server, bucket)

    for extra in ((), ("--dry-run",)):
        refused = opsbook.run("backup.prune", "--env", "staging", *extra)
        assert refused.exit_code == 3, refused
        assert "backups look like they are failing" in refused.stderr
        assert history.newest().id in refused.stderr  # names the newest backup
        assert "--force" in refused.stderr
        assert "Traceback" not in refused.output
        assert keys(s3_server, bucket) == before
        assert len(uploads(s3_server, bucket)) == 2

    forced = opsbook.run("backup.prune", "--env", "staging", "--force")
    assert forced.exit_code == 0, forced
    assert "--force: pruning although" in forced.stderr
    kept, deleted = expected_plan(history, force=True)
    assert backup_ids(s3_server, bucket) == kept
    assert deleted
    assert leftovers["old"] not in {key.split("/")[2] for key in keys(s3_server, bucket)}


def run_context(opsbook: Opsbook, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A RunContext on the workspace's environment, in this process (as the backup run has one)."""
    from ops.engine import RunContext
    from ops.inventory import load
    from ops.output import Output

    for name, value in {**opsbook.environ, "OPS_HOME": str(opsbook.state_dir)}.items():
        monkeypatch.setenv(name, value)
    return RunContext(load(opsbook.inventory).environment("staging"), output=Output())


def test_prune_after_backup_applies_retention_and_never_fails_the_backup(opsbook, workspace, s3_server,
                                                                          monkeypatch, capsys):
    from ops.retention import prune_after_backup

    bucket = workspace["bucket"]
    stale = make_history(s3_server, bucket, newest_days_ago=5)
    before = keys(s3_server, bucket)
    ctx = run_context(opsbook, monkeypatch)
    refused = prune_after_backup(ctx)
    assert "backups look like they are failing" in refused["refused"] and refused["deleted"] == []
    assert keys(s3_server, bucket) == before
    assert "retention skipped" in capsys.readouterr().err

    # a fresh backup lands: the same call now prunes, with the same plan as the CLI's
    fresh = put_backup(s3_server.client(), bucket, datetime.now(UTC) - timedelta(minutes=1))
    history = History(bucket, [*stale.backups, fresh], datetime.now(UTC))
    kept, deleted = expected_plan(history)
    outcome = prune_after_backup(ctx)
    assert set(outcome["deleted"]) == deleted and set(outcome["kept"]) == kept
    assert backup_ids(s3_server, bucket) == kept
    ctx.close()

    opsbook.write_inventory(opsbook.inventory.read_text().replace(bucket, f"{bucket}-gone"))
    failed = prune_after_backup(run_context(opsbook, monkeypatch))
    assert "error" in failed and f"{bucket}-gone" in failed["error"]
    assert "the backup itself succeeded" in capsys.readouterr().err


def test_real_backups_then_prune_end_to_end(opsbook, staging, postgres_server, s3_server):
    """Real `inv backup` runs, then the prune task, then a backup whose own retention prunes."""
    import yaml

    postgres_server.create_brands_database(staging["database"])
    bucket = staging["backups"]
    s3_server.client().create_bucket(Bucket=bucket)
    opsbook.environ["APP_DATABASE_URL"] = postgres_server.url(staging["database"]).reveal()
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["staging"]["database"]["url"] = "${env:APP_DATABASE_URL}"
    inventory["envs"]["staging"]["backups"]["retention"] = {"keep_last": 1, "daily": 0, "weekly": 0,
                                                            "monthly": 0, "min_keep": 1}
    opsbook.write_inventory(inventory)

    made = []
    for extra in (("--keep",), (), ()):
        result = opsbook.run("backup", "--env", "staging", "--no-prune", "--json", *extra)
        assert result.exit_code == 0, result
        made.append(result.json()["backup"]["backup_id"])
    flagged, middle, newest = made
    assert backup_ids(s3_server, bucket) == set(made)

    dry = opsbook.run("backup.prune", "--env", "staging", "--dry-run")
    assert dry.exit_code == 0, dry
    assert f"delete {middle}" in dry.stderr
    assert backup_ids(s3_server, bucket) == set(made)

    pruned = opsbook.run("backup.prune", "--env", "staging")
    assert pruned.exit_code == 0, pruned
    assert backup_ids(s3_server, bucket) == {flagged, newest}
    assert not any(key.split("/")[2] == middle for key in keys(s3_server, bucket))  # its dump went too

    again = opsbook.run("backup", "--env", "staging", "--json")
    assert again.exit_code == 0, again
    latest = again.json()["backup"]["backup_id"]
    assert again.json()["prune"]["deleted"] == [newest]
    assert backup_ids(s3_server, bucket) == {flagged, latest}
    produced = opsbook.everything_produced()
    assert not any(secret in produced for secret in staging["secrets"])
