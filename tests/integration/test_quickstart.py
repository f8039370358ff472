"""The README's main job on the embedded default: the sandbox starts itself and answers."""

from __future__ import annotations

import json


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
