"""backup.check's facts and verdict: is there a fresh, recently verified backup of the right database?

It reads only the backup bucket (the layout in ops/backup_manifest.py): the manifests say which
backups exist, of which database, finished when; each backup's verification.json (written by
backup.verify) says when it last passed a verification. No database connection is needed, so a
machine other than the one that makes the backups can watch them.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ops import pg_url
from ops.backup_manifest import (
    Manifest,
    last_verification,
    list_backups,
    read_verifications,
    verified_ids,
)
from ops.clock import iso_z, parse_time_or_none
from ops.errors import OpsError
from ops.lazy_dataclasses import dataclass
from ops.metrics import MetricFamily
from ops.retention import policy_for

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.storage import Storage

DEFAULT_VERIFY_MAX_AGE_DAYS = 8.0  # a weekly backup.verify, and a day's grace
READERS = 8


@dataclass
class Facts:
    """What the bucket holds: the newest complete backup, and the newest verification that passed."""

    newest: Manifest | None
    verified: dict[str, Any] | None  # {"id", "at", "kind"} of the newest passed verification
    count: int


@dataclass
class Limits:
    """How old the newest backup and its last verification may be, for one environment."""

    max_age: timedelta
    verify_max_age: timedelta
    database: str | None  # the inventory's database name; None: no database in the inventory
    env: str


@dataclass
class Finding:
    """One check of the backup bucket: passed or not, what it saw, what to do."""

    check: str  # newest | verification | database
    ok: bool
    text: str
    hint: str = ""


@dataclass
class Verdict:
    """Every finding of a backup check."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [finding for finding in self.findings if not finding.ok]


def read_facts(storage: Storage) -> Facts:
    """One listing of backups/, the manifests, and the verification records that exist (no request for the rest)."""
    complete, _incomplete = list_backups(storage, strict=False)
    recorded = verified_ids(storage)
    verified = [manifest for manifest in complete if manifest.id in recorded]
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        passed = list(pool.map(lambda m: last_verification(read_verifications(storage, m.id)), verified))
    candidates = [{"id": m.id, "at": record.get("at"), "kind": record.get("kind")}
                  for m, record in zip(verified, passed, strict=True)
                  if record and parse_time_or_none(record.get("at")) is not None]
    newest_verified = max(candidates, key=lambda c: parse_time_or_none(c["at"]), default=None)
    return Facts(complete[0] if complete else None, newest_verified, len(complete))


def limits_for(env: Environment, max_age_hours: float | None) -> Limits:
    """--max-age-hours, else the retention policy's max_age_hours; backups.verify_max_age_days (default 8)."""
    max_age = timedelta(hours=max_age_hours) if max_age_hours is not None else policy_for(env).max_age
    days = env.raw("backups.verify_max_age_days", None) or DEFAULT_VERIFY_MAX_AGE_DAYS
    return Limits(max_age, timedelta(days=float(days)), inventory_database(env), env.name)


def inventory_database(env: Environment) -> str | None:
    """`database.name`, else the database of `database.url`; None when the inventory names no database."""
    if env.raw("database.name", None):
        return str(env.raw("database.name"))
    if not env.has("database.url"):
        return None
    try:
        return pg_url.parse_url(env.value("database.url")).dbname
    except OpsError:
        return None  # its ${env:…} is not set on this machine: nothing to compare with


def judge(facts: Facts, limits: Limits, now: datetime) -> Verdict:
    env = limits.env
    verdict = Verdict()
    if facts.newest is None:
        verdict.findings.append(Finding("newest", False, "there is no complete backup",
                                        f"run `inv backup --env {env}` and check the scheduled backup job"))
        verdict.findings.append(_verification(facts, limits, now))
        return verdict
    newest = facts.newest
    age = now - newest.finished
    limit = f"limit {hours(limits.max_age)} h"
    verdict.findings.append(Finding(
        "newest", age <= limits.max_age, f"{newest.id} finished {hours(age)} h ago ({limit})",
        f"the scheduled backup has not run or failed: see its logs, then run `inv backup --env {env}`"))
    verdict.findings.append(_verification(facts, limits, now))
    verdict.findings.append(_database(newest, limits))
    return verdict


