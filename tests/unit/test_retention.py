"""The retention planner: grandfather-father-son buckets, the floor, keep flags, failing backups."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from ops.backup_manifest import IncompleteBackup
from ops.retention import (
    BackupInfo,
    RetentionPolicy,
    id_time,
    incomplete_is_stale,
    plan_retention,
    upload_is_stale,
)
from ops.storage import IncompleteUpload

NOTHING = {"keep_last": 0, "daily": 0, "weekly": 0, "monthly": 0, "min_keep": 0}


def at(text: str) -> datetime:
    """`2026-11-21T02:00` (UTC) or with an explicit offset."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def backup(when: str, *, keep: bool = False, verified: str | None = None, name: str | None = None) -> BackupInfo:
    return BackupInfo(id=name or when, finished_at=at(when), size=1024, keep=keep,
                      verified_at=at(verified) if verified else None)


@dataclass
class Case:
    name: str
    backups: list[BackupInfo]
    policy: dict[str, int]
    now: str
    expected: dict[str, tuple[str, ...]]  # id -> reasons; "delete" when it goes
    force: bool = False
    refused: bool = False


CASES = [
    Case("empty list", [], {}, "2026-11-23T03:00", {}),
    Case("single backup is kept by every rule",
         [backup("2026-11-23T02:00")], {}, "2026-11-23T03:00",
         {"2026-11-23T02:00": ("keep_last 1/7", "daily 2026-11-23", "weekly 2026-W48", "monthly 2026-11")}),
    Case("single backup and no rule at all: the floor keeps it",
         [backup("2026-11-23T02:00")], {**NOTHING, "min_keep": 1}, "2026-11-23T03:00",
         {"2026-11-23T02:00": ("min_keep floor",)}),
    Case("single backup and no rule, no floor: it goes",
         [backup("2026-11-23T02:00")], NOTHING, "2026-11-23T03:00",
         {"2026-11-23T02:00": ("delete",)}),
    Case("keep_last counts the newest",
         [backup(f"2026-11-2{day}T02:00") for day in range(1, 5)], {**NOTHING, "keep_last": 2}, "2026-11-24T03:00",
         {"2026-11-24T02:00": ("keep_last 1/2",), "2026-11-23T02:00": ("keep_last 2/2",),
          "2026-11-22T02:00": ("delete",), "2026-11-21T02:00": ("delete",)}),
    Case("daily keeps the newest of each day, among days that have a backup",
         [backup("2026-11-23T13:00"), backup("2026-11-23T01:00"), backup("2026-11-20T02:00"),
          backup("2026-11-19T23:59"), backup("2026-11-19T00:01")],
         {**NOTHING, "daily": 2}, "2026-11-23T14:00",
         {"2026-11-23T13:00": ("daily 2026-11-23",), "2026-11-23T01:00": ("delete",),
          "2026-11-20T02:00": ("daily 2026-11-20",), "2026-11-19T23:59": ("delete",),
          "2026-11-19T00:01": ("delete",)}),
    Case("days are UTC days: 01:00+02:00 belongs to the day before",
         [backup("2026-11-23T01:00+02:00", name="late"), backup("2026-11-22T20:00", name="evening")],
         {**NOTHING, "daily": 2}, "2026-11-23T03:00",
         {"late": ("daily 2026-11-22",), "evening": ("delete",)}),
    Case("ISO weeks across the new year (2026 has a week 53)",
         [backup("2027-01-04T02:00"), backup("2027-01-03T02:00"), backup("2026-12-31T02:00"),
          backup("2026-12-28T02:00"), backup("2026-12-27T02:00"), backup("2026-12-21T02:00")],
         {**NOTHING, "weekly": 3}, "2027-01-04T03:00",
         {"2027-01-04T02:00": ("weekly 2027-W01",), "2027-01-03T02:00": ("weekly 2026-W53",),
          "2026-12-31T02:00": ("delete",), "2026-12-28T02:00": ("delete",),
          "2026-12-27T02:00": ("weekly 2026-W52",), "2026-12-21T02:00": ("delete",)}),
    Case("months across the year boundary, in UTC",
         [backup("2027-01-01T00:30+01:00", name="new-year-eve-utc"), backup("2026-12-15T02:00"),
          backup("2026-11-30T23:30"), backup("2026-11-01T00:00"), backup("2026-10-31T23:59")],
         {**NOTHING, "monthly": 2}, "2026-12-31T23:45",
         {"new-year-eve-utc": ("monthly 2026-12",), "2026-12-15T02:00": ("delete",),
          "2026-11-30T23:30": ("monthly 2026-11",), "2026-11-01T00:00": ("delete",),
          "2026-10-31T23:59": ("delete",)}),
    Case("a keep-flagged backup stays whatever its age",
         [backup("2026-11-23T02:00"), backup("2025-01-01T02:00", keep=True), backup("2024-06-01T02:00")],
         {**NOTHING, "keep_last": 1}, "2026-11-23T03:00",
         {"2026-11-23T02:00": ("keep_last 1/1",), "2025-01-01T02:00": ("keep flag",),
          "2024-06-01T02:00": ("delete",)}),
    Case("only the newest verified backup is protected",
         [backup("2026-11-23T02:00"), backup("2026-11-22T02:00"),
          backup("2026-10-01T02:00", verified="2026-10-02T08:00"),
          backup("2026-09-01T02:00", verified="2026-11-20T08:00")],
         {**NOTHING, "keep_last": 1}, "2026-11-23T03:00",
         {"2026-11-23T02:00": ("keep_last 1/1",), "2026-11-22T02:00": ("delete",),
          "2026-10-01T02:00": ("newest verified",), "2026-09-01T02:00": ("delete",)}),
    Case("the floor keeps the newest of those otherwise going",
         [backup(f"2026-11-2{day}T02:00") for day in range(1, 6)], {**NOTHING, "keep_last": 1, "min_keep": 3},
         "2026-11-25T03:00",
         {"2026-11-25T02:00": ("keep_last 1/1",), "2026-11-24T02:00": ("min_keep floor",),
          "2026-11-23T02:00": ("min_keep floor",), "2026-11-22T02:00": ("delete",),
          "2026-11-21T02:00": ("delete",)}),
    Case("keep-flagged backups count toward the floor",
         [backup("2026-11-23T02:00"), backup("2026-11-22T02:00"), backup("2026-11-21T02:00"),
          backup("2026-01-01T02:00", keep=True)], {**NOTHING, "keep_last": 1, "min_keep": 3}, "2026-11-23T03:00",
         {"2026-11-23T02:00": ("keep_last 1/1",), "2026-11-22T02:00": ("min_keep floor",),
          "2026-11-21T02:00": ("delete",), "2026-01-01T02:00": ("keep flag",)}),
    Case("failing backups: nothing is deleted",
         [backup("2026-11-20T02:00"), backup("2026-11-19T02:00"), backup("2026-11-18T02:00")],
         {**NOTHING, "keep_last": 1}, "2026-11-23T03:00",
         {"2026-11-20T02:00": ("keep_last 1/1",), "2026-11-19T02:00": ("held",), "2026-11-18T02:00": ("held",)},
         refused=True),
    Case("failing backups with force: the rules apply",
         [backup("2026-11-20T02:00"), backup("2026-11-19T02:00"), backup("2026-11-18T02:00")],
         {**NOTHING, "keep_last": 1}, "2026-11-23T03:00",
         {"2026-11-20T02:00": ("keep_last 1/1",), "2026-11-19T02:00": ("delete",),
          "2026-11-18T02:00": ("delete",)}, force=True, refused=True),
    Case("max age is twice the schedule: 47 h old is still fine",
         [backup("2026-11-21T04:00"), backup("2026-11-20T02:00")], {**NOTHING, "keep_last": 1},
         "2026-11-23T03:00", {"2026-11-21T04:00": ("keep_last 1/1",), "2026-11-20T02:00": ("delete",)}),
    Case("a shorter schedule shortens the max age",
         [backup("2026-11-22T02:00"), backup("2026-11-21T02:00")],
         {**NOTHING, "keep_last": 1, "schedule_hours": 6}, "2026-11-22T15:00",
         {"2026-11-22T02:00": ("keep_last 1/1",), "2026-11-21T02:00": ("held",)}, refused=True),
    Case("an explicit max_age_hours wins over the schedule",
         [backup("2026-11-20T02:00"), backup("2026-11-19T02:00")],
         {**NOTHING, "keep_last": 1, "max_age_hours": 96}, "2026-11-23T03:00",
         {"2026-11-20T02:00": ("keep_last 1/1",), "2026-11-19T02:00": ("delete",)}),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_plan(case: Case) -> None:
    shuffled = list(case.backups)
    random.Random(7).shuffle(shuffled)  # input order must not matter
    plan = plan_retention(shuffled, RetentionPolicy(**case.policy), at(case.now), force=case.force)
    got = {d.backup.id: (d.action,) if d.action in ("delete", "held") else d.reasons for d in plan.decisions}
    assert got == case.expected
    assert [d.backup.finished_at for d in plan.decisions] == sorted(
        (b.finished_at for b in case.backups), reverse=True)
    assert (plan.refused is not None) == case.refused
    assert plan.forced == (case.refused and case.force)
    if plan.refused and not case.force:
        assert plan.deletions == []
        assert "backups look like they are failing" in plan.refused
    for decision in plan.decisions:
        if decision.action == "delete":
            assert decision.reasons == ("outside every retention rule",)


def test_refusal_names_the_newest_backup_and_its_age() -> None:
    plan = plan_retention([backup("2026-11-20T03:00", name="20261120T020000Z-ab12")], RetentionPolicy(),
                          at("2026-11-23T03:00"))
    assert plan.refused is not None
    assert "20261120T020000Z-ab12" in plan.refused and "72.0 h ago" in plan.refused
    assert "max_age_hours 48" in plan.refused


def test_json_lists_every_decision_with_its_reasons() -> None:
    plan = plan_retention([backup("2026-11-23T02:00"), backup("2026-11-22T02:00")],
                          RetentionPolicy(**{**NOTHING, "keep_last": 1}), at("2026-11-23T03:00"))
    data = plan.to_json()
    assert data["delete"] == ["2026-11-22T02:00"] and data["keep"] == ["2026-11-23T02:00"]
    assert data["decisions"][0]["reasons"] == ["keep_last 1/1"]
    assert data["decisions"][1]["decision"] == "delete"
    assert "keep_last 1/1" in plan.decisions[0].line() and plan.decisions[1].line().startswith("delete")


@pytest.mark.parametrize("seed", range(30))
def test_invariants_hold_on_random_histories(seed: int) -> None:
    """Whatever the history: keep flags and the newest verified stay, the floor holds, deletions have no reason."""
    rng = random.Random(seed)
    now = at("2026-11-23T03:00")
    backups = []
    moment = now - timedelta(hours=rng.uniform(0, 40))
    for index in range(rng.randint(0, 60)):
        verified = moment + timedelta(hours=1) if rng.random() < 0.1 else None
        backups.append(BackupInfo(f"b{index:03d}", moment, keep=rng.random() < 0.05, verified_at=verified))
        moment -= timedelta(hours=rng.choice([1, 6, 24, 24, 24, 72, 24 * 20]))
    policy = RetentionPolicy(keep_last=rng.randint(0, 5), daily=rng.randint(0, 8), weekly=rng.randint(0, 5),
                             monthly=rng.randint(0, 7), min_keep=rng.randint(0, 6))
    plan = plan_retention(backups, policy, now)
    kept = {d.backup.id for d in plan.kept}
    assert plan.refused is None
    assert {b.id for b in backups if b.keep} <= kept
    verified = [b for b in backups if b.verified_at]
    if verified:
        assert max(verified, key=lambda b: b.finished_at).id in kept
    assert len(kept) >= min(policy.min_keep, len(backups))
    assert all(d.reasons for d in plan.kept)
    if backups and policy.keep_last:
        assert backups[0].id in kept


@pytest.mark.parametrize(
    ("backup_id", "newest_modified", "stale"),
    [
        ("20261121T020000Z-7f3a", "2026-11-21T02:30", True),
        ("20261121T020000Z-7f3a", "2026-11-22T04:00", False),  # written to within the day: in progress
        ("20261122T040000Z-7f3a", "2026-11-22T04:10", False),
        ("not-a-timestamp", "2026-11-21T02:30", True),
        ("not-a-timestamp", "2026-11-22T03:30", False),
    ],
)
def test_incomplete_backups_go_after_a_day(backup_id: str, newest_modified: str, stale: bool) -> None:
    incomplete = IncompleteBackup(backup_id, [f"backups/{backup_id}/dump.pgc.zst"], at(newest_modified))
    assert incomplete_is_stale(incomplete, at("2026-11-23T03:00")) is stale


def test_dangling_uploads_go_after_a_day() -> None:
    now = at("2026-11-23T03:00")
    assert upload_is_stale(IncompleteUpload("backups/x/dump.pgc.zst", "u1", now - timedelta(hours=25)), now)
    assert not upload_is_stale(IncompleteUpload("backups/x/dump.pgc.zst", "u2", now - timedelta(hours=23)), now)


def test_id_time() -> None:
    assert id_time("20261123T020000Z-7f3a") == at("2026-11-23T02:00")
    assert id_time("nightly") is None


def test_a_locked_backup_is_held_until_its_lock_ends_then_deleted():
    old = BackupInfo(id="old", finished_at=at("2026-11-01T02:00"), locked_until=at("2026-12-01T02:00"))
    new = BackupInfo(id="new", finished_at=at("2026-11-20T02:00"))
    policy = RetentionPolicy(keep_last=1, daily=1, weekly=1, monthly=1, min_keep=1, max_age_hours=1e6)
    held = plan_retention([old, new], policy, at("2026-11-20T03:00"))
    assert [(d.backup.id, d.action) for d in held.decisions] == [("new", "keep"), ("old", "held")]
    assert held.deletions == [] and "held until 2026-12-01T02:00:00Z by the object lock" in held.decisions[1].line()
    later = plan_retention([old, new], policy, at("2026-12-01T02:01"))
    assert [d.backup.id for d in later.deletions] == ["old"]
