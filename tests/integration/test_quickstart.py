"""The README's main job on the embedded default: the sandbox starts itself and answers."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import psycopg

from ops.demo import seed
from tests.cli import REPOSITORY, Opsbook
from tests.fixtures.readme import inv_lines


def test_health_on_the_sandbox_starts_it_and_passes(sandbox_workspace):
    first = sandbox_workspace.run("health", "--json")  # default_env: local
    assert first.exit_code == 0, first
    assert {c["name"]: c["status"] for c in first.json()["checks"]} == {
        "database": "pass", "database (direct)": "pass", "storage bucket": "pass", "backups bucket": "pass"}
    assert "setting it up" in first.stderr

    status = sandbox_workspace.run("sandbox.status", "--json")
    assert status.exit_code == 0, status
    report = status.json()
    assert report["running"] is True and report["demo_images"] == 300
    assert report["migrations"]["up_to_date"] is True

    stopped = sandbox_workspace.run("sandbox.down")
    assert stopped.exit_code == 0, stopped
    assert sandbox_workspace.run("sandbox.status", "--json").json()["running"] is False

    again = sandbox_workspace.run("health", "--env", "local")  # any task on local starts it again
    assert again.exit_code == 0, again
    assert "setting it up" not in again.stderr
    credentials = sandbox_workspace.state_dir / "sandbox" / "credentials.json"
    password = json.loads(credentials.read_text())["password"]
    assert password not in sandbox_workspace.everything_produced().replace(credentials.read_text(), "")


# --- the quickstart's "then try" lines: the drill and the incident playbook on the same sandbox ---------

QUICKSTART = "## Quickstart"
THEN_TRY = "<!-- quickstart-then-try:"


def then_try_commands() -> list[list[str]]:
    """The indented command lines after the marker in the README's quickstart, split as a shell would."""
    text = (REPOSITORY / "README.md").read_text()
    assert text.count(QUICKSTART) == 1
    section = text.split(QUICKSTART, 1)[1].split("\n## ", 1)[0]
    assert section.count(THEN_TRY) == 1, "the quickstart must mark its then-try lines"
    return inv_lines(section, THEN_TRY)


def sandbox_password(workspace: Opsbook) -> str:
    return json.loads((workspace.state_dir / "sandbox" / "credentials.json").read_text())["password"]


def test_the_drill_runs_end_to_end_on_the_sandbox(sandbox_workspace):
    drill_line, *_ = then_try_commands()
    assert drill_line == ["drill", "--env", "local"]
    backup = sandbox_workspace.run("backup", "--env", "local", "--json")
    assert backup.exit_code == 0, backup

    result = sandbox_workspace.run(*drill_line)  # as the README shows it: no --target
    assert result.exit_code == 0, result
    [report_file] = [path for path in (sandbox_workspace.state_dir / "drills").glob("*/report.json")
                     if path.parent.name in result.stderr]
    report = json.loads(report_file.read_text())
    assert report["passed"] is True and report["failures"] == []
    assert report["source_env"] == "local" and report["target_env"] == "local-drill"
    assert report["backup_id"] == backup.json()["backup"]["backup_id"]
    steps = {step["name"]: step for step in report["steps"]}
    assert {name: step["status"] for name, step in steps.items()} == {
        "restore": "passed", "migrations": "passed", "staging": "not applicable", "images": "passed",
        "rto": "passed", "rpo": "passed"}
    assert steps["staging"]["detail"].startswith("not applicable: no hosts")
    assert "images" in steps["images"]["detail"] and report["rto_seconds"] is not None
    assert "not applicable: no hosts" in (report_file.parent / "report.md").read_text()
    uploaded = (sandbox_workspace.state_dir / "sandbox" / "storage" / "sandbox-backups" / "local" / "drills"
                / report["id"] / "report.json")
    assert json.loads(uploaded.read_text())["passed"] is True

    # The target is a second database of the sandbox cluster, holding the restored copy; `app` is untouched.
    port = json.loads((sandbox_workspace.state_dir / "sandbox" / "sandbox.json").read_text())["port"]
    password = quote(sandbox_password(sandbox_workspace), safe="")
    for database in ("app", "app_drill"):
        with psycopg.connect(f"postgresql://postgres:{password}@127.0.0.1:{port}/{database}") as connection:
            assert connection.execute('SELECT count(*) FROM "Image"').fetchone()[0] == seed.IMAGE_COUNT
    health = sandbox_workspace.run("health", "--env", "local-drill", "--json")
    assert health.exit_code == 0 and "app_drill" in health.stdout, health

    history = sandbox_workspace.run("drill.history", "--env", "local", "--json")
    assert history.exit_code == 0 and report["id"] in [d["id"] for d in history.json()["drills"]], history
    assert sandbox_password(sandbox_workspace) not in "\n".join(sandbox_workspace.transcript)


def test_an_incident_is_recorded_published_and_resolved_on_the_sandbox(sandbox_workspace):
    _, open_line, resolve_line = then_try_commands()
    assert open_line[:3] == ["incident.open", "--env", "local"] and "--dry-run" not in open_line
    opened = sandbox_workspace.run(*open_line)
    assert opened.exit_code == 0, opened
    incident_id = re.search(r"incident (\S+) on local:", opened.stderr).group(1)
    folder = sandbox_workspace.state_dir / "incidents" / incident_id
    assert json.loads((folder / "incident.json").read_text())["state"] == "investigating"
    notices = sandbox_workspace.state_dir / "notices" / "local.md"  # the sandbox's default channel
    assert "Uploads failing" in notices.read_text() and "has no notify channels" not in opened.stderr
    triage = (folder / "triage.md").read_text()
    assert "### Database log" in triage and "database system is ready to accept connections" in triage

    assert "ID" in resolve_line
    resolved = sandbox_workspace.run(*[incident_id if word == "ID" else word for word in resolve_line])
    assert resolved.exit_code == 0, resolved
    assert json.loads((folder / "incident.json").read_text())["state"] == "resolved"
    published = notices.read_text()
    assert published.count("# Uploads failing") == 2 and "**Resolved**" in published
    listed = sandbox_workspace.run("incident.list", "--env", "local", "--open", "--json")
    assert listed.exit_code == 0 and listed.json()["incidents"] == [], listed
    produced = sandbox_workspace.everything_produced()
    credentials = (sandbox_workspace.state_dir / "sandbox" / "credentials.json").read_text()
    assert sandbox_password(sandbox_workspace) not in produced.replace(credentials, "")


def test_one_table_is_restored_and_compared_on_the_sandbox(sandbox_workspace):
    assert sandbox_workspace.run("backup", "--env", "local").exit_code == 0
    restored = sandbox_workspace.run("restore", "--env", "local", "--table", "Brand", "--into", "app_brand_check")
    assert restored.exit_code == 0 and "app_brand_check" in restored.stderr, restored
    same = sandbox_workspace.run("restore.diff", "--env", "local", "--table", "Brand", "--json")
    assert same.exit_code == 0, same
    assert same.json()["diff"]["missing"] == same.json()["diff"]["changed"] == 0 < same.json()["diff"]["same"]