def _verification(facts: Facts, limits: Limits, now: datetime) -> Finding:
    hint = (f"run `inv backup.verify --env {limits.env} --latest --deep` and check the scheduled verification job")
    limit = f"limit {days(limits.verify_max_age)} d"
    if facts.verified is None:
        return Finding("verification", False, f"no backup ever passed a verification ({limit})", hint)
    at = parse_time_or_none(facts.verified["at"])
    age = now - at if at else timedelta.max
    return Finding("verification", age <= limits.verify_max_age,
                   f"{facts.verified['id']} passed a {facts.verified['kind']} verification {days(age)} d ago ({limit})",
                   hint)


def _database(newest: Manifest, limits: Limits) -> Finding:
    names = f"{newest.database.name} of environment {newest.env}"
    if newest.env != limits.env:
        return Finding("database", False, f"the newest backup is of {names}, not of {limits.env}",
                       f"envs.{limits.env}.backups points at another environment's backups: fix its bucket or prefix")
    if limits.database is None:
        return Finding("database", True, f"{names} (the inventory names no database to compare with)")
    if newest.database.name != limits.database:
        return Finding("database", False, f"the newest backup is of database {newest.database.name}, the inventory "
                                          f"names {limits.database}",
                       f"check envs.{limits.env}.database and which database the scheduled backup dumps")
    return Finding("database", True, f"{names}, as in the inventory")


def hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f}"


def days(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.1f}" if delta != timedelta.max else "∞"


def to_json(env: Environment, storage: Storage, facts: Facts, limits: Limits, verdict: Verdict,
            now: datetime) -> dict[str, Any]:
    newest = facts.newest
    verified_at = parse_time_or_none((facts.verified or {}).get("at"))
    return {
        "env": env.name, "ok": not verdict.problems, "checked_at": iso_z(now), "bucket": storage.describe(),
        "backups": facts.count,
        "newest": None if newest is None else {
            "id": newest.id, "finished_at": newest.finished_at, "age_seconds": round(age_seconds(newest, now), 3),
            "env": newest.env, "database": newest.database.name},
        "max_age_hours": limits.max_age.total_seconds() / 3600,
        "last_verification": None if facts.verified is None else {
            **facts.verified, "age_seconds": round((now - verified_at).total_seconds(), 3) if verified_at else None},
        "verify_max_age_days": limits.verify_max_age.total_seconds() / 86400,
        "database": limits.database,
        "checks": {finding.check: {"ok": finding.ok, "detail": finding.text} for finding in verdict.findings},
        "problems": [{"check": p.check, "problem": p.text, "hint": p.hint} for p in verdict.problems],
    }


def age_seconds(manifest: Manifest, now: datetime) -> float:
    return (now - manifest.finished).total_seconds()


def families(env: str, facts: Facts | None, verdict: Verdict | None, now: datetime) -> list[MetricFamily]:
    """The check as gauges; an age that cannot be known (no backup, never verified) is +Inf, so `> limit` alerts."""
    out = [MetricFamily("opsbook_backup_check_timestamp_seconds", "Unix time backup.check ran.")
           .add(now.timestamp(), env=env),
           MetricFamily("opsbook_backup_check_success", "1 when backup.check found no problem, 0 otherwise.")
           .add(1 if verdict is not None and not verdict.problems else 0, env=env)]
    if facts is None or verdict is None:
        return out  # the bucket could not be read
    verified_at = parse_time_or_none((facts.verified or {}).get("at"))
    out += [MetricFamily("opsbook_backup_check_newest_backup_age_seconds",
                         "Seconds since the newest complete backup finished.")
            .add(age_seconds(facts.newest, now) if facts.newest else math.inf, env=env),
            MetricFamily("opsbook_backup_check_last_verification_age_seconds",
                         "Seconds since a backup last passed a verification.")
            .add((now - verified_at).total_seconds() if verified_at else math.inf, env=env)]
    problem = MetricFamily("opsbook_backup_check_problem", "1 when this check of backup.check failed.")
    for finding in verdict.findings:
        problem.add(0 if finding.ok else 1, env=env, check=finding.check)
    return [*out, problem]
