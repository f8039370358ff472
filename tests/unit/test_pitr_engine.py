"""The PITR engines' pure parts: command lines, segment arithmetic, WAL continuity, backup.info; the engine
contract, run against barman-cloud and pgBackRest alike."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ops import (
    inventory,
    pitr_barman,
    pitr_catalog,
    pitr_engine,
    pitr_lsn,
    pitr_pgbackrest,
    pitr_prefetch,
    pitr_scratch,
)
from ops.errors import CheckFailed, UsageError
from ops.pg_url import parse_url
from ops.secrets import Secret
from ops.storage import ObjectInfo, StorageConfig
from runbooks import restore as restore_runbook

T0 = datetime(2026, 11, 23, 17, 0, tzinfo=UTC)
SECRET = "unit-test-secret-value-123"


def archive() -> pitr_barman.Archive:
    config = StorageConfig(provider="s3", bucket="acme-backups", endpoint="http://127.0.0.1:9000", prefix="prod/",
                           access_key_id="AKIDEXAMPLE", secret_access_key=Secret(SECRET))
    return pitr_barman.archive_for(config, "prod")


def test_commands_name_the_bucket_prefix_and_server_and_never_the_key():
    commands = [pitr_barman.wal_archive_command(archive()), pitr_barman.wal_restore_command(archive()),
                pitr_barman.backup_command(archive(), host="db", port=5432, user="admin"),
                pitr_barman.retention_command(archive(), 7), pitr_barman.restore_command(archive(), "latest", "/d")]
    assert commands[0] == ["barman-cloud-wal-archive", "--endpoint-url", "http://127.0.0.1:9000", "-z",
                           "s3://acme-backups/prod/pitr", "prod"]
    assert "RECOVERY WINDOW OF 7 DAYS" in commands[3]
    assert all(SECRET not in " ".join(command) for command in commands)
    script = pitr_barman.wrapper_script(commands[0], "/etc/opsbook/prod.env", '"$1"')
    assert SECRET not in script and ". /etc/opsbook/prod.env" in script and script.rstrip().endswith('prod "$1"')
    assert f"AWS_SECRET_ACCESS_KEY={SECRET}" in pitr_barman.credentials_file(archive())


def test_a_folder_bucket_is_refused():
    with pytest.raises(CheckFailed, match="S3 or R2"):
        pitr_barman.archive_for(StorageConfig(provider="local", bucket="b", path="/tmp"), "local")


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
    segments = pitr_barman.wal_segments(listing(names), "pitr/prod/")
    wal = pitr_engine.continuity(segments, names[0])
    assert (wal.last, wal.missing, wal.resumes) == (names[2], "000000010000000000000004", names[3])
    assert pitr_engine.continuity(segments, names[3]).missing is None


def test_backup_info_and_the_range_a_backup_recovers_to():
    text = ("backup_id=20261123T170000\nstatus=DONE\nbegin_time=2026-11-23 17:00:00.5+00:00\n"
            "end_time=2026-11-23 17:00:30+00:00\nbegin_wal=000000010000000000000001\n"
            "end_wal=000000010000000000000002\ntimeline=1\nversion=150014\nxlog_segment_size=16777216\n")
    backup = pitr_barman.parse_backup_info("20261123T170000", text)
    assert backup.complete and backup.major == 15 and backup.end_time == T0 + timedelta(seconds=30)
    names = [f"0000000100000000000000{n:02X}" for n in (1, 2, 3, 5)]
    item = pitr_catalog.recoverable(backup, pitr_barman.wal_segments(listing(names), "pitr/prod/"))
    assert item.earliest == backup.end_time and item.latest == T0 + timedelta(minutes=2)
    catalog = pitr_catalog.Catalog([item], {})
    assert pitr_catalog.choose(catalog, T0 + timedelta(minutes=1), "prod") is item
    with pytest.raises(CheckFailed, match="WAL segment 000000010000000000000004 is missing"):
        pitr_catalog.choose(catalog, T0 + timedelta(minutes=3, seconds=30), "prod")
    with pytest.raises(CheckFailed, match="before prod's earliest"):
        pitr_catalog.choose(catalog, T0, "prod")
    # past the archive's end: plannable only from a backup whose WAL has no gap (a commit after it is archived first)
    gapless = pitr_catalog.recoverable(backup, pitr_barman.wal_segments(listing(names[:3]), "pitr/prod/"))
    later = T0 + timedelta(minutes=10)
    assert pitr_catalog.reaching_the_end(pitr_catalog.Catalog([gapless], {}), later) is gapless
    assert pitr_catalog.reaching_the_end(catalog, later) is None, "the gap stays refused"
    assert pitr_catalog.reaching_the_end(catalog, T0) is None, "before the backup's end"
    started = pitr_barman.parse_backup_info("x", "status=STARTED\nbegin_wal=000000010000000000000001\n")
    assert not started.complete and pitr_catalog.recoverable(started, {}).earliest is None


# --- the engine contract: every engine's builders, against the same expectations -----------------------------------

HOST = pitr_engine.ServerSide(data_dir=Path("/var/lib/postgresql/15/main"), os_user="postgres",
                              config_dir=Path("/var/lib/postgresql/15/opsbook-pitr-prod"), window_days=9)
TARGET = parse_url("postgresql://admin:db-password-xyz@db.internal:5433/shop")
ARCHIVE_ID = "15-1"


def barman_engine() -> pitr_engine.Engine:
    return pitr_barman.BarmanCloud(StorageConfig(provider="s3", bucket="acme-backups", endpoint="http://127.0.0.1:9000",
                                                 prefix="prod/", access_key_id="AKIDEXAMPLE",
                                                 secret_access_key=Secret(SECRET)), "prod")


def pgbackrest_engine() -> pitr_engine.Engine:
    engine = pitr_pgbackrest.PgBackRest(StorageConfig(provider="local", bucket="acme-backups", path="/srv/backups",
                                                      prefix="prod/"), "prod")
    engine.passphrase = Secret(SECRET)  # the repository's cipher passphrase (pitr.setup's, from the secret store)
    return engine


def segment_key(engine: pitr_engine.Engine, name: str, partial: bool = False) -> str:
    """Where each engine files an archived segment (its own layout), relative to the storage's prefix."""
    if engine.name == "barman-cloud":
        return f"{engine.root}wals/{name[:16]}/{name}.gz" + (".partial" if partial else "")
    return f"{engine.root}{ARCHIVE_ID}/{name[:16]}/{name}{'.partial' if partial else ''}-{'ab' * 20}.zst"


