"""The PITR engine's pure parts: command lines, segment arithmetic, WAL continuity, backup.info."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ops import inventory, pitr_catalog, pitr_engine, pitr_lsn, pitr_scratch
from ops.errors import CheckFailed, UsageError
from ops.secrets import Secret
from ops.storage import ObjectInfo, StorageConfig
from runbooks import restore as restore_runbook

T0 = datetime(2026, 11, 23, 17, 0, tzinfo=UTC)
SECRET = "unit-test-secret-value-123"


def archive() -> pitr_engine.Archive:
    config = StorageConfig(provider="s3", bucket="acme-backups", endpoint="http://127.0.0.1:9000", prefix="prod/",
                           access_key_id="AKIDEXAMPLE", secret_access_key=Secret(SECRET))
    return pitr_engine.archive_for(config, "prod")


def test_commands_name_the_bucket_prefix_and_server_and_never_the_key():
    commands = [pitr_engine.wal_archive_command(archive()), pitr_engine.wal_restore_command(archive()),
                pitr_engine.backup_command(archive(), host="db", port=5432, user="admin"),
                pitr_engine.retention_command(archive(), 7), pitr_engine.restore_command(archive(), "latest", "/d")]
    assert commands[0] == ["barman-cloud-wal-archive", "--endpoint-url", "http://127.0.0.1:9000", "-z",
                           "s3://acme-backups/prod/pitr", "prod"]
    assert "RECOVERY WINDOW OF 7 DAYS" in commands[3]
    assert all(SECRET not in " ".join(command) for command in commands)
    script = pitr_engine.wrapper_script(commands[0], "/etc/opsbook/prod.env", '"$1"')
    assert SECRET not in script and ". /etc/opsbook/prod.env" in script and script.rstrip().endswith('prod "$1"')
    assert f"AWS_SECRET_ACCESS_KEY={SECRET}" in pitr_engine.credentials_file(archive())


def test_a_folder_bucket_is_refused():
    with pytest.raises(CheckFailed, match="S3 or R2"):
        pitr_engine.archive_for(StorageConfig(provider="local", bucket="b", path="/tmp"), "local")


@pytest.mark.parametrize(("name", "following"), [
    ("000000010000000000000001", "000000010000000000000002"),
    ("0000000100000000000000FF", "000000010000000100000000"),
    ("00000002000000AB000000FE", "00000002000000AB000000FF"),
])
def test_next_segment(name, following):
    assert pitr_engine.next_segment(name) == following


def listing(names: list[str]) -> list[ObjectInfo]:
    root = "pitr/prod/"
    return [ObjectInfo(f"{root}wals/{name[:16]}/{name}.gz", 10, None, T0 + timedelta(minutes=index))
            for index, name in enumerate(names)]


def test_continuity_names_the_first_missing_segment_and_where_it_resumes():
    names = [f"0000000100000000000000{n:02X}" for n in (1, 2, 3, 5, 6)]
    segments = pitr_engine.wal_segments(listing(names), "pitr/prod/")
    wal = pitr_engine.continuity(segments, names[0])
    assert (wal.last, wal.missing, wal.resumes) == (names[2], "000000010000000000000004", names[3])
    assert pitr_engine.continuity(segments, names[3]).missing is None


def test_backup_info_and_the_range_a_backup_recovers_to():
    text = ("backup_id=20261123T170000\nstatus=DONE\nbegin_time=2026-11-23 17:00:00.5+00:00\n"
            "end_time=2026-11-23 17:00:30+00:00\nbegin_wal=000000010000000000000001\n"
            "end_wal=000000010000000000000002\ntimeline=1\nversion=150014\nxlog_segment_size=16777216\n")
    backup = pitr_engine.parse_backup_info("20261123T170000", text)
    assert backup.complete and backup.major == 15 and backup.end_time == T0 + timedelta(seconds=30)
    names = [f"0000000100000000000000{n:02X}" for n in (1, 2, 3, 5)]
    item = pitr_catalog.recoverable(backup, pitr_engine.wal_segments(listing(names), "pitr/prod/"))
    assert item.earliest == backup.end_time and item.latest == T0 + timedelta(minutes=2)
    catalog = pitr_catalog.Catalog([item], {})
    assert pitr_catalog.choose(catalog, T0 + timedelta(minutes=1), "prod") is item
    with pytest.raises(CheckFailed, match="WAL segment 000000010000000000000004 is missing"):
        pitr_catalog.choose(catalog, T0 + timedelta(minutes=3, seconds=30), "prod")
    with pytest.raises(CheckFailed, match="before prod's earliest"):
        pitr_catalog.choose(catalog, T0, "prod")
    started = pitr_engine.parse_backup_info("x", "status=STARTED\nbegin_wal=000000010000000000000001\n")
    assert not started.complete and pitr_catalog.recoverable(started, {}).earliest is None


def test_lsn_text_and_the_span_of_a_segment():
    assert str(pitr_lsn.Lsn.parse("16/b374d848")) == "16/B374D848" and str(pitr_lsn.Lsn(0)) == "0/0"
    assert pitr_lsn.Lsn.parse("0/3000060") < pitr_lsn.Lsn.parse("1/0")
    for text in ("0/", "3000060", "0/3000060/1", "x/1", "123456789/0"):
        with pytest.raises(ValueError):
            pitr_lsn.Lsn.parse(text)
    assert str(pitr_lsn.segment_start("000000010000000100000003", 16 * 1024 * 1024)) == "1/3000000"
    assert str(pitr_lsn.segment_end("0000000100000000000000FF", 16 * 1024 * 1024)) == "1/0"


def test_an_lsn_is_chosen_inside_a_backups_span_and_refused_outside_naming_the_range():
    text = ("status=DONE\nbegin_time=2026-11-23 17:00:00+00:00\nend_time=2026-11-23 17:00:30+00:00\n"
            "begin_wal=000000010000000000000002\nend_wal=000000010000000000000002\nend_xlog=0/2000138\n"
            "version=150014\n")
    backup = pitr_engine.parse_backup_info("b1", text)
    names = [f"0000000100000000000000{n:02X}" for n in (2, 3, 5)]
    item = pitr_catalog.recoverable(backup, pitr_engine.wal_segments(listing(names), "pitr/prod/"))
    assert (str(item.earliest_lsn), str(item.latest_lsn)) == ("0/2000138", "0/4000000")
    assert item.to_json()["earliest_lsn"] == "0/2000138" and item.to_json()["latest_lsn"] == "0/4000000"
    catalog = pitr_catalog.Catalog([item], {})
    Lsn = pitr_lsn.Lsn
    assert pitr_catalog.choose_lsn(catalog, Lsn.parse("0/2000138"), "prod") is item
    assert pitr_catalog.choose_lsn(catalog, Lsn.parse("0/3FFFFFF"), "prod") is item
    with pytest.raises(CheckFailed, match=r"LSN 0/2000137 is before prod's earliest .* 0/2000138 to 0/4000000"):
        pitr_catalog.choose_lsn(catalog, Lsn.parse("0/2000137"), "prod")
    with pytest.raises(CheckFailed, match="WAL segment 000000010000000000000004 is missing"):
        pitr_catalog.choose_lsn(catalog, Lsn.parse("0/4000000"), "prod")
    whole = pitr_catalog.recoverable(backup, pitr_engine.wal_segments(listing(names[:2]), "pitr/prod/"))
    with pytest.raises(CheckFailed, match=r"LSN 0/4000000 is beyond prod's archived WAL; recoverable: 0/2000138 to "
                                          r"0/4000000 \(exclusive\)"):
        pitr_catalog.choose_lsn(pitr_catalog.Catalog([whole], {}), Lsn.parse("0/4000000"), "prod")


@pytest.fixture
def environments(tmp_path, monkeypatch):
    monkeypatch.setenv("OPS_HOME", str(tmp_path / "state"))
    (tmp_path / "inventory.yaml").write_text(
        "project: t\nenvs:\n  prod:\n    database: {url: 'postgresql://app@db.internal/shop'}\n"
        "    backups: {provider: s3, bucket: b, endpoint: 'http://127.0.0.1:9000'}\n"
        "  neon:\n    database: {provider: neon, url: 'postgresql://app@ep-cool-42.eu-central-1.aws.neon.tech/shop'}\n")
    return inventory.load(tmp_path / "inventory.yaml").environment


def test_to_lsn_builds_a_recovery_to_that_position_and_refuses_what_goes_with_it(environments):
    plan = restore_runbook.build(environments("prod"), to_lsn="0/3000060").steps[0].plan
    assert plan.when == "LSN 0/3000060" and plan.moment is None
    settings = pitr_scratch.recovery_settings(["barman-cloud-wal-restore"], plan.recovery_target)
    assert settings["recovery_target_lsn"] == "0/3000060" and "recovery_target_time" not in settings
    refused = [dict(to_lsn="0/3000060", to_time="latest"), dict(to_lsn="0/3000060", backup="20261123T020000Z"),
               dict(to_lsn="3000060"), dict(to_lsn="0/3000060", tables=["Brand"])]
    for arguments in refused:
        with pytest.raises(UsageError):
            restore_runbook.build(environments("prod"), **arguments)
    with pytest.raises(UsageError, match="Neon"):
        restore_runbook.build(environments("neon"), to_lsn="0/3000060")
