"""The manifest contract, listing on a real (local) bucket, and the pure helpers of restores and metrics."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ops import backup_databases, restore_db, retention
from ops import backup_manifest as bm
from ops.backup_steps import render_metrics
from ops.errors import CheckFailed, UsageError
from ops.storage import StorageConfig, open_storage
from tests.fixtures.manifests import manifest


def test_layout():
    assert bm.dump_key("X", encrypted=True) == "backups/X/dump.pgc.zst.age"
    assert bm.dump_key("X", encrypted=False) == "backups/X/dump.pgc.zst"
    assert bm.manifest_key("X") == "backups/X/manifest.json" and bm.backup_prefix("X") == "backups/X/"


def test_round_trip_keeps_every_field_in_the_documented_shape():
    original = manifest()
    data = json.loads(original.dumps())
    assert list(data)[:2] == ["format", "id"] and data["format"] == 1
    assert data["object"]["compression"] == {"algorithm": "zstd", "level": 1} and data["object"]["encryption"] is None
    assert bm.Manifest.from_json(original.dumps(), backup_id=original.id) == original
    assert original.started == datetime(2026, 11, 23, 2, tzinfo=UTC) and not original.encrypted


@pytest.mark.parametrize(("change", "problem"), [
    (lambda d: d.pop("row_counts"), "row_counts: missing"),
    (lambda d: d["object"].update(sha256="XYZ"), "object.sha256: not 64 lowercase hex"),
    (lambda d: d.update(format=2), "format 2 is not supported"),
    (lambda d: d["database"].update(server_major="15"), "database.server_major: wrong type"),
    (lambda d: d.update(keep="yes"), "keep: wrong type"),
    (lambda d: d.update(started_at="yesterday"), "started_at: not an ISO-8601 time"),
    (lambda d: d["row_counts"].update(x=True), "row_counts: every value must be an integer"),
])
def test_a_malformed_manifest_is_refused_naming_the_backup(change, problem):
    data = manifest().to_json()
    change(data)
    with pytest.raises(CheckFailed) as failure:
        bm.Manifest.from_json(data, backup_id="20261123T020000Z-7f3a")
    assert "backup 20261123T020000Z-7f3a: manifest.json is malformed" in str(failure.value)
    assert problem in str(failure.value)


def test_not_json_and_wrong_folder_are_refused():
    with pytest.raises(CheckFailed, match="not JSON"):
        bm.Manifest.from_json(b"{oops", backup_id="B")
    with pytest.raises(CheckFailed, match="stored under 'B'"):
        bm.Manifest.from_json(manifest("A").to_json(), backup_id="B")


def test_listing_sorts_and_separates_incomplete_backups(tmp_path: Path):
    storage = open_storage(StorageConfig(provider="local", bucket="b", path=str(tmp_path), prefix="prod/"))
    storage.create_bucket()
    for backup_id in ("20261121T020000Z-aaaa", "20261123T020000Z-bbbb"):
        started = f"{backup_id[:4]}-{backup_id[4:6]}-{backup_id[6:8]}T02:00:00Z"
        storage.put_bytes(bm.dump_key(backup_id, False), b"dump")
        bm.write_manifest(storage, manifest(backup_id, started_at=started))
    storage.put_bytes(bm.dump_key("20261124T020000Z-dead", False), b"half")  # died before its manifest
    storage.put_bytes(bm.manifest_key("20261120T020000Z-bad0"), b"{}")  # unreadable manifest
    with pytest.raises(CheckFailed, match="backup 20261120T020000Z-bad0"):
        bm.list_backups(storage)
    complete, incomplete = bm.list_backups(storage, strict=False)
    assert [m.id for m in complete] == ["20261123T020000Z-bbbb", "20261121T020000Z-aaaa"]
    assert [(i.id, i.problem is not None) for i in incomplete] == [
        ("20261124T020000Z-dead", False), ("20261120T020000Z-bad0", True)]
    assert incomplete[0].keys == ["backups/20261124T020000Z-dead/dump.pgc.zst"]

    assert bm.read_verifications(storage, complete[0].id) == []
    bm.append_verification(storage, complete[0].id, bm.Verification("2026-11-23T03:00:00Z", "checksum", True, "r",
                                                                     "me", "ok"))
    bm.append_verification(storage, complete[0].id, {"at": "2026-11-23T04:00:00Z", "kind": "deep", "ok": False})
    records = bm.read_verifications(storage, complete[0].id)
    assert [r["kind"] for r in records] == ["checksum", "deep"]
    assert bm.last_verification(records)["kind"] == "checksum"
    assert bm.read_manifest(storage, complete[0].id) == complete[0]  # the manifest itself never changes


def test_side_database_names_fit_postgres_limit():
    moment = datetime(2026, 11, 23, 2, 0, 0, tzinfo=UTC)
    assert restore_db.side_name("app", "restore", moment) == "app__restore_20261123020000"
    long_name = restore_db.side_name("x" * 80, "restore", moment)
    assert len(long_name.encode()) <= 63 and long_name.endswith("__restore_20261123020000")
    assert restore_db.side_pattern("my_app", "old") == "my\\_app\\_\\_old\\_%"


def test_row_count_comparison_names_each_difference():
    assert restore_db.compare_row_counts({"a": 1}, {"a": 1}) == []
    assert restore_db.compare_row_counts({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 0}) == [
        "b: 5 rows, manifest: 2", "c: missing (manifest: 3 rows)", "d: not in the manifest (0 rows)"]


def test_restore_options_drop_acls_only_across_environments():
    assert restore_db.restore_options(cross_environment=False) == ["--no-owner"]
    assert restore_db.restore_options(cross_environment=True) == ["--no-owner", "--no-acl"]


def test_metrics_replace_this_environment_and_keep_the_others():
    first = render_metrics("", "prod", {"opsbook_backup_size_bytes": 10, "opsbook_backup_duration_seconds": 1.5,
                                        "opsbook_backup_last_success_timestamp_seconds": 1000})
    second = render_metrics(first, "staging", {"opsbook_backup_size_bytes": 20})
    third = render_metrics(second, "prod", {"opsbook_backup_size_bytes": 30})
    assert 'opsbook_backup_size_bytes{env="prod"} 30' in third
    assert 'opsbook_backup_size_bytes{env="prod"} 10' not in third
    assert 'opsbook_backup_duration_seconds{env="prod"} 1.5' in third
    assert 'opsbook_backup_size_bytes{env="staging"} 20' in third
    assert "# TYPE opsbook_backup_size_bytes gauge" in third and third.count("# HELP opsbook_backup_size_bytes") == 1


def test_a_manifest_of_several_databases_and_an_old_one_of_one():
    backup_id = "20261123T020000Z-7f3a"
    assert bm.dump_key(backup_id, True, "app") == f"backups/{backup_id}/databases/app/dump.pgc.zst.age"
    assert bm.dump_key(backup_id, False, "a/b c") == f"backups/{backup_id}/databases/a%2Fb%20c/dump.pgc.zst"
    first = bm.StoredObject(bm.dump_key(backup_id, False, "app"), 100, "a" * 64, 400)
    parts = [bm.DatabaseDump("app", "u@db:5432/app", "s-1", first, {"public.Brand": 20}, ["m1"], [],
                             ["public.Session"]),
             bm.DatabaseDump("analytics", "u@db:5432/analytics", "s-2",
                             bm.StoredObject(bm.dump_key(backup_id, False, "analytics"), 50, "b" * 64, 90),
                             {"public.Event": 7})]
    several = manifest(backup_id, object=first, databases=parts, excluded_table_data=["public.Session"])
    loaded = bm.Manifest.from_json(several.dumps(), backup_id=backup_id)
    assert loaded == several and loaded.size == 150 and loaded.database_names == ["app", "analytics"]
    app, analytics = loaded.parts()
    assert (app.database.name, app.object.key, app.size, app.excluded_table_data) == (
        "app", first.key, 100, ["public.Session"])
    assert (analytics.database.name, analytics.database.target, analytics.snapshot, analytics.size) == (
        "analytics", "u@db:5432/analytics", "s-2", 50)
    assert analytics.expected_row_counts == {"public.Event": 7} and analytics.sha256 == "b" * 64
    assert loaded.part("analytics") == analytics
    with pytest.raises(UsageError, match="holds no database 'nope': it holds app, analytics"):
        loaded.part("nope")
    with pytest.raises(UsageError, match=r"holds several databases \(app, analytics\)"):
        loaded.part(None)

    old = manifest(backup_id).to_json()  # written before there were several: no `databases` at all
    assert "databases" not in old
    one = bm.Manifest.from_json(old, backup_id=backup_id)
    assert one.parts() == [one] and one.part(None) is one and one.database_names == ["app"] and one.size == 123

    broken = several.to_json()
    broken["databases"][1]["object"].pop("sha256")
    broken["databases"].append(broken["databases"][0])
    with pytest.raises(CheckFailed) as failure:
        bm.Manifest.from_json(broken, backup_id=backup_id)
    assert "databases.1.object.sha256: missing" in str(failure.value)
    assert "a database is listed twice" in str(failure.value)


def test_every_database_leaves_out_opsbook_s_side_databases():
    names = ["analytics", "app__restore_20261123020000", "postgres", "app", "app__verify_20261123020000", "zeta"]
    assert backup_databases.ordered(names, "app") == ["app", "analytics", "postgres", "zeta"]


def test_retention_removes_every_dump_of_a_backup_of_several_databases(tmp_path: Path):
    storage = open_storage(StorageConfig(provider="local", bucket="b", path=str(tmp_path), prefix="prod/"))
    storage.create_bucket()
    backup_id = "20261123T020000Z-7f3a"
    keys = [bm.dump_key(backup_id, False, name) for name in ("app", "analytics")]
    for key in keys:
        storage.put_bytes(key, b"dump")
    parts = [bm.DatabaseDump(name, f"u@db/{name}", "s", bm.StoredObject(key, 4, "a" * 64, 4))
             for name, key in zip(("app", "analytics"), keys, strict=True)]
    bm.write_manifest(storage, manifest(backup_id, object=parts[0].object, databases=parts))
    [listed], [] = bm.list_backups(storage)
    assert listed.database_names == ["app", "analytics"] and listed.size == 8
    assert retention.delete_backup(storage, backup_id) == 3
    assert [info.key for info in storage.list(bm.backup_prefix(backup_id))] == []