ENGINES = pytest.mark.parametrize("make", [barman_engine, pgbackrest_engine], ids=["barman-cloud", "pgbackrest"])


@pytest.mark.parametrize(("provider", "engine"), [("s3", "barman-cloud"), ("r2", "barman-cloud"),
                                                    ("local", "pgbackrest")])
def test_the_engine_is_chosen_by_the_backup_storage(provider, engine):
    assert pitr_engine.engine_name(StorageConfig(provider=provider, bucket="b", path="/srv")) == engine


def test_a_storage_no_engine_writes_to_is_refused():
    with pytest.raises(CheckFailed, match="cannot archive into gcs storage"):
        pitr_engine.engine_name(StorageConfig(provider="gcs", bucket="b"))


@ENGINES
def test_server_commands_carry_the_wal_file_and_never_a_secret(make):
    engine = make()
    archive, recovery = engine.archive_command(HOST), engine.recovery_command(None, Path("/tmp/scratch/data"))
    assert archive.endswith(" %p") and "%f" in recovery and "%p" in recovery
    commands = [engine.backup_command(HOST, TARGET), engine.retention_command(HOST),
                engine.restore_command("B1", Path("/tmp/scratch/data"), T0),
                engine.restore_command("B1", Path("/d"), None),
                engine.prepare_command(HOST, TARGET) or [], engine.check_command(HOST, TARGET) or []]
    for text in [archive, recovery, *(" ".join(command) for command in commands)]:
        assert SECRET not in text and "db-password-xyz" not in text, text
    assert "9" in " ".join(engine.retention_command(HOST)), "the recovery window of pitr.window_days"
    assert "B1" in " ".join(commands[2]) and "/tmp/scratch/data" in " ".join(commands[2])


