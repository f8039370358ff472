"""The incident playbook through the real CLI: open → update twice → resolve, against real PostgreSQL,
moto S3, an sshd app host, a webhook receiver and an SMTP server — checking what they actually received."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.cli import Opsbook
from tests.fixtures.notify import SMTP_PASSWORD, SMTP_USER

PLANTED_LOG_KEY = "sk_live_incident_5f4e3d2c1b0a9988"
PLANTED_AUTH_SECRET = "auth-secret-planted-in-env-file-0123456789"
PLANTED_LOG_PASSWORD = "log-db-password-77aa66bb"
NEXT_UPDATE = re.compile(r"Next update by (\d{4}-\d\d-\d\d \d\d:\d\d) UTC")


@pytest.fixture
def shop(opsbook: Opsbook, postgres_server: Any, s3_server: Any, app_host_factory: Any, webhook_receiver: Any,
         smtp_server: Any) -> dict[str, Any]:
    """A `prod` environment with one app host whose env file and log hold secrets, and four channels."""
    (host,) = app_host_factory(("web1",))
    database_url = postgres_server.create_database()
    assets, backups = s3_server.make_bucket(), s3_server.make_bucket()
    host.env_file.write_text(f"DATABASE_URL={database_url.reveal()}\nAUTH_SECRET={PLANTED_AUTH_SECRET}\n"
                             f"STRIPE_SECRET_KEY={PLANTED_LOG_KEY}\n")
    subprocess.run(host.restart_command, shell=True, check=True, capture_output=True, timeout=60)
    with open(host.app_dir / "app.log", "a") as log:  # what a careless app prints
        log.write(f"upload failed with key {PLANTED_LOG_KEY}\nretrying postgresql://shop:{PLANTED_LOG_PASSWORD}"
                  f"@db.internal/shop\nAUTH_SECRET={PLANTED_AUTH_SECRET}\n")
    for release in ("r1", "r2"):  # the bad release r2 is live: rollback goes back to r1
        (host.app_dir / "releases" / release).mkdir(parents=True)
    (host.app_dir / "current").symlink_to("releases/r2")
    webhook_url = webhook_receiver.url()
    opsbook.environ.update({"DATABASE_URL": database_url.reveal(), "SLACK_WEBHOOK_URL": webhook_url,
                            "S3_SECRET": s3_server.secret_access_key.reveal(), "SMTP_PASSWORD": SMTP_PASSWORD})
    opsbook.write_inventory({"project": "shop", "default_env": "prod", "envs": {"prod": {
        "protected": True,
        "database": {"url": "${env:DATABASE_URL}"},
        "storage": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": assets.bucket, "access_key_id": s3_server.access_key_id,
                    "secret_access_key": "${env:S3_SECRET}"},
        "backups": {"bucket": backups.bucket, "prefix": "prod/"},
        "ssh": {"user": host.host.user, "port": host.host.port, "key_file": host.host.key_filename},
        "hosts": [{"name": "web1", "address": "127.0.0.1"}],
        "app": {"dir": str(host.app_dir), "restart": host.restart_command, "env_file": str(host.env_file),
                "health_url": host.health_url, "ready_url": host.ready_url,
                "log_command": host.log_command},
        "notify": [
            {"kind": "webhook", "url": "${env:SLACK_WEBHOOK_URL}", "timeout": 5, "retries": 1},
            {"kind": "smtp", "host": "127.0.0.1", "port": smtp_server.port, "from": "ops@shop.example",
             "to": ["oncall@shop.example"], "username": SMTP_USER, "password": "${env:SMTP_PASSWORD}"},
            {"kind": "file", "path": "status.md", "audience": "public"},
        ],
        "incidents": {"log_lines": 20},
    }}})
    secrets = [PLANTED_LOG_KEY, PLANTED_AUTH_SECRET, PLANTED_LOG_PASSWORD, postgres_server.password.reveal(),
               s3_server.secret_access_key.reveal(), SMTP_PASSWORD, webhook_url.rsplit("/", 1)[-1]]
    return {"backups": backups, "secrets": secrets, "app_dir": host.app_dir,
            "webhook_path": webhook_url.split(str(webhook_receiver.port))[1]}


def ok(result: Any) -> Any:
    assert result.exit_code == 0, str(result)
    return result


def test_open_update_twice_resolve_reaches_every_channel_with_no_secret(opsbook, shop, webhook_receiver,
                                                                         smtp_server, s3_server):
    webhook_receiver.fail_next = 1  # the first POST fails: the retry delivers it
    opened = ok(opsbook.run("incident.open", "--title", "Uploads failing", "--impact", "major",
                            "--components", "uploads,api=degraded_performance",
                            "--message", "Image uploads return errors", "--json"))
    incident_id = opened.json()["incident"]["id"]
    assert re.fullmatch(r"\d{8}T\d{4}Z-[0-9a-f]{4}", incident_id)
    assert "All probes passed." in opened.stderr and "upload failed with key ***" in opened.stderr, opened.stderr
    assert len(webhook_receiver.requests) == 2 and len(webhook_receiver.delivered()) == 1

    before = (len(webhook_receiver.requests), len(smtp_server.messages))
    preview = ok(opsbook.run("incident.update", incident_id, "--status", "identified", "--dry-run",
                             "--message", "Storage key expired"))
    assert "Identified: Uploads failing" in preview.stderr and "dry run: nothing recorded" in preview.stderr
    assert (len(webhook_receiver.requests), len(smtp_server.messages)) == before

    ok(opsbook.run("incident.update", incident_id, "--status", "identified", "--message", "Storage key expired",
                   "--next-update", "45m", "--components", "uploads=major_outage"))
    planned = ok(opsbook.run("incident.rollback", incident_id, "--dry-run"))
    assert f"record the rollback in incident {incident_id}'s timeline: would add the rollback" in planned.stderr
    assert [e["kind"] for e in _timeline(opsbook, incident_id)][-1] == "notice"  # a dry run records nothing
    rollback = ok(opsbook.run("incident.rollback", incident_id, "--confirm", "prod"))
    assert "restore of a backup: not offered — no migrate run of prod" in rollback.stderr
    assert (shop["app_dir"] / "current").readlink().name == "r1"
    webhook_receiver.fail_next = 100  # the webhook is down for the whole second update
    monitoring = opsbook.run("incident.update", incident_id, "--status", "monitoring", "--message",
                             "New key deployed", "--next-update", "1h")
    assert monitoring.exit_code == 1, str(monitoring)
    assert "1 channel(s) did not get the notice: notify[0] webhook (http://127.0.0.1:" in monitoring.stderr
    assert "HTTP 503" in monitoring.stderr
    webhook_receiver.fail_next = 0
    ok(opsbook.run("incident.resolve", incident_id, "--message", "Uploads work again", "--cause",
                   "an expired storage key", "--postmortem", "https://wiki.shop.example/pm/7"))
    again = opsbook.run("incident.resolve", incident_id, "--message", "twice")
    assert again.exit_code == 3 and "already" not in again.stdout and "resolved at" in again.stderr

    # the webhook got the Slack-compatible payloads of the three updates it was up for
    payloads = webhook_receiver.payloads()
    assert [p["blocks"][0]["text"]["text"] for p in payloads] == [
        "Investigating: Uploads failing", "Identified: Uploads failing", "Resolved: Uploads failing"]
    assert all(r.path == shop["webhook_path"] for r in webhook_receiver.requests)
    assert all(r.headers["Content-Type"] == "application/json" for r in webhook_receiver.requests)
    first = json.dumps(payloads[0])
    assert incident_id in first and "triage of prod" in first  # internal audience by default
    assert "uploads (Partial outage), api (Degraded performance)" in first
    assert "uploads (Major outage)" in json.dumps(payloads[1])
    assert "an expired storage key" in json.dumps(payloads[2])

    # the SMTP server got all four emails, after a login with the configured account
    subjects = [message["Subject"] for message in smtp_server.messages]
    assert subjects == [f"[{state}] Uploads failing (prod, {incident_id})"
                        for state in ("Investigating", "Identified", "Monitoring", "Resolved")]
    assert smtp_server.logins == [SMTP_USER] * 4
    assert {message["To"] for message in smtp_server.messages} == {"oncall@shop.example"}
    bodies = [message.get_content() for message in smtp_server.messages]
    assert "Postmortem: https://wiki.shop.example/pm/7" in bodies[3]
    identified = next(entry for entry in _timeline(opsbook, incident_id)
                      if entry["kind"] == "update" and entry.get("state") == "identified")
    identified_at = datetime.fromisoformat(identified["at"].replace("Z", "+00:00"))
    expected_next = (identified_at + timedelta(minutes=45)).astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    assert NEXT_UPDATE.search(bodies[1])[1] == expected_next

    # the public status file: customer wording only
    status = (opsbook.root / "status.md").read_text()
    assert status.count("# Uploads failing") == 4 and incident_id not in status and "triage" not in status

    # the timeline: every event in order, times never going backwards, the failed delivery recorded
    timeline = _timeline(opsbook, incident_id)
    assert [(e["kind"], e.get("state")) for e in timeline] == [
        ("opened", "investigating"), ("triage", "investigating"), ("notice", "investigating"),
        ("update", "identified"), ("notice", "identified"), ("rollback", "identified"),
        ("update", "monitoring"), ("notice", "monitoring"),
        ("resolved", "resolved"), ("notice", "resolved")]
    assert [e["at"] for e in timeline] == sorted(e["at"] for e in timeline)
    assert timeline[5]["detail"]["status"] == "succeeded" and timeline[5]["detail"]["run_id"]
    failed = [d for d in timeline[7]["detail"]["deliveries"] if not d["ok"]]
    assert [d["kind"] for d in failed] == ["webhook"] and failed[0]["attempts"] == 2
    shown = ok(opsbook.run("incident.show", incident_id))
    assert "FAILED" in shown.stderr and "cause: an expired storage key" in shown.stderr

    # the bucket holds the same record
    client = s3_server.client()
    stored = client.get_object(Bucket=shop["backups"].bucket, Key=f"prod/incidents/{incident_id}/timeline.jsonl")
    assert stored["Body"].read().decode().splitlines() == (
        opsbook.state_dir / "incidents" / incident_id / "timeline.jsonl").read_text().splitlines()
    bucket_text = "".join(client.get_object(Bucket=shop["backups"].bucket, Key=item["Key"])["Body"].read().decode()
                          for item in client.list_objects_v2(Bucket=shop["backups"].bucket)["Contents"])

    # no secret anywhere: what the receivers got, every output, every file, the bucket
    received = "".join(r.body.decode() for r in webhook_receiver.requests) + smtp_server.raw()
    everything = received + opsbook.everything_produced() + status + bucket_text
    assert [secret for secret in shop["secrets"] if secret in everything] == []


def _timeline(opsbook: Opsbook, incident_id: str) -> list[dict[str, Any]]:
    path = opsbook.state_dir / "incidents" / incident_id / "timeline.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_notify_failure_tells_internal_channels_and_never_raises(tmp_path, webhook_receiver, smtp_server, capsys):
    from ops import inventory
    from ops.notify import notify_failure, send

    file = tmp_path / "inventory.yaml"
    file.write_text(json.dumps({"project": "shop", "envs": {"prod": {"notify": [
        {"kind": "webhook", "url": webhook_receiver.url(), "retries": 3},
        {"kind": "smtp", "host": "127.0.0.1", "port": smtp_server.port, "to": ["oncall@shop.example"]},
        {"kind": "webhook", "url": "${env:OPSBOOK_TEST_UNSET_HOOK}"},
        {"kind": "file", "path": "status.md", "audience": "public"},
    ]}}}))
    env = inventory.load(file).environment("prod")
    notify_failure(env, "backup failed on prod", "run 20261123T020000Z-7f3a: pg_dump exited with 1")
    (payload,) = webhook_receiver.payloads()
    assert payload["text"].startswith("backup failed on prod") and payload["blocks"][0]["type"] == "header"
    (message,) = smtp_server.messages
    assert message["Subject"] == "backup failed on prod" and "pg_dump exited with 1" in message.get_content()
    warning = capsys.readouterr().err
    assert "notify[2] webhook was not told: " in warning and "OPSBOOK_TEST_UNSET_HOOK" in warning
    assert not (tmp_path / "status.md").exists()  # a public channel gets no internal failure message

    webhook_receiver.reset()
    webhook_receiver.fail_next, webhook_receiver.status_on_failure = 5, 404  # a deleted hook: retrying is useless
    (delivery, *_) = send(env, [])
    assert not delivery.ok and "no webhook notice" in delivery.detail
    from ops.notify import plain_notices

    (delivery, *_) = send(env, plain_notices("s", "b"))
    assert not delivery.ok and "HTTP 404" in delivery.detail and delivery.attempts == 1
    assert len(webhook_receiver.requests) == 1


def test_incidents_lock_only_the_incident_so_they_run_while_another_run_holds_the_environment(opsbook):
    from ops.locks import file_lock

    opsbook.write_inventory({"project": "calm", "default_env": "prod", "envs": {"prod": {
        "protected": True, "notify": [{"kind": "file", "path": "status.md", "audience": "public"}]}}})
    locks = opsbook.state_dir / "locks"
    with file_lock(locks / "prod.environment.lock", {"run_id": "20261201T000000Z-0000", "runbook": "backup"}):
        opened = ok(opsbook.run("incident.open", "--title", "Checkout slow", "--impact", "minor",
                                "--components", "checkout", "--no-triage", "--json"))
        incident_id = opened.json()["incident"]["id"]
        assert opened.json()["failed_channels"] == [] and opened.json()["runbook"] == "incident.open"
        ok(opsbook.run("incident.update", incident_id, "--status", "identified", "--message", "An index is missing"))
        with file_lock(locks / f"prod.incident-{incident_id}.lock", {"run_id": "20261201T000001Z-0001",
                                                                      "runbook": "incident.update"}):
            held = opsbook.run("incident.resolve", incident_id, "--message", "Index added")
            assert held.exit_code == 75 and "20261201T000001Z-0001 (incident.update)" in held.stderr, str(held)
        ok(opsbook.run("incident.resolve", incident_id, "--message", "Index added"))
    status = (opsbook.root / "status.md").read_text()
    assert status.count("# Checkout slow") == 3 and "**Resolved**" in status


def test_a_broken_template_fails_the_dry_run_and_the_real_run_still_records_the_incident(opsbook):
    broken = opsbook.root / "templates" / "incident" / "investigating"
    broken.mkdir(parents=True)
    (broken / "status_page.public.md.j2").write_text("{{ incident.nosuch_field }}\n")
    opsbook.write_inventory({"project": "calm", "default_env": "prod", "envs": {"prod": {
        "incidents": {"templates_dir": "templates"},
        "notify": [{"kind": "file", "path": "status.md", "audience": "public"}]}}})
    opening = ["incident.open", "--title", "Checkout slow", "--impact", "minor", "--components", "checkout",
               "--no-triage"]
    dry = opsbook.run(*opening, "--dry-run")
    assert dry.exit_code == 2 and "nosuch_field" in dry.stderr, str(dry)
    assert not (opsbook.state_dir / "incidents").exists()
    real = opsbook.run(*opening)
    assert real.exit_code == 2 and "nosuch_field" in real.stderr, str(real)
    (folder,) = (opsbook.state_dir / "incidents").iterdir()
    timeline = [json.loads(line) for line in (folder / "timeline.jsonl").read_text().splitlines()]
    assert [(e["kind"], e.get("message")) for e in timeline] == [
        ("opened", "We are investigating reports of this problem."), ("notice", "no notice sent: a template failed")]
    assert not (opsbook.root / "status.md").exists()


def _last_run(opsbook: Opsbook, runbook: str) -> str:
    (run,) = [run for run in ok(opsbook.run("runs.list", "--json")).json()["runs"] if run["runbook"] == runbook][:1]
    return run["run_id"]


def test_a_failed_incident_run_resumes_sending_only_to_the_channels_that_did_not_get_the_notice(opsbook,
                                                                                                 webhook_receiver):
    opsbook.environ["HOOK_URL"] = webhook_receiver.url()
    opsbook.write_inventory({"project": "calm", "default_env": "prod", "envs": {"prod": {"notify": [
        {"kind": "webhook", "url": "${env:HOOK_URL}", "timeout": 5, "retries": 1},
        {"kind": "file", "path": "status.md", "audience": "public"}]}}})
    webhook_receiver.fail_next = 100  # the webhook is down for the whole run
    opened = opsbook.run("incident.open", "--title", "Checkout slow", "--impact", "minor", "--components",
                         "checkout", "--no-triage", "--json")
    assert opened.exit_code == 1 and "did not get the notice: notify[0] webhook" in opened.stderr, str(opened)
    incident_id = opened.json()["incident"]["id"]
    run_id = _last_run(opsbook, "incident.open")
    assert ok(opsbook.run("runs.show", run_id, "--json")).json()["status"] == "failed"
    assert (opsbook.root / "status.md").read_text().count("# Checkout slow") == 1

    webhook_receiver.reset()  # the webhook is back
    preview = ok(opsbook.run("runbook.show", "incident.open"))
    assert "send the notices" in preview.stdout
    resumed = ok(opsbook.run("runs.resume", run_id))
    assert f"resuming run {run_id} (incident.open" in resumed.stderr
    assert "channel(s) that did not get them: 1 channel(s)" in resumed.stderr, resumed.stderr
    assert [p["blocks"][0]["text"]["text"] for p in webhook_receiver.payloads()] == ["Investigating: Checkout slow"]
    assert (opsbook.root / "status.md").read_text().count("# Checkout slow") == 1  # the file had it: not again
    notices = [entry for entry in _timeline(opsbook, incident_id) if entry["kind"] == "notice"]
    assert [[(d["kind"], d["ok"]) for d in e["detail"]["deliveries"]] for e in notices] == [
        [("webhook", False), ("file", True)], [("webhook", True)]]
    again = ok(opsbook.run("runs.resume", run_id))  # nothing is left to send
    assert len(webhook_receiver.requests) == 1, again.stderr


def test_a_broken_template_run_resumes_once_the_template_is_fixed(opsbook):
    broken = opsbook.root / "templates" / "incident" / "investigating" / "status_page.public.md.j2"
    broken.parent.mkdir(parents=True)
    broken.write_text("{{ incident.nosuch_field }}\n")
    opsbook.write_inventory({"project": "calm", "default_env": "prod", "envs": {"prod": {
        "incidents": {"templates_dir": "templates"},
        "notify": [{"kind": "file", "path": "status.md", "audience": "public"}]}}})
    real = opsbook.run("incident.open", "--title", "Checkout slow", "--impact", "minor", "--components", "checkout",
                       "--no-triage")
    assert real.exit_code == 2 and "nosuch_field" in real.stderr, str(real)
    run_id = _last_run(opsbook, "incident.open")
    still = opsbook.run("runs.resume", run_id)
    assert still.exit_code == 2 and "nosuch_field" in still.stderr, str(still)
    broken.unlink()
    ok(opsbook.run("runs.resume", run_id))
    assert (opsbook.root / "status.md").read_text().count("# Checkout slow") == 1
