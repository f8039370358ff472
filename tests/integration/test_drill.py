"""inv drill / drill.history / drill.due through the real CLI: prod's backup restored into staging, staging's app
on an sshd host restarted against it, images sampled in moto S3. One setup; each check is broken and repaired
in place, and every failing drill must exit 3 with a report naming the cause."""

from __future__ import annotations

import json
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from ops.demo.seed import MIGRATIONS_DIR, image_objects, insert_demo_data
from tests.cli import Opsbook
from tests.fixtures.browser import CHROMIUM, Fetches, screenshots, serious_violations
from tests.fixtures.ssh import make_app_host

IMAGES = 12


def prepare_source(url: str) -> None:
    from ops.migrations import apply_pending

    apply_pending(url, MIGRATIONS_DIR)
    with psycopg.connect(url, autocommit=True) as connection:
        insert_demo_data(connection)


@pytest.fixture(scope="module")
def drill_setup(postgres_server: Any, s3_server: Any, ssh_server: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("drill")
    workspace = Opsbook(root / "workspace")
    workspace.root.mkdir()
    repository = root / "repository"
    shutil.copytree(MIGRATIONS_DIR, repository / "prisma" / "migrations")
    suffix = uuid.uuid4().hex[:8]
    prod_url = postgres_server.create_database(f"prod_{suffix}")
    staging_url = postgres_server.create_database(f"staging_{suffix}")
    prepare_source(prod_url.reveal())
    buckets = {name: s3_server.make_bucket().bucket for name in ("prod", "prod-backups", "staging", "staging-backups")}
    client = s3_server.client()
    for key, data in list(image_objects())[:IMAGES]:
        client.put_object(Bucket=buckets["prod"], Key=key, Body=data, ACL="public-read")  # served by public_base
    [host] = [make_app_host(ssh_server, root / "hosts", "web1")]
    workspace.environ.update({"PROD_DB": prod_url.reveal(), "STAGING_DB": staging_url.reveal(),
                              "S3_ACCESS_KEY_ID": s3_server.access_key_id,
                              "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key.reveal()})

    def storage(bucket: str, **extra: Any) -> dict[str, Any]:
        return {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket,
                "access_key_id": "${env:S3_ACCESS_KEY_ID}", "secret_access_key": "${env:S3_SECRET_ACCESS_KEY}",
                **extra}

    workspace.write_inventory({"project": "drilltest", "default_env": "prod", "envs": {
        "prod": {
            "protected": True, "database": {"url": "${env:PROD_DB}"},
            "storage": storage(buckets["prod"], public_base=f"{s3_server.endpoint}/{buckets['prod']}"),
            "backups": storage(buckets["prod-backups"], prefix="prod/"),
            "targets": {"rpo_hours": 24, "rto_minutes": 10},
            "drill": {"target": "staging",
                      "images_query": f'SELECT "storageKey", "sizeBytes" FROM "Image" WHERE id <= {IMAGES}'},
        },
        "staging": {
            "database": {"url": "${env:STAGING_DB}"},
            "storage": storage(buckets["staging"]), "backups": storage(buckets["staging-backups"], prefix="staging/"),
            "hosts": [{"name": "web1", "address": "127.0.0.1", "user": host.host.user, "port": host.host.port,
                       "key_file": host.host.key_filename,
                       "app": {"env_file": str(host.env_file), "restart": host.restart_command,
                               "health_url": host.health_url, "ready_url": host.ready_url,
                               "log_command": host.log_command}}],
            "app": {"dir": str(host.app_dir), "repository": str(repository), "health_timeout": 10,
                    "migrations": {"engine": "native", "dir": "prisma/migrations"},
                    "env": {"APP_MIGRATIONS_DIR": str(repository / "prisma" / "migrations")}},
        },
    }})
    made = workspace.run("backup", "--env", "prod", "--confirm", "prod", "--json")
    assert made.exit_code == 0, made
    try:
        yield {"workspace": workspace, "buckets": buckets, "host": host, "repository": repository,
               "backup": made.json()["backup"], "client": client,
               "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal()]}
    finally:
        host.stop()


def report_of(workspace: Opsbook, result: Any) -> dict[str, Any]:
    [folder] = [p for p in (workspace.state_dir / "drills").iterdir() if p.name in result.stdout]
    return json.loads((folder / "report.json").read_text())


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {step["name"]: step["status"] for step in report["steps"]}


def test_a_full_drill_passes_and_leaves_its_evidence(drill_setup):
    workspace, buckets = drill_setup["workspace"], drill_setup["buckets"]
    planned = workspace.run("drill", "--env", "prod", "--dry-run")
    assert planned.exit_code == 0, planned
    assert "would restore a backup of prod into staging" in planned.stderr

    result = workspace.run("drill", "--env", "prod", "--json")
    assert result.exit_code == 0, result
    report = result.json()["drill"]
    assert report["passed"] is True and report["failures"] == []
    assert statuses(report) == {name: "passed" for name in ("restore", "migrations", "staging", "images", "rto", "rpo")}
    assert report["backup_id"] == drill_setup["backup"]["backup_id"]
    assert report["source_env"] == "prod" and report["target_env"] == "staging" and report["operator"] == "tester"
    assert 0 < report["rto_seconds"] < 600 and report["rpo_seconds"] >= 0
    assert report["finished_at"].endswith("Z") and report["targets"] == {"rto_minutes": 10.0, "rpo_hours": 24.0}
    steps = [(e["index"], e["step"], e["state"]) for e in workspace.journal(result.json()["run_id"])
             if e["event"] == "step"]
    assert ("3.2", "staging/restart", "verified") in steps and (3, "staging", "verified") in steps
    assert any(step.startswith("restore/") and index.startswith("1.") for index, step, _ in steps)
    folder = workspace.state_dir / "drills" / report["id"]
    markdown = (folder / "report.md").read_text()
    assert "PASSED" in markdown and drill_setup["backup"]["backup_id"] in markdown
    assert 'id="verdict" data-passed="true"' in (folder / "report.html").read_text()
    assert report["restored_bytes"] > 0 and report["restored_rows"] > 3000
    stored = drill_setup["client"].get_object(Bucket=buckets["prod-backups"],
                                              Key=f"prod/drills/{report['id']}/report.json")
    assert json.loads(stored["Body"].read())["passed"] is True
    with psycopg.connect(workspace.environ["STAGING_DB"]) as staging:  # staging holds prod's data now
        assert staging.execute('SELECT count(*) FROM "Image"').fetchone()[0] == 3000

    history = workspace.run("drill.history", "--env", "prod", "--json")
    assert history.exit_code == 0 and [d["id"] for d in history.json()["drills"]] == [report["id"]], history
    due = workspace.run("drill.due", "--env", "prod", "--json")
    assert due.exit_code == 0 and due.json()["done_this_quarter"] is True, due
    assert workspace.run("drill.due", "--env", "staging").exit_code == 3  # staging itself was never drilled


def test_a_corrupt_backup_fails_the_drill_and_says_so(drill_setup):
    workspace, client, bucket = drill_setup["workspace"], drill_setup["client"], drill_setup["buckets"]["prod-backups"]
    key = f"prod/{drill_setup['backup']['key']}"
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(damaged))
    try:
        result = workspace.run("drill", "--env", "prod", "--json")
    finally:
        client.put_object(Bucket=bucket, Key=key, Body=original)
    assert result.exit_code == 3, result
    report = report_of(workspace, result)
    assert report["passed"] is False
    assert statuses(report) == {"restore": "failed", "migrations": "skipped", "staging": "skipped",
                                "images": "skipped", "rto": "failed", "rpo": "passed"}
    assert "damaged" in report["failures"][0] and "sha256" in report["failures"][0]
    [failed] = [e for e in workspace.journal(report["id"]) if e.get("state") == "failed" and "/" in e["step"]]
    assert failed["step"].startswith("restore/") and "sha256" in failed["reason"], failed
    assert "never became ready" in " ".join(report["failures"])


def test_an_app_that_will_not_start_fails_the_drill(drill_setup):
    workspace, host = drill_setup["workspace"], drill_setup["host"]
    host.stop()
    with socket.socket() as squatter:  # the app's port is taken: it exits as soon as it starts
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", host.port))
        squatter.listen()
        result = workspace.run("drill", "--env", "prod", "--json")
    assert result.exit_code == 3, result
    report = report_of(workspace, result)
    assert statuses(report)["staging"] == "failed" and statuses(report)["restore"] == "passed"
    assert statuses(report)["migrations"] == "passed" and statuses(report)["rto"] == "failed"
    assert "web1" in " ".join(report["failures"])


def test_an_edited_migration_and_a_missing_image_are_both_named(drill_setup):
    workspace, client = drill_setup["workspace"], drill_setup["client"]
    script = sorted((drill_setup["repository"] / "prisma" / "migrations").glob("*/migration.sql"))[0]
    text = script.read_text()
    bucket, [(key, data), *_] = drill_setup["buckets"]["prod"], list(image_objects())
    script.write_text(text + "\n-- edited after it was applied\n")
    client.delete_object(Bucket=bucket, Key=key)
    try:
        result = workspace.run("drill", "--env", "prod", "--json")
    finally:
        script.write_text(text)
        client.put_object(Bucket=bucket, Key=key, Body=data, ACL="public-read")
    assert result.exit_code == 3, result
    report = report_of(workspace, result)
    assert statuses(report) == {"restore": "passed", "migrations": "failed", "staging": "passed", "images": "failed",
                                "rto": "passed", "rpo": "passed"}
    failures = " ".join(report["failures"])
    assert script.parent.name in failures and "edited" in failures
    assert f"{key}: missing" in failures
    markdown = (workspace.state_dir / "drills" / report["id"] / "report.md").read_text()
    assert "FAILED" in markdown and f"{key}: missing" in markdown
    produced = workspace.everything_produced()
    assert not any(secret in produced for secret in drill_setup["secrets"])


def test_a_hand_made_change_on_the_source_fails_the_drills_migrations_check(drill_setup):
    """What `inv migrate.drift` finds on prod comes back with its backup: the drill's migrations check names it."""
    workspace = drill_setup["workspace"]
    prod = workspace.environ["PROD_DB"]
    with psycopg.connect(prod, autocommit=True) as connection:
        connection.execute('ALTER TABLE "Brand" ADD COLUMN "hotfix" text')
    try:
        assert workspace.run("backup", "--env", "prod", "--confirm", "prod").exit_code == 0
        result = workspace.run("drill", "--env", "prod", "--json")
    finally:
        with psycopg.connect(prod, autocommit=True) as connection:
            connection.execute('ALTER TABLE "Brand" DROP COLUMN "hotfix"')
        assert workspace.run("backup", "--env", "prod", "--confirm", "prod").exit_code == 0
    assert result.exit_code == 3, result
    report = report_of(workspace, result)
    assert statuses(report)["migrations"] == "failed" and statuses(report)["restore"] == "passed"
    failures = " ".join(report["failures"])
    assert "hotfix" in failures and "migrate.drift --env prod" in failures, failures


def chart_points(dom: str, chart_id: str) -> list[tuple[str, str]]:
    """(class, data-value) of each mark of one chart, from the DOM Chromium built."""
    chart = re.search(rf'<figure class="chart" id="{chart_id}".*?</figure>', dom, re.DOTALL)
    assert chart, f"no chart {chart_id} in the page"
    return re.findall(r'<(?:circle|rect) class="((?:bar )?point[^"]*)" data-value="([^"]*)"', chart.group(0))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (./opsbook pytest installs it)")
def test_the_html_report_charts_every_drill_in_a_browser(drill_setup, tmp_path, axe_source, browser):
    """The drills above left their reports (this one runs more only when run alone): the newest one's page,
    fetched back from the bucket, charts every drill of prod; opened in Chromium it loads nothing, axe-core finds
    no serious violation, and screenshots at phone and desktop widths are kept with the test's output."""
    workspace, client = drill_setup["workspace"], drill_setup["client"]
    drills = workspace.run("drill.history", "--env", "prod", "--json").json()["drills"]
    while len(drills) < 3:
        workspace.run("drill", "--env", "prod")
        drills = workspace.run("drill.history", "--env", "prod", "--json").json()["drills"]
    newest = drills[0]
    stored = client.get_object(Bucket=drill_setup["buckets"]["prod-backups"],
                               Key=f"prod/drills/{newest['id']}/report.html")
    assert stored["ContentType"].startswith("text/html")
    html = stored["Body"].read()
    assert html == (workspace.state_dir / "drills" / newest["id"] / "report.html").read_bytes()
    page = tmp_path / "report.html"
    page.write_bytes(html)

    dom = browser.dom(page.as_uri())
    oldest_first = list(reversed(drills))
    for chart_id, field in (("rto-chart", "rto_seconds"), ("rpo-chart", "rpo_seconds"),
                            ("size-chart", "restored_bytes")):
        marks = chart_points(dom, chart_id)
        assert len(marks) == len(drills), (chart_id, marks)
        assert [value != "" for _, value in marks] == [d.get(field) is not None for d in oldest_first], chart_id
        assert ["failed" not in kind for kind, _ in marks] == [d["passed"] for d in oldest_first], chart_id
    assert re.search(r'<line class="target"[^>]*><title>RTO target: 10m</title>', dom)
    assert re.search(r'<line class="target"[^>]*><title>RPO target: 1d</title>', dom)
    statuses_shown = dict(re.findall(r'data-check="([a-z ]+)" data-status="([a-z ]+)"', dom))
    assert statuses_shown == {step["name"]: step["status"] for step in newest["steps"]}
    assert Fetches(dom).found == []
    assert serious_violations(browser, tmp_path, html, axe_source) == []
    screenshots(browser, tmp_path, page.as_uri(), "drill-report")