@ENGINES
def test_files_live_outside_the_data_directory_and_only_0600_ones_hold_a_secret(make):
    engine = make()
    files = engine.files(HOST)
    assert files and all(path.parent == HOST.config_dir for path in files)
    assert any(mode == 0o600 for _text, mode in files.values())
    for path, (text, mode) in files.items():
        assert mode in (0o600, 0o700) and (SECRET not in text or mode == 0o600), path
    assert all(HOST.data_dir not in path.parents for path in engine.directories(HOST))


@ENGINES
def test_segments_are_read_from_the_engines_layout_and_a_gap_is_named(make):
    engine = make()
    names = [f"0000000100000000000000{n:02X}" for n in (1, 2, 3, 5, 6)]
    listing_ = [ObjectInfo(segment_key(engine, name), 10, None, T0 + timedelta(minutes=index))
                for index, name in enumerate(names)]
    others = [f"{engine.root}{ARCHIVE_ID}/00000002.history", segment_key(engine, "000000010000000000000007", True),
              f"{engine.root}{ARCHIVE_ID}/0000000100000000/000000010000000000000002.00000028.backup"]
    segments = engine.wal_segments([*listing_, *(ObjectInfo(key, 1, None, T0) for key in others)])
    assert segments == {name: T0 + timedelta(minutes=index) for index, name in enumerate(names)}
    wal = pitr_engine.continuity(segments, names[0])
    assert (wal.last, wal.missing, wal.resumes) == (names[2], "000000010000000000000004", names[3])
    assert all(key.startswith(engine.root) for key in (segment_key(engine, names[0]),))
    assert engine.wal_root.startswith(engine.root) or engine.root.startswith(engine.wal_root)


def test_pgbackrest_writes_its_repository_into_the_folder_bucket_and_reads_info_json():
    engine = pgbackrest_engine()
    assert engine.location == "/srv/backups/acme-backups/prod/pitr"
    text = pitr_pgbackrest.config_text(engine.repository, HOST, "zst")
    for line in ("repo1-type=posix", "repo1-path=/srv/backups/acme-backups/prod/pitr", "compress-type=zst",
                 "repo1-retention-full-type=time", "repo1-retention-full=9", "[prod]",
                 "pg1-path=/var/lib/postgresql/15/main", f"lock-path={HOST.config_dir / 'lock'}", "log-level-file=off"):
        assert line in text.splitlines(), line
    ciphered = pitr_pgbackrest.config_text(engine.repository, HOST, "zst", engine.passphrase).splitlines()
    assert {"repo1-cipher-type=aes-256-cbc", f"repo1-cipher-pass={SECRET}"} <= set(ciphered)
    assert not any("cipher" in line for line in text.splitlines()), "none without a passphrase"
    assert engine.credentials() == {"PGBACKREST_REPO1_CIPHER_TYPE": "aes-256-cbc",
                                    "PGBACKREST_REPO1_CIPHER_PASS": SECRET}, "this machine's commands: in their env"
    assert engine.archive_command(HOST) == (f"pgbackrest --config={HOST.config_dir / 'pgbackrest.conf'} --stanza=prod "
                                            "archive-push %p")
    assert engine.restore_command("B1", Path("/d"), T0)[-3:] == ["--type=time", "--target=2026-11-23 17:00:00+00:00",
                                                                  "--target-action=promote"]
    info = [{"name": "prod", "db": [{"id": 1, "version": "15"}], "backup": [
        {"label": "20261123-170500F", "archive": {"start": "000000010000000000000009",
                                                  "stop": "00000001000000000000000A"},
         "database": {"id": 1}, "timestamp": {"start": int(T0.timestamp()) + 300, "stop": int(T0.timestamp()) + 310}},
        {"label": "20261123-170000F", "archive": {"start": "000000010000000000000003",
                                                  "stop": "000000010000000000000004"},
         "database": {"id": 1}, "timestamp": {"start": int(T0.timestamp()), "stop": int(T0.timestamp()) + 8}}]}]
    backups = pitr_pgbackrest.parse_info(json.dumps(info))
    assert [backup.backup_id for backup in backups] == ["20261123-170000F", "20261123-170500F"]
    first = backups[0]
    assert first.complete and first.major == 15 and first.begin_wal == "000000010000000000000003"
    assert first.end_time == T0 + timedelta(seconds=9), "whole seconds, rounded up past the consistent point"
    assert pitr_pgbackrest.parse_info('[{"name": "prod", "status": {"code": 1}}]') == []


