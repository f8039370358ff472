"""inv decommission through the real CLI: a kept, deep-verified final backup; an archive whose members are listed
and checksummed; the environment's IAM key revoked (moto); the database dropped; later runs refused."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import tarfile
from typing import Any

import psycopg
import pytest

from ops.secrets import Secret
from tests.cli import Opsbook, wait_for
from tests.fixtures.provision import iam_keys
from tests.fixtures.s3 import refused
from tests.fixtures.secrets import stored
from tests.fixtures.shop import databases_like, make_database


@pytest.fixture
def old_env(opsbook: Opsbook, postgres_server: Any, s3_server: Any) -> dict[str, Any]:
    database, url = make_database(postgres_server)
    user = f"old-{database}"
    key_id, secret = s3_server.create_access_key(user)
    bucket = s3_server.make_bucket().bucket
    repository = opsbook.root / "app"
    repository.mkdir()
    git = ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repository)], check=True)
    (repository / "README").write_text("the app\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    opsbook.environ.update({"OLD_DB": url.reveal(), "OLD_KEY_ID": key_id, "OLD_SECRET": secret.reveal()})
    storage = {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket,
               "access_key_id": "${env:OLD_KEY_ID}", "secret_access_key": "${env:OLD_SECRET}"}
    opsbook.write_inventory({"project": "endoflife", "default_env": "old", "envs": {"old": {
        "database": {"url": "${env:OLD_DB}"}, "storage": storage, "backups": {"prefix": "old/", "bucket": bucket},
        "keys": {"provider": "aws-iam", "iam_user": user}, "app": {"repository": str(repository)}}}})
    s3_server.client().put_object(Bucket=bucket, Key="old/drills/20260101T000000Z-aaaa/report.json",
                                  Body=json.dumps({"id": "20260101T000000Z-aaaa", "passed": True,
                                                   "source_env": "old"}).encode())
    return {"database": database, "bucket": bucket, "user": user, "key_id": key_id,
            "secrets": [secret.reveal(), postgres_server.password.reveal()]}


def test_decommission_keeps_a_verified_backup_and_an_archive_then_refuses_the_environment(
        opsbook, old_env, postgres_server, s3_server):
    client, bucket = s3_server.client(), old_env["bucket"]
    planned = opsbook.run("decommission", "--env", "old", "--drop-database", "--dry-run")
    assert planned.exit_code == 0, planned
    for words in ("final backup", "deep-verify", "archive", "DROP DATABASE", "decommissioned", "revoke 1 key"):
        assert words in planned.stderr, words
    assert opsbook.run("decommission", "--env", "old").exit_code == 2  # no --confirm
    assert opsbook.run("decommission", "--env", "old", "--confirm", "old", "--drop-database").exit_code == 2
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="old/backups/")  # nothing happened

    done = opsbook.run("decommission", "--env", "old", "--confirm", "old", "--drop-database", "--confirm-drop", "old",
                       "--json")
    assert done.exit_code == 0, done
    result = done.json()
    backup_id = result["decommissioned"]["final_backup"]
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"old/backups/{backup_id}/manifest.json")["Body"].read())
    assert manifest["tags"] == ["final"] and manifest["keep"] is True
    [check] = json.loads(client.get_object(Bucket=bucket, Key=f"old/backups/{backup_id}/verification.json")
                         ["Body"].read())
    assert check["kind"] == "deep" and check["ok"] is True  # restored into a scratch database, row counts equal
    assert databases_like(postgres_server, old_env["database"]) == []  # dropped only after that

    key = result["archive"]["key"]
    tarball = client.get_object(Bucket=bucket, Key=f"old/{key}")["Body"].read()
    recorded = client.get_object(Bucket=bucket, Key=f"old/{key}.sha256")["Body"].read().decode().split()[0]
    assert hashlib.sha256(tarball).hexdigest() == recorded == result["archive"]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    listing = {line.split()[2]: (int(line.split()[1]), line.split()[0])
               for line in members.pop("LISTING.txt").decode().splitlines()}
    assert listing == {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in members.items()}
    for name in ("repository.bundle", "inventory.masked.yaml", "runbooks/backup.md", "runbooks/restore.md",
                 "drills/20260101T000000Z-aaaa/report.json"):
        assert name in members, name
    assert any(name.startswith("audit/") for name in members)
    bundle = opsbook.root / "check.bundle"
    bundle.write_bytes(members["repository.bundle"])
    assert subprocess.run(["git", "bundle", "list-heads", str(bundle)], capture_output=True).returncode == 0
    assert not any(secret.encode() in data for data in members.values() for secret in old_env["secrets"])

    iam = s3_server.client("iam")
    assert iam.list_access_keys(UserName=old_env["user"])["AccessKeyMetadata"] == []  # the key is gone
    assert client.head_object(Bucket=bucket, Key="old/decommissioned.json")

    refused = opsbook.run("backup", "--env", "old")
    assert refused.exit_code == 2 and "decommissioned" in refused.stderr, refused
    assert opsbook.run("drill.history", "--env", "old").exit_code == 0  # read-only listings still work
    again = opsbook.run("decommission", "--env", "old", "--confirm", "old")
    assert again.exit_code == 0 and "nothing to do" in again.stderr, again
    produced = opsbook.everything_produced()
    assert not any(secret in produced for secret in old_env["secrets"])


def test_decommission_after_provisioning_revokes_the_store_and_inventory_keys(opsbook, fresh, s3_server):
    """With aws-iam on an IAM server that enforces credentials: every key of the environment (the one provision
    made, in the secret store, and the inventory's) is revoked, the run verifies it with credentials that
    still exist and ends with exit 0, and later runs refuse the environment."""
    provisioned = opsbook.run("provision")
    assert provisioned.exit_code == 0, provisioned
    app_key = (stored(opsbook)["STORAGE_ACCESS_KEY_ID"], Secret(stored(opsbook)["STORAGE_SECRET_ACCESS_KEY"]))
    bootstrap = fresh["admin_key"]

    planned = opsbook.run("decommission", "--dry-run")
    assert planned.exit_code == 0, planned
    done = opsbook.run("decommission", "--confirm", "staging", "--json")
    assert done.exit_code == 0, done
    assert iam_keys(s3_server, fresh) == []  # listed with another user's key: none of the user's keys is left
    assert refused(s3_server, fresh["bucket"], *app_key) == "InvalidAccessKeyId"
    assert refused(s3_server, fresh["bucket"], *bootstrap) == "InvalidAccessKeyId"
    run_id = done.json()["run_id"]
    journal = opsbook.journal(run_id)
    assert journal[-1]["status"] == "succeeded"
    assert any(e.get("step") == "revoke-keys" and e.get("state") == "verified" for e in journal)
    inner = [(e["index"], e["step"], e["state"]) for e in journal if e["event"] == "step" and "/" in e["step"]]
    assert ("1.1", "final-backup/dump", "verified") in inner and ("2.1", "verify-final/verify", "verified") in inner
    shown = opsbook.run("runs.show", run_id)
    assert shown.exit_code == 0 and "1.1. final-backup/dump: verified" in shown.stderr, shown
    assert "warning" not in done.stderr, done  # the journal's copy went to the bucket before its key was revoked
    auditor = s3_server.client(access_key_id=fresh["auditor"][0], secret_access_key=fresh["auditor"][1])
    assert auditor.head_object(Bucket=fresh["backups"], Key=f"staging/audit/{run_id}.jsonl")

    later = opsbook.run("backup")
    assert later.exit_code == 2 and "decommissioned" in later.stderr, later
    again = opsbook.run("decommission", "--confirm", "staging")
    assert again.exit_code == 0 and "nothing to do" in again.stderr, again
    produced = opsbook.everything_produced()
    assert not any(secret in produced for secret in [*fresh["secrets"], app_key[1].reveal()])


def test_an_interrupted_final_backup_is_journaled_like_any_step_and_the_run_resumes(
        opsbook, old_env, s3_server):
    """Ctrl-C while the final backup's pg_dump waits for a table lock: exit 130, the backup's dump step and the
    final-backup step both journaled "interrupted", and `inv runs.resume ID` finishes the decommission."""
    url = opsbook.environ["OLD_DB"]
    blocker = psycopg.connect(url)
    blocker.execute('LOCK TABLE "Brand" IN ACCESS EXCLUSIVE MODE')  # pg_dump waits for it: a pause in the dump
    process = opsbook.start("decommission", "--env", "old", "--confirm", "old")
    try:
        wait_for(lambda: process.poll() is not None or (opsbook.journals() and any(
            e.get("step") == "final-backup/dump" and e.get("state") == "started"
            for e in opsbook.journal(opsbook.latest_run_id()))), timeout=60, what="the final backup's dump")
        assert process.poll() is None, opsbook.collect(process)
        process.send_signal(signal.SIGINT)
        result = opsbook.collect(process, timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        blocker.rollback()
        blocker.close()
    assert result.exit_code == 130 and "Traceback" not in result.output and "runs.resume" in result.stderr, result
    run_id = opsbook.latest_run_id()
    journal = opsbook.journal(run_id)
    failed = [(e["index"], e["step"]) for e in journal
              if (e.get("state"), e.get("reason")) == ("failed", "interrupted")]
    assert failed == [("1.1", "final-backup/dump"), (1, "final-backup")], journal
    assert (journal[-1]["status"], journal[-1]["exit_code"], journal[-1]["stopped_at"]) == (
        "interrupted", 130, "final-backup")
    shown = opsbook.run("runs.show", run_id)
    assert "1.1. final-backup/dump: failed — interrupted" in shown.stderr, shown

    resumed = opsbook.run("runs.resume", run_id, "--json")
    assert resumed.exit_code == 0 and resumed.json()["status"] == "succeeded", resumed
    assert s3_server.client("iam").list_access_keys(UserName=old_env["user"])["AccessKeyMetadata"] == []
    assert opsbook.run("backup", "--env", "old").exit_code == 2  # decommissioned
