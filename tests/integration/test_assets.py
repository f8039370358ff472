"""inv backup.assets through the real CLI: moto's S3 server, and folder buckets."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops.assets import SOURCE_ETAG, AssetManifest, copy_objects
from ops.storage import StorageConfig, open_storage
from tests.cli import Opsbook, terminal_lines

MIB = 1024 * 1024
IMAGES = {f"images/{n:02d}.jpg": f"jpeg bytes of image {n} ".encode() * (n + 1) for n in range(5)}


def objects(s3: Any, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item for page in pages for item in page.get("Contents", [])}


def manifest(s3: Any, bucket: str, run_id: str) -> AssetManifest:
    body = s3.client().get_object(Bucket=bucket, Key=f"staging/assets/manifests/{run_id}.json")["Body"].read()
    return AssetManifest.from_json(body, run_id)


def put_multipart(s3: Any, bucket: str, key: str, data: bytes) -> None:
    client = s3.client()
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, ContentType="image/png")["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(data), 5 * MIB), start=1):
        etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                                  Body=data[start:start + 5 * MIB])["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})


@pytest.fixture
def buckets(opsbook: Opsbook, s3_server: Any) -> dict[str, Any]:
    """A `staging` environment whose app bucket holds five images and one multipart original."""
    suffix = uuid.uuid4().hex[:8]
    app, backups = f"app-{suffix}", f"backups-{suffix}"
    for bucket in (app, backups):
        s3_server.client().create_bucket(Bucket=bucket)
    for key, data in IMAGES.items():
        s3_server.client().put_object(Bucket=app, Key=key, Body=data, ContentType="image/jpeg")
    put_multipart(s3_server, app, "originals/big.png", bytes(range(256)) * (41 * 1024))  # ~10.5 MB, 3 parts
    opsbook.environ.update({"S3_KEY": s3_server.access_key_id,
                            "S3_SECRET": s3_server.secret_access_key.reveal()})
    storage = {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": app,
               "access_key_id": "${env:S3_KEY}", "secret_access_key": "${env:S3_SECRET}"}
    opsbook.write_inventory({"project": "assetstest", "default_env": "staging", "envs": {"staging": {
        "storage": storage, "backups": {"bucket": backups, "prefix": "staging/"}}}})
    return {"app": app, "backups": backups, "secret": s3_server.secret_access_key.reveal()}


def test_copy_is_incremental_keeps_deleted_objects_and_each_manifest_stays_restorable(opsbook, buckets,
                                                                                        s3_server):
    app, backups = buckets["app"], buckets["backups"]
    dry = opsbook.run("backup.assets", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "would copy 6 objects" in dry.stderr and "skip 0 unchanged" in dry.stderr
    assert objects(s3_server, backups) == {}

    first = opsbook.run("backup.assets", "--json")
    assert first.exit_code == 0, first
    run1 = first.json()["run_id"]
    stored = objects(s3_server, backups, f"staging/assets/{run1}/")
    assert len(stored) == 6
    copy = s3_server.client().head_object(Bucket=backups, Key=f"staging/assets/{run1}/originals/big.png")
    source = s3_server.client().head_object(Bucket=app, Key="originals/big.png")
    assert source["ETag"].strip('"').endswith("-3")  # a multipart original: its copies get other ETags
    assert copy["ContentType"] == "image/png" and copy["ContentLength"] == source["ContentLength"]
    body = s3_server.client().get_object(Bucket=backups, Key=f"staging/assets/{run1}/images/03.jpg")["Body"]
    assert body.read() == IMAGES["images/03.jpg"]
    assert len(manifest(s3_server, backups, run1).entries) == 6

    second = opsbook.run("backup.assets", "--json")
    assert second.exit_code == 0, second
    assert second.json()["status"] == "nothing to do"
    assert len(objects(s3_server, backups, "staging/assets/")) == 7  # 6 copies + 1 manifest

    client = s3_server.client()
    client.put_object(Bucket=app, Key="images/01.jpg", Body=b"edited image", ContentType="image/jpeg")
    client.delete_object(Bucket=app, Key="images/02.jpg")
    client.put_object(Bucket=app, Key="images/new.jpg", Body=b"a new image", ContentType="image/jpeg")
    before = objects(s3_server, backups)
    planned = opsbook.run("backup.assets", "--dry-run")
    assert planned.exit_code == 0, planned
    assert "would copy 2 objects" in planned.stderr and "images/02.jpg" in planned.stderr
    assert objects(s3_server, backups) == before  # a dry run changes nothing

    third = opsbook.run("backup.assets", "--json")
    assert third.exit_code == 0, third
    run3 = third.json()["run_id"]
    assert sorted(objects(s3_server, backups, f"staging/assets/{run3}/")) == [
        f"staging/assets/{run3}/images/01.jpg", f"staging/assets/{run3}/images/new.jpg"]
    latest = manifest(s3_server, backups, run3).entries
    assert latest["images/02.jpg"].deleted_at_source and latest["images/02.jpg"].stored.startswith(f"assets/{run1}/")
    assert latest["images/01.jpg"].stored == f"assets/{run3}/images/01.jpg"
    assert latest["images/04.jpg"].stored == f"assets/{run1}/images/04.jpg"
    # the first run's point in time is still whole: its copy of the edited image was not overwritten
    old = manifest(s3_server, backups, run1).entries["images/01.jpg"]
    assert client.get_object(Bucket=backups, Key=f"staging/{old.stored}")["Body"].read() == IMAGES["images/01.jpg"]
    assert client.head_object(Bucket=backups, Key=f"staging/{latest['images/02.jpg'].stored}")

    assert opsbook.run("backup.assets", "--json").json()["status"] == "nothing to do"
    assert buckets["secret"] not in opsbook.everything_produced()


def test_plain_lines_in_a_pipe_a_bar_of_objects_and_bytes_on_a_terminal(opsbook, buckets, s3_server):
    for number in range(14):
        s3_server.client().put_object(Bucket=buckets["app"], Key=f"thumbs/{number:02}.jpg", Body=b"t" * 1000)
    piped = opsbook.run("backup.assets")
    assert piped.exit_code == 0, piped
    assert "20/20 objects copied" in piped.stderr and "━" not in piped.stderr, piped
    for number in range(14):
        s3_server.client().put_object(Bucket=buckets["app"], Key=f"thumbs/{number:02}.jpg", Body=b"T" * 1000)
    shown = opsbook.run_on_terminal("backup.assets")
    assert shown.exit_code == 0, shown
    bars = [line for line in terminal_lines(shown.stderr) if line.startswith("objects copied") and "━" in line]
    assert bars and "100%" in bars[-1] and "14/14 objects" in bars[-1] and "14.0 kB" in bars[-1], shown.stderr
    assert not [line for line in terminal_lines(shown.stderr) if line.endswith("objects copied")], shown.stderr


def test_streamed_copies_of_an_interrupted_run_are_adopted_not_copied_again(opsbook, buckets, s3_server):
    # Other keys for the backup bucket: no server-side copy, the data streams through us.
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["staging"]["backups"].update(access_key_id="backup-writer", secret_access_key="${env:S3_SECRET}")
    opsbook.write_inventory(inventory)
    source = open_storage(s3_server.config(buckets["app"]))
    backups = open_storage(s3_server.config(buckets["backups"], prefix="staging/", access_key_id="backup-writer"))
    half = [info for info in source.list() if info.key.startswith("images/")][:3]
    copy_objects(source, backups, half, run_id="20200101T000000Z-dead")  # a run that died before its manifest

    result = opsbook.run("backup.assets", "--json")
    assert result.exit_code == 0, result
    assert "3 copies left by an interrupted run are adopted" in result.stderr
    run_id = result.json()["run_id"]
    assert len(objects(s3_server, buckets["backups"], f"staging/assets/{run_id}/")) == 3
    entries = manifest(s3_server, buckets["backups"], run_id).entries
    assert entries[half[0].key].stored == f"assets/20200101T000000Z-dead/{half[0].key}"
    big = s3_server.client().head_object(Bucket=buckets["backups"], Key=f"staging/assets/{run_id}/originals/big.png")
    source_etag = s3_server.client().head_object(Bucket=buckets["app"], Key="originals/big.png")["ETag"].strip('"')
    assert big["Metadata"][SOURCE_ETAG] == source_etag != big["ETag"].strip('"')  # re-chunked: another ETag
    assert big["ContentType"] == "image/png"
    assert opsbook.run("backup.assets", "--json").json()["status"] == "nothing to do"


def test_lifecycle_rules_are_set_merged_with_others_and_read_back(opsbook, buckets, s3_server):
    client = s3_server.client()
    foreign = {"ID": "team-rule", "Status": "Enabled", "Filter": {"Prefix": "tmp/"}, "Expiration": {"Days": 3}}
    client.put_bucket_lifecycle_configuration(Bucket=buckets["app"], LifecycleConfiguration={"Rules": [foreign]})

    dry = opsbook.run("backup.assets", "--lifecycle", "--dry-run")
    assert dry.exit_code == 0, dry
    assert "abort incomplete multipart uploads after 7 days" in dry.stderr
    assert len(client.get_bucket_lifecycle_configuration(Bucket=buckets["app"])["Rules"]) == 1

    applied = opsbook.run("backup.assets", "--lifecycle", "--archive-after-days", "45", "--json")
    assert applied.exit_code == 0, applied
    app_rules = {r["ID"]: r for r in client.get_bucket_lifecycle_configuration(Bucket=buckets["app"])["Rules"]}
    assert app_rules["team-rule"]["Expiration"]["Days"] == 3  # someone else's rule survives
    assert app_rules["opsbook-abort-incomplete-uploads *"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 7}
    backup_rules = {r["ID"]: r for r in client.get_bucket_lifecycle_configuration(Bucket=buckets["backups"])["Rules"]}
    archive = backup_rules["opsbook-archive-assets staging/"]
    assert archive["Filter"]["Prefix"] == "staging/assets/"
    assert archive["Transitions"] == [{"Days": 45, "StorageClass": "GLACIER_IR"}]
    assert "opsbook-abort-incomplete-uploads staging/" in backup_rules

    again = opsbook.run("backup.assets", "--lifecycle", "--archive-after-days", "45", "--json")
    assert again.exit_code == 0 and again.json()["status"] == "nothing to do", again


def test_folder_buckets_copy_streamed_and_say_lifecycle_is_unsupported(opsbook, tmp_path: Path):
    root = tmp_path / "buckets"
    app = open_storage(StorageConfig(provider="local", bucket="app", path=str(root)))
    app.create_bucket()
    open_storage(StorageConfig(provider="local", bucket="backups", path=str(root))).create_bucket()
    for key, data in IMAGES.items():
        app.put_bytes(key, data, content_type="image/jpeg")
    opsbook.write_inventory({"project": "assetstest", "default_env": "local", "envs": {"local": {
        "storage": {"provider": "local", "path": str(root), "bucket": "app"},
        "backups": {"bucket": "backups", "prefix": "local/"}}}})

    result = opsbook.run("backup.assets", "--lifecycle", "--json")
    assert result.exit_code == 0, result
    assert "lifecycle rules unsupported" in result.stderr and "local provider" in result.stderr
    run_id = result.json()["run_id"]
    copy = root / "backups" / "local" / "assets" / run_id / "images" / "02.jpg"
    assert copy.read_bytes() == IMAGES["images/02.jpg"]
    sidecar = json.loads((root / "backups" / ".meta" / "local" / "assets" / run_id / "images" / "02.jpg.json")
                         .read_text())
    assert sidecar["metadata"][SOURCE_ETAG] == hashlib.md5(IMAGES["images/02.jpg"]).hexdigest()
    assert opsbook.run("backup.assets", "--json").json()["status"] == "nothing to do"


def test_a_missing_backup_bucket_is_a_clear_refusal(opsbook, buckets, s3_server):
    s3_server.client().delete_bucket(Bucket=buckets["backups"])
    result = opsbook.run("backup.assets")
    assert result.exit_code == 3, result
    assert buckets["backups"] in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.output


def test_backups_inside_the_app_bucket_are_never_copied_again(opsbook, tmp_path: Path):
    root = tmp_path / "buckets"
    app = open_storage(StorageConfig(provider="local", bucket="shared", path=str(root)))
    app.create_bucket()
    app.put_bytes("images/a.jpg", b"an image", content_type="image/jpeg")
    opsbook.write_inventory({"project": "assetstest", "default_env": "local", "envs": {"local": {
        "storage": {"provider": "local", "path": str(root), "bucket": "shared"},
        "backups": {"prefix": "cold/", "bucket": "shared"}}}})

    first = opsbook.run("backup.assets", "--json")
    assert first.exit_code == 0, first
    second = opsbook.run("backup.assets", "--json")
    assert second.exit_code == 0 and second.json()["status"] == "nothing to do", second
    assert [info.key for info in app.list("cold/assets/") if "/manifests/" not in info.key] == [
        f"cold/assets/{first.json()['run_id']}/images/a.jpg"]
