"""The incident state machine, its inputs and its store (a real inventory in a temp folder, no servers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ops import incidents, inventory
from ops.errors import CheckFailed, UsageError

NOW = datetime(2026, 11, 23, 2, 0, 30, tzinfo=UTC)


@pytest.fixture
def env(tmp_path: Path):
    file = tmp_path / "inventory.yaml"
    file.write_text("project: acme\nstate_dir: state\nenvs:\n  prod: {protected: true}\n  staging: {}\n")
    return inventory.load(file).environment("prod")


def opened(env, **overrides) -> incidents.Incident:
    arguments = {"title": "Checkout slow", "impact": "minor", "components": "api,checkout", "message": None,
                 "operator": "ann", "now": NOW, **overrides}
    return incidents.new_incident(env, **arguments)


@pytest.mark.parametrize(("text", "expected"), [
    ("30m", timedelta(minutes=30)), ("1h", timedelta(hours=1)), ("1h30m", timedelta(minutes=90)),
    ("90s", timedelta(seconds=90)), ("2d", timedelta(days=2)), (" 45 m ", timedelta(minutes=45)),
])
def test_durations(text: str, expected: timedelta) -> None:
    assert incidents.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "30", "30x", "0m", "1h and a bit"])
def test_bad_durations_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        incidents.parse_duration(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("api,uploads", {"api": "partial_outage", "uploads": "partial_outage"}),
    ("api=major_outage, uploads", {"api": "major_outage", "uploads": "partial_outage"}),
    ("api=degraded performance", {"api": "degraded_performance"}),
    ("api=Partial-Outage", {"api": "partial_outage"}),
])
def test_components(text: str, expected: dict[str, str]) -> None:
    assert incidents.parse_components(text, "partial_outage") == expected


def test_unknown_component_status_is_refused() -> None:
    with pytest.raises(UsageError, match="'down' for 'api'"):
        incidents.parse_components("api=down", "partial_outage")


def test_open_records_who_what_when(env) -> None:
    incident = opened(env, next_update="30m")
    assert incident.id.startswith("20261123T0200Z-") and len(incident.id) == 19
    assert incidents.check_id(incident.id) == incident.id
    assert (incident.env, incident.project, incident.state, incident.operator) == ("prod", "acme", "investigating",
                                                                                  "ann")
    assert incident.components == {"api": "degraded_performance", "checkout": "degraded_performance"}
    assert incident.opened_at == "2026-11-23T02:00:30Z" and incident.next_update == "2026-11-23T02:30:30Z"
    assert [entry.kind for entry in incident.timeline] == ["opened"]


@pytest.mark.parametrize(("overrides", "match"), [
    ({"title": " "}, "--title"), ({"impact": "huge"}, "--impact"), ({"components": ""}, "--components"),
])
def test_open_refuses_incomplete_input(env, overrides: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        opened(env, **overrides)


def test_the_states_move_and_resolved_is_final(env) -> None:
    incident = opened(env)
    incidents.apply_update(incident, state="identified", message="a slow query", components="checkout=major_outage",
                           next_update="15m", operator="bob", now=NOW + timedelta(minutes=5))
    assert incident.components == {"api": "degraded_performance", "checkout": "major_outage"}
    assert incident.next_update == "2026-11-23T02:20:30Z"
    incidents.apply_update(incident, state="monitoring", message=None, components=None, next_update=None,
                           operator="bob", now=NOW + timedelta(minutes=10))
    assert incident.message == "a slow query" and incident.next_update is None
    incidents.apply_update(incident, state="identified", message="the fix did not hold", components=None,
                           next_update="30m", operator="bob", now=NOW + timedelta(minutes=12))
    with pytest.raises(UsageError, match=r"incident\.resolve"):
        incidents.apply_update(incident, state="resolved", message="x", components=None, next_update=None,
                               operator="bob")
    incidents.apply_resolve(incident, message="index added", cause="missing index", postmortem=None,
                            operator="bob", now=NOW + timedelta(minutes=40))
    assert incident.state == "resolved" and not incident.open
    assert set(incident.components.values()) == {"operational"} and incident.next_update is None
    assert [e.state for e in incident.timeline] == ["investigating", "identified", "monitoring", "identified",
                                                    "resolved"]
    with pytest.raises(CheckFailed, match="resolved again") as again:
        incidents.apply_resolve(incident, message="again", cause=None, postmortem=None, operator="bob")
    assert again.value.exit_code == 3
    with pytest.raises(CheckFailed, match="cannot be updated"):
        incidents.apply_update(incident, state="monitoring", message="x", components=None, next_update=None,
                               operator="bob")
    assert len(incident.timeline) == 5


def test_times_never_go_backwards(env) -> None:
    incident = opened(env)
    skewed = NOW - timedelta(minutes=7)  # another operator's clock is behind
    entry = incidents.apply_update(incident, state="identified", message="m", components=None, next_update="30m",
                                   operator="bob", now=skewed)
    assert entry.at == incident.opened_at
    assert incident.next_update == "2026-11-23T02:30:30Z"  # counted from the entry's time, not the skewed clock
    times = [entry.at for entry in incident.timeline]
    assert times == sorted(times)


def test_store_round_trip_appends_the_timeline(env) -> None:
    store = incidents.IncidentStore(env)
    incident = opened(env)
    store.save(incident)
    incidents.apply_update(incident, state="identified", message="found it", components=None, next_update="30m",
                           operator="bob", now=NOW + timedelta(minutes=1))
    store.save(incident)
    folder = env.inventory.state_dir / "incidents" / incident.id
    lines = (folder / "timeline.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["opened", "update"]
    loaded = store.load(incident.id)
    assert loaded.state == "identified" and [e.kind for e in loaded.timeline] == ["opened", "update"]
    assert loaded.record() == incident.record()
    assert [i.id for i in store.list()] == [incident.id]
    incidents.apply_resolve(loaded, message="done", cause=None, postmortem=None, operator="bob")
    store.save(loaded)
    assert store.list(open_only=True) == [] and len(store.list()) == 1


def test_unknown_or_foreign_incidents_are_usage_errors(env) -> None:
    store = incidents.IncidentStore(env)
    with pytest.raises(UsageError, match="no incident"):
        store.load("20261123T0200Z-abcd")
    with pytest.raises(UsageError, match="not an incident id"):
        store.load("../../etc")
    incident = opened(env)
    store.save(incident)
    staging = env.inventory.environment("staging")
    with pytest.raises(UsageError, match="belongs to prod"):
        incidents.IncidentStore(staging).load(incident.id)


# --- rollback: when is a restore safe? (journal + a real local bucket) ------------------------------


@pytest.fixture
def bucketed(tmp_path: Path):
    file = tmp_path / "inventory.yaml"
    file.write_text("project: acme\nstate_dir: state\nenvs:\n  prod:\n"
                    "    backups: {provider: local, path: buckets, bucket: backups, prefix: prod/}\n")
    env = inventory.load(file).environment("prod")
    from ops.storage import open_storage

    storage = open_storage(env.storage_config("backups"))
    storage.create_bucket()
    return env, storage


def _backup(storage, backup_id: str, started_at: str) -> None:
    from ops.backup_manifest import write_manifest
    from tests.fixtures.manifests import manifest

    write_manifest(storage, manifest(backup_id, started_at=started_at))


def _migrate_run(env, run_id: str, status: str, backup_id: str | None) -> None:
    from ops.journal import Journal

    journal = Journal(env.inventory.state_dir / "runs", run_id)
    journal.write("run", run_id=run_id, runbook="migrate", env="prod", dry_run=False)
    if backup_id:
        journal.step(3, "manifest", "applied", outputs={"backup_id": backup_id})
        journal.step(3, "manifest", "verified")
    journal.step(4, "deploy", "failed" if status == "failed" else "verified")
    journal.write("finished", status=status, exit_code=1 if status == "failed" else 0)


def test_a_restore_is_offered_only_to_undo_a_failed_migration_with_no_newer_backup(bucketed) -> None:
    from runbooks.incident import restore_safety

    env, storage = bucketed
    assert "no migrate run" in restore_safety(env).reason
    _backup(storage, "20261123T010000Z-aaaa", "2026-11-23T01:00:00Z")
    _migrate_run(env, "20261123T010000Z-0001", "succeeded", "20261123T010000Z-aaaa")
    assert not restore_safety(env).safe and "succeeded" in restore_safety(env).reason

    _backup(storage, "20261123T020000Z-bbbb", "2026-11-23T02:00:00Z")
    _migrate_run(env, "20261123T020000Z-0002", "failed", "20261123T020000Z-bbbb")
    safety = restore_safety(env)
    assert safety.safe and safety.backup_id == "20261123T020000Z-bbbb", safety.reason

    _backup(storage, "20261123T030000Z-cccc", "2026-11-23T03:00:00Z")  # the nightly ran after it
    safety = restore_safety(env)
    assert not safety.safe and "20261123T030000Z-cccc is newer" in safety.reason

    _migrate_run(env, "20261123T040000Z-0003", "failed", None)
    assert "no complete pre-migration backup" in restore_safety(env).reason


def test_rollback_refuses_an_unsafe_restore(bucketed) -> None:
    from runbooks.incident import build

    env, _ = bucketed
    with pytest.raises(CheckFailed, match="not safe") as refused:
        build(env, incident="20261123T0200Z-abcd", restore=True)
    assert refused.value.exit_code == 3
