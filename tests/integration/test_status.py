"""inv status against real PostgreSQL and moto S3: the numbers, --json, and a Prometheus textfile
checked with prometheus_client's parser."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.storage import open_storage
from tests.cli import Opsbook
from tests.fixtures.backups import store_backup
from tests.fixtures.browser import CHROMIUM, Fetches, screenshots, serious_violations
from tests.fixtures.shop import DEMO_MIGRATIONS

OBJECT_SIZES = (10, 200, 3000)


@pytest.fixture
def monitored(opsbook: Opsbook, postgres_server: Any, s3_server: Any) -> dict[str, Any]:
    from ops.migrations import apply_pending

    database_url = postgres_server.create_database()
    apply_pending(database_url, DEMO_MIGRATIONS)
    repository = opsbook.root / "app"
    shutil.copytree(DEMO_MIGRATIONS, repository / "prisma" / "migrations")
    (repository / "prisma" / "migrations" / "20990101000000_add_orders").mkdir()
    (repository / "prisma" / "migrations" / "20990101000000_add_orders" / "migration.sql").write_text("SELECT 1;\n")
    iam_user = f"opsbook-{uuid.uuid4().hex[:8]}"
    key_id, secret = s3_server.create_access_key(iam_user)
    assets, backups = s3_server.make_bucket(), s3_server.make_bucket()
    for index, size in enumerate(OBJECT_SIZES):
        s3_server.client().put_object(Bucket=assets.bucket, Key=f"images/{index}.png", Body=b"x" * size)
    opsbook.environ.update({"STATUS_DATABASE_URL": database_url.reveal(), "STATUS_SECRET": secret.reveal()})
    opsbook.write_inventory({"project": "statustest", "default_env": "web", "envs": {"web": {
        "database": {"url": "${env:STATUS_DATABASE_URL}"},
        "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": assets.bucket, "access_key_id": key_id, "secret_access_key": "${env:STATUS_SECRET}"},
        "backups": {"bucket": backups.bucket, "prefix": "web/", "retention": {"daily": 40}},
        "keys": {"provider": "aws-iam", "iam_user": iam_user},
        "app": {"repository": str(repository), "migrations": {"engine": "native", "dir": "prisma/migrations"}},
    }}})
    backup_storage = open_storage(s3_server.config(backups.bucket, prefix="web/"))
    backup_id = store_backup(backup_storage, datetime.now(UTC) - timedelta(hours=2))
    for name, state in (("a", "investigating"), ("b", "resolved"), ("c", "identified")):
        folder = opsbook.state_dir / "incidents" / name
        folder.mkdir(parents=True)
        (folder / "incident.json").write_text(json.dumps({"id": name, "env": "web", "state": state, "title": name}))
    return {"backup_id": backup_id, "secrets": [secret.reveal(), postgres_server.password.reveal()],
            "backups": backup_storage}


def samples(text: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted labels: value}}, as Prometheus parses the file."""
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_status_json_and_prometheus_textfile_and_an_unreadable_part(opsbook, monitored):
    textfile = opsbook.root / "textfiles" / "opsbook.prom"
    textfile.parent.mkdir()
    textfile.write_text('# HELP opsbook_backup_age_seconds Seconds since the last successful backup finished.\n'
                        '# TYPE opsbook_backup_age_seconds gauge\nopsbook_backup_age_seconds{env="staging"} 42\n')
    result = opsbook.run("status", "--env", "web", "--json", "--prometheus", str(textfile))
    assert result.exit_code == 0, result
    report = result.json()
    assert report["storage_bucket"]["objects"] == len(OBJECT_SIZES)
    assert report["last_backup"]["id"] == monitored["backup_id"]
    assert report["migrations"]["pending"] == ["20990101000000_add_orders"]
    assert report["incidents"]["open"] == 2
    assert report["database"]["slowest_statements"] is None and "pg_stat_statements" in result.stderr

    text = textfile.read_text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["opsbook_database_deadlocks"].type == "counter"
    assert all(family.type == "gauge" for name, family in families.items() if name != "opsbook_database_deadlocks")
    assert [line for line in text.splitlines() if line.startswith("# HELP opsbook_database_size_bytes")] != []
    assert len([line for line in text.splitlines() if line.startswith("# TYPE ")]) == len(families)
    found = samples(text)
    web = (("env", "web"),)
    database = report["database"]["database"]
    assert found["opsbook_database_size_bytes"][(("database", database), ("env", "web"))] == \
        report["database"]["size_bytes"] > 0
    assert found["opsbook_database_max_connections"][web] == report["database"]["max_connections"]
    assert found["opsbook_database_connections"][(("env", "web"), ("state", "active"))] >= 1
    assert found["opsbook_bucket_objects"][(("bucket", report["storage_bucket"]["bucket"]), ("env", "web"),
                                            ("section", "storage"))] == len(OBJECT_SIZES)
    assert found["opsbook_bucket_size_bytes"][(("bucket", report["storage_bucket"]["bucket"]), ("env", "web"),
                                               ("section", "storage"))] == sum(OBJECT_SIZES)
    assert 7100 < found["opsbook_backup_age_seconds"][web] < 7400
    assert found["opsbook_backup_age_seconds"][(("env", "staging"),)] == 42  # another environment's sample kept
    assert abs(found["opsbook_backup_last_success_timestamp_seconds"][web]
               - (datetime.now(UTC) - timedelta(hours=2)).timestamp()) < 300
    assert found["opsbook_backup_size_bytes"][web] == 4
    assert found["opsbook_migrations_pending"][web] == 1 and found["opsbook_migrations_failed"][web] == 0
    assert found["opsbook_incidents_open"][web] == 2
    assert 0 <= found["opsbook_storage_key_age_seconds"][web] < 600
    assert set(found["opsbook_status_success"].values()) == {1}
    assert all(secret not in opsbook.everything_produced() + text for secret in monitored["secrets"])

    # an unreadable part is reported, exported as unreadable, and the rest is still written
    opsbook.environ["STATUS_DATABASE_URL"] = "postgresql://nobody:wrong-password-42@127.0.0.1:1/none"
    textfile = opsbook.root / "opsbook.prom"
    result = opsbook.run("status", "--env", "web", "--prometheus", str(textfile))
    assert result.exit_code == 3, result
    assert "database" in result.stderr and "127.0.0.1:1" in result.stderr
    assert "wrong-password-42" not in result.output and "Traceback" not in result.output
    found = samples(textfile.read_text())
    assert found["opsbook_status_success"][(("env", "web"), ("part", "database"))] == 0
    assert found["opsbook_status_success"][(("env", "web"), ("part", "storage_bucket"))] == 1
    assert "opsbook_database_size_bytes" not in found and found["opsbook_incidents_open"][(("env", "web"),)] == 2


