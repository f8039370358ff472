"""inv backup.check through the real CLI, against moto S3, from an inventory that has the backup bucket's
credentials and no database at all (the watchdog runs on another machine than the backups)."""

from __future__ import annotations

import math
import re
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ops import backup_manifest as bm
from ops.clock import iso_z
from ops.storage import open_storage
from tests.cli import Opsbook
from tests.fixtures.backups import backups_section, write_inventory
from tests.fixtures.manifests import manifest
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.shop import make_database

REPOSITORY = Path(__file__).resolve().parents[2]
SECTION = "## Watching the backups (pings and backup.check)"


def watchdog_inventory(opsbook: Opsbook, s3_server: Any, bucket: str, **backups: Any) -> None:
    """`prod`: the backup bucket (its keys as ${env:…}) and nothing else: no database, no app storage."""
    opsbook.environ.update({"S3_ACCESS_KEY_ID": s3_server.access_key_id,
                            "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key.reveal()})
    opsbook.write_inventory({"project": "acme", "default_env": "prod", "envs": {
        "prod": {"backups": backups_section(s3_server.endpoint, bucket, "prod/", **backups)}}})


@pytest.fixture
def watched(opsbook: Opsbook, s3_server: Any) -> dict[str, Any]:
    config = s3_server.make_bucket(prefix="prod/")
    watchdog_inventory(opsbook, s3_server, config.bucket, retention={"max_age_hours": 26})
    return {"bucket": config.bucket, "storage": open_storage(config), "secrets": [s3_server.secret_access_key.reveal()]}


def store(storage: Any, age: timedelta, *, verified_ago: timedelta | None = None, **changes: Any) -> str:
    """A complete backup that finished `age` ago (manifest as backup writes it), verified `verified_ago` ago."""
    finished = datetime.now(UTC) - age
    backup_id = f"{finished:%Y%m%dT%H%M%SZ}-{len(list(storage.list()))}"
    written = manifest(backup_id, started_at=iso_z(finished - timedelta(seconds=12)), finished_at=iso_z(finished),
                       object=bm.StoredObject(bm.dump_key(backup_id, False), 4, "a" * 64, 4), **changes)
    storage.put_bytes(written.object.key, b"dump")
    bm.write_manifest(storage, written)
    if verified_ago is not None:
        bm.append_verification(storage, backup_id, bm.Verification(
            iso_z(datetime.now(UTC) - verified_ago), "checksum", True, "r", "tester", "size and sha256 match"))
    return backup_id


def check(opsbook: Opsbook, *args: str) -> Any:
    return opsbook.run("backup.check", "--env", "prod", *args)


def fail_lines(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("FAIL")]


def test_a_fresh_verified_backup_passes_without_a_database_in_the_inventory(opsbook, watched, tmp_path):
    backup_id = store(watched["storage"], timedelta(hours=3), verified_ago=timedelta(days=2))
    textfile = tmp_path / "metrics" / "backup_check.prom"
    result = check(opsbook, "--json", "--prometheus", str(textfile))
    assert result.exit_code == 0, result
    data = result.json()
    assert data["ok"] is True and data["problems"] == [] and data["backups"] == 1
    assert data["newest"]["id"] == backup_id and 3 * 3600 - 60 < data["newest"]["age_seconds"] < 3 * 3600 + 60
    assert data["max_age_hours"] == 26 and data["verify_max_age_days"] == 8
    assert data["last_verification"]["id"] == backup_id and data["last_verification"]["kind"] == "checksum"
    assert data["database"] is None and set(data["checks"]) == {"newest", "verification", "database"}
    assert all(entry["ok"] for entry in data["checks"].values())
    assert "no database to compare" in data["checks"]["database"]["detail"]
    samples = {(s.name, s.labels.get("check")): s.value
               for family in text_string_to_metric_families(textfile.read_text()) for s in family.samples}
    assert samples[("opsbook_backup_check_success", None)] == 1
    assert 3 * 3600 - 60 < samples[("opsbook_backup_check_newest_backup_age_seconds", None)] < 3 * 3600 + 60
    assert 2 * 86400 - 60 < samples[("opsbook_backup_check_last_verification_age_seconds", None)] < 2 * 86400 + 60
    assert samples[("opsbook_backup_check_problem", "newest")] == 0
    assert list(textfile.parent.iterdir()) == [textfile]  # written through a temporary name, renamed
    assert_no_secret(opsbook, *watched["secrets"])


def test_a_stale_backup_exits_3_saying_what_to_do(opsbook, watched, tmp_path):
    store(watched["storage"], timedelta(hours=30), verified_ago=timedelta(hours=29))
    stale = check(opsbook)
    assert stale.exit_code == 3, stale
    (line,) = fail_lines(stale)
    assert "newest" in line and "30.0 h ago (limit 26.0 h)" in line and "inv backup --env prod" in line
    assert "Traceback" not in stale.output
    assert check(opsbook, "--max-age-hours", "31").exit_code == 0
    short = check(opsbook, "--max-age-hours", "2", "--json")
    assert short.exit_code == 3 and [p["check"] for p in short.json()["problems"]] == ["newest"], short
    textfile = tmp_path / "check.prom"
    assert check(opsbook, "--max-age-hours", "2", "--prometheus", str(textfile)).exit_code == 3
    samples = {(s.name, s.labels.get("check")): s.value
               for family in text_string_to_metric_families(textfile.read_text()) for s in family.samples}
    assert samples[("opsbook_backup_check_success", None)] == 0
    assert samples[("opsbook_backup_check_problem", "newest")] == 1
    assert check(opsbook, "--max-age-hours", "soon").exit_code == 2


def test_never_verified_or_verified_long_ago_exits_3_but_a_newer_unverified_backup_does_not(opsbook, watched):
    store(watched["storage"], timedelta(hours=2))
    never = check(opsbook, "--json")
    assert never.exit_code == 3, never
    assert never.json()["last_verification"] is None
    (line,) = fail_lines(never)
    assert "no backup ever passed a verification" in line and "inv backup.verify --env prod" in line

    store(watched["storage"], timedelta(days=10), verified_ago=timedelta(days=9))
    long_ago = check(opsbook)
    assert long_ago.exit_code == 3, long_ago
    (line,) = fail_lines(long_ago)
    assert "verification 9.0 d ago (limit 8.0 d)" in line

    # verified 5 days ago; the newest backup (2 h old) is not verified yet: that is fine
    store(watched["storage"], timedelta(days=6), verified_ago=timedelta(days=5))
    assert check(opsbook).exit_code == 0


def test_a_verification_limit_from_the_inventory(opsbook, watched, s3_server):
    store(watched["storage"], timedelta(hours=2), verified_ago=timedelta(days=5))
    assert check(opsbook).exit_code == 0
    watchdog_inventory(opsbook, s3_server, watched["bucket"], verify_max_age_days=4)
    result = check(opsbook, "--json")
    assert result.exit_code == 3 and result.json()["verify_max_age_days"] == 4, result


def test_a_backup_of_another_database_or_environment_exits_3(opsbook, watched, s3_server):
    store(watched["storage"], timedelta(hours=2), verified_ago=timedelta(hours=1))
    inventory = {"project": "acme", "default_env": "prod", "envs": {"prod": {
        "database": {"url": "postgresql://app@db.internal:5432/shop"},
        "backups": backups_section(s3_server.endpoint, watched["bucket"], "prod/")}}}
    opsbook.write_inventory(inventory)
    other = check(opsbook, "--json")
    assert other.exit_code == 3, other
    (line,) = fail_lines(other)
    assert "database" in line and "database app, the inventory names shop" in line
    inventory["envs"]["prod"]["database"]["name"] = "app"
    opsbook.write_inventory(inventory)
    assert check(opsbook).exit_code == 0

    store(watched["storage"], timedelta(hours=1), verified_ago=timedelta(hours=1), env="staging")
    wrong = check(opsbook)
    assert wrong.exit_code == 3, wrong
    assert "the newest backup is of app of environment staging, not of prod" in fail_lines(wrong)[0]


def test_an_empty_bucket_exits_3(opsbook, watched):
    empty = check(opsbook, "--json")
    assert empty.exit_code == 3, empty
    assert empty.json()["newest"] is None and empty.json()["backups"] == 0
    assert any("there is no complete backup" in line for line in fail_lines(empty))


def test_after_a_real_backup_and_verify_the_watchdog_passes(opsbook, postgres_server, s3_server):
    _name, url = make_database(postgres_server)
    bucket = s3_server.make_bucket().bucket
    write_inventory(opsbook, s3_server, {"prod": {"backups": backups_section(s3_server.endpoint, bucket, "prod/")}},
                    {"prod": url})
    assert opsbook.run("backup", "--env", "prod").exit_code == 0
    unverified = opsbook.run("backup.check", "--env", "prod")
    assert unverified.exit_code == 3 and "no backup ever passed" in unverified.stderr, unverified
    assert opsbook.run("backup.verify", "--env", "prod").exit_code == 0
    watchdog_inventory(opsbook, s3_server, bucket)  # another machine: the bucket's keys only
    watched = opsbook.run("backup.check", "--env", "prod", "--json")
    assert watched.exit_code == 0, watched
    assert watched.json()["newest"]["env"] == "prod"
    assert math.isclose(watched.json()["max_age_hours"], 2 * 24)  # twice the default schedule
    assert_no_secret(opsbook, postgres_server.password.reveal(), s3_server.secret_access_key.reveal())


def readme_section() -> str:
    text = (REPOSITORY / "README.md").read_text()
    assert text.count(SECTION) == 1, f"README.md must have exactly one {SECTION!r} section"
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def readme_commands() -> list[list[str]]:
    """The indented `inv backup.check` lines after the README's marker, split as a shell would."""
    block = readme_section().split("<!-- backup.check commands -->", 1)[1]
    return [shlex.split(line.strip())[1:] for line in block.splitlines() if line.startswith("    inv ")]


def readme_monitor() -> dict[str, Any]:
    block = readme_section().split("<!-- monitor example -->", 1)[1]
    found = re.search(r"```yaml\n(.*?)\n```", block, flags=re.DOTALL)
    assert found, "no ```yaml block after the monitor marker"
    return yaml.safe_load(found.group(1))["envs"]["prod"]["monitor"]


def test_the_readme_commands_run_as_written_and_ping_the_readme_monitor(opsbook, watched, s3_server,
                                                                         webhook_receiver):
    commands = readme_commands()
    assert [command[0] for command in commands] == ["backup.check"] * 3 and len(commands) == 3
    store(watched["storage"], timedelta(hours=3), verified_ago=timedelta(days=1))
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["prod"]["monitor"] = readme_monitor()
    opsbook.write_inventory(inventory)
    opsbook.environ.update({"PING_URL": webhook_receiver.url("/ping/readme-check"),
                            "PING_URL_VERIFY": webhook_receiver.url("/ping/readme-verify"),
                            "PING_URL_KEYS": webhook_receiver.url("/ping/readme-keys")})
    assert opsbook.run("inventory.check").exit_code == 0
    for command in commands:
        result = opsbook.run(*command)
        assert result.exit_code == 0, result
        if "--json" in command:
            assert result.json()["ok"] is True
    assert (opsbook.root / "textfile" / "opsbook_backup_check.prom").exists()
    paths = [urlsplit(request.path).path for request in webhook_receiver.requests]
    assert paths == ["/ping/readme-check/start", "/ping/readme-check"] * 3, paths