@pytest.mark.parametrize(("make", "package"), [(barman_engine, "apt-get install barman-cli-cloud"),
                                               (pgbackrest_engine, "apt-get install pgbackrest")],
                         ids=["barman-cloud", "pgbackrest"])
def test_a_missing_engine_is_one_refusal_naming_its_package(make, package, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(CheckFailed) as refused:
        make().check_installed()
    assert "is not installed here" in refused.value.message and package in refused.value.hint



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
    backup = pitr_barman.parse_backup_info("b1", text)
    names = [f"0000000100000000000000{n:02X}" for n in (2, 3, 5)]
    item = pitr_catalog.recoverable(backup, pitr_barman.wal_segments(listing(names), "pitr/prod/"))
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
    whole = pitr_catalog.recoverable(backup, pitr_barman.wal_segments(listing(names[:2]), "pitr/prod/"))
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
    settings = pitr_scratch.recovery_settings("barman-cloud-wal-restore %f %p", plan.recovery_target)
    assert settings["recovery_target_lsn"] == "0/3000060" and "recovery_target_time" not in settings
    refused = [dict(to_lsn="0/3000060", to_time="latest"), dict(to_lsn="0/3000060", backup="20261123T020000Z"),
               dict(to_lsn="3000060"), dict(to_lsn="0/3000060", tables=["Brand"])]
    for arguments in refused:
        with pytest.raises(UsageError):
            restore_runbook.build(environments("prod"), **arguments)
    with pytest.raises(UsageError, match="Neon"):
        restore_runbook.build(environments("neon"), to_lsn="0/3000060")


def test_the_segments_fetched_ahead_end_with_the_target_and_are_bounded():
    text = ("status=DONE\nbegin_time=2026-11-23 17:00:00+00:00\nend_time=2026-11-23 17:00:30+00:00\n"
            "begin_wal=000000010000000000000002\nend_wal=000000010000000000000002\nend_xlog=0/2000138\n")
    backup = pitr_barman.parse_backup_info("b1", text)
    names = [f"0000000100000000000000{n:02X}" for n in (2, 3, 4, 5, 6, 8)]
    segments = pitr_barman.wal_segments(listing(names), "pitr/prod/")  # archived a minute apart from T0
    item = pitr_catalog.recoverable(backup, segments)
    ahead = pitr_catalog.segments_to_replay
    assert ahead(segments, item, None, None, 32) == names[:5]  # the latest point: up to the gap
    assert ahead(segments, item, None, None, 2) == names[:2]
    assert ahead(segments, item, T0 + timedelta(minutes=1, seconds=30), None, 32) == names[:4]  # 2 after T and one
    assert ahead(segments, item, None, pitr_lsn.Lsn.parse("0/3000000"), 32) == names[:2]
    assert ahead(segments, pitr_catalog.recoverable(backup, {}), None, None, 32) == []


def restore_file(command: str, name: str, destination: Path) -> int:
    """restore_command as PostgreSQL runs it: %f and %p filled in, through sh."""
    return subprocess.run(["sh", "-c", command.replace("%f", name).replace("%p", str(destination))],
                          check=False).returncode


def test_recovery_takes_what_was_fetched_ahead_and_asks_the_engine_for_any_other(tmp_path):
    spool, pg_wal = tmp_path / "wal spool", tmp_path / "pg_wal"
    spool.mkdir()
    pg_wal.mkdir()
    (spool / "000000010000000000000002").write_text("fetched ahead")
    (spool / pitr_prefetch.ARCHIVED_HISTORY).write_text("00000002.history\n")
    asked = tmp_path / "asked"
    command = pitr_prefetch.restore_command(spool, f"echo %f >> {asked}; echo from the engine > %p")

    assert restore_file(command, "000000010000000000000002", pg_wal / "RECOVERYXLOG") == 0
    assert (pg_wal / "RECOVERYXLOG").read_text() == "fetched ahead"
    assert (spool / "000000010000000000000002").exists(), "kept: recovery asks again for its last segment"
    assert not asked.exists()
    assert restore_file(command, "000000010000000000000003", pg_wal / "RECOVERYXLOG") == 0
    assert (pg_wal / "RECOVERYXLOG").read_text() == "from the engine\n"
    # a history file the archive's listing does not hold is absent at once; one it holds is the engine's
    assert restore_file(command, "00000003.history", pg_wal / "RECOVERYHISTORY") == 1
    assert restore_file(command, "00000002.history", pg_wal / "RECOVERYHISTORY") == 0
    assert asked.read_text().split() == ["000000010000000000000003", "00000002.history"]
    # a segment fetched ahead that cannot be copied is a failure (126), never "the archive ends here" (1)
    assert restore_file(command, "000000010000000000000002", tmp_path / "gone" / "RECOVERYXLOG") == 126

    assert barman_engine().wal_fetch_command("000000010000000000000002", "x.part")[-2:] == [
        "000000010000000000000002", "x.part"]
    assert pgbackrest_engine().wal_fetch_command("000000010000000000000002", "x.part") is None


def test_barman_fetches_many_segments_in_one_process_of_its_own_python(tmp_path, monkeypatch):
    engine = barman_engine()
    script = tmp_path / "barman-cloud-wal-restore"
    found = {script.name: str(script), "python3": "/usr/local/bin/python3"}
    monkeypatch.setattr(pitr_barman.shutil, "which", found.get)
    for first_line, python in [("#!/usr/bin/python3", "/usr/bin/python3"), ("#!/venv/bin/python", "/venv/bin/python"),
                               ("#!/usr/bin/env python3", "/usr/local/bin/python3"), ("\x7fELF", None)]:
        script.write_text(f"{first_line}\nimport sys\n")
        pitr_barman.engine_python.cache_clear()
        assert pitr_barman.engine_python() == python, first_line
    pitr_barman.engine_python.cache_clear()
    script.write_text("#!/usr/bin/python3\n")
    command = engine.wal_batch_fetch_command(["000000010000000000000002", "000000010000000000000003"])
    pitr_barman.engine_python.cache_clear()
    assert command[:2] == ["/usr/bin/python3", "-c"] and "cloud_walrestore" in command[2]
    assert command[3:] == [*pitr_barman.wal_restore_command(engine.archive)[1:], "--",
                           "000000010000000000000002", "000000010000000000000003"]
    assert SECRET not in " ".join(command)
    assert pgbackrest_engine().wal_batch_fetch_command(["000000010000000000000002"]) is None


@ENGINES
def test_history_files_are_read_from_the_engines_layout(make):
    engine = make()
    history = (f"{engine.wal_root}00000002.history.gz" if engine.name == "barman-cloud"
               else f"{engine.wal_root}{ARCHIVE_ID}/00000002.history")
    keys = [history, segment_key(engine, "000000010000000000000002"), "elsewhere/00000003.history"]
    assert engine.history_files([ObjectInfo(key, 1, None, T0) for key in keys]) == {"00000002.history"}