def chart_marks(dom: str, chart_id: str) -> list[str]:
    """The classes of one chart's marks, from the DOM Chromium built."""
    chart = re.search(rf'<figure class="chart" id="{chart_id}".*?</figure>', dom, re.DOTALL)
    assert chart, f"no chart {chart_id} in the page"
    return re.findall(r'<(?:circle|rect) class="(?:bar )?point ([^"]*)"', chart.group(0))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (./opsbook pytest installs it)")
def test_status_html_draws_the_backups_the_plan_and_the_key_in_a_browser(opsbook, monitored, tmp_path, axe_source,
                                                                          browser):
    """Thirty-one backups over 90 days (29 written as backup writes them, every other one verified, and a real
    run): the dashboard charts each, says why retention keeps each, and the key's age against its rotation."""
    now = datetime.now(UTC)
    for n in range(29):
        store_backup(monitored["backups"], now - timedelta(days=3 * n + 1), verified=n % 2 == 0)
    made = opsbook.run("backup", "--env", "web")
    assert made.exit_code == 0, made
    page = opsbook.root / "status.html"
    result = opsbook.run("status", "--env", "web", "--json", "--html", str(page))
    assert result.exit_code == 0, result
    assert result.json()["last_backup"]["count"] == 31 and f"wrote {page}" in result.stderr  # --json as before
    assert page.read_text().startswith("<!doctype html>")

    dom = browser.dom(page.as_uri())
    sizes = chart_marks(dom, "backup-size-chart")
    assert len(sizes) == len(chart_marks(dom, "backup-duration-chart")) == 31
    assert sizes.count("unverified") == 14 + (sizes[-1] == "unverified")  # oldest first: the real run last
    assert sizes[-2] == "verified"  # the one the fixture left two hours ago
    decisions = re.findall(r'<tr class="decision" data-backup="([^"]+)" data-decision="(\w+)"', dom)
    assert len(decisions) == 31 and {decision for _, decision in decisions} == {"keep"}  # daily 40 keeps each day
    assert re.search(r"keep_last 1/7; daily \d{4}-\d\d-\d\d", dom)
    assert len(chart_marks(dom, "key-age-chart")) == 1
    assert re.search(r'<line class="target"[^>]*><title>rotate by: 90 days</title>', dom)
    assert "No drill on record" in dom and 'data-part="migrations"' in dom
    assert Fetches(dom).found == []
    assert serious_violations(browser, tmp_path, page.read_bytes(), axe_source) == []
    screenshots(browser, tmp_path, page.as_uri(), "status")
    assert all(secret not in opsbook.everything_produced() + page.read_text() for secret in monitored["secrets"])

    missing = opsbook.run("status", "--env", "web", "--html", str(opsbook.root / "no" / "{env}.html"))
    assert missing.exit_code == 2 and f"the folder {opsbook.root / 'no'} does not exist" in missing.stderr, missing


def test_a_failed_part_is_exported_as_unreadable_and_nothing_else_about_it():
    from ops.metrics import render
    from runbooks.status import StatusReport, families

    report = StatusReport("web", 1.0, parts={"database": None, "incidents": {"open": 0, "incidents": []}},
                          errors={"database": "cannot connect"})
    found = samples(render(families(report)))
    assert found["opsbook_status_success"] == {(("env", "web"), ("part", "database")): 0,
                                               (("env", "web"), ("part", "incidents")): 1}
    assert not any(name.startswith("opsbook_database_") for name in found)
