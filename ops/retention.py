"""Retention of backups: which to keep (grandfather-father-son) and the clean-up of incomplete uploads.

`plan_retention` is pure: backups, a policy and the time in, one decision per
backup out, with every reason a kept backup stays. The rest reads the backup
bucket, deletes what the plan says, and is shared by `inv backup.prune` and the
backup run itself (`prune_after_backup`).

Periods (days, ISO weeks, months, all UTC) are counted among the periods that
have a backup, as borg and restic count them: when backups stop for a while,
the older ones do not expire faster because of the gap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ops.backup_copies import backups_storage, copy_names
from ops.backup_manifest import (
    backup_prefix,
    list_backups,
    manifest_key,
    read_verifications,
    unlocked_verification_key,
    verified_ids,
)
from ops.clock import iso_z, parse_time, utc_now
from ops.errors import OpsError
from ops.lazy_dataclasses import dataclass
from ops.output import human_size
from ops.patterns import Pattern
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.backup_manifest import IncompleteBackup, Manifest
    from ops.engine import RunContext
    from ops.inventory import Environment
    from ops.storage import IncompleteUpload, Storage

BACKUPS_PREFIX = "backups/"
# A backup (or a multipart upload) untouched for this long is no longer in progress.
INCOMPLETE_GRACE = timedelta(days=1)
DEFAULT_SCHEDULE_HOURS = 24.0
_ID_TIME = Pattern(r"^(\d{8}T\d{6}Z)")


@dataclass(frozen=True)
class BackupInfo:
    """What retention needs to know about one complete backup. Times are timezone-aware UTC."""

    id: str
    finished_at: datetime
    size: int = 0
    keep: bool = False
    verified_at: datetime | None = None  # latest successful verification
    tags: tuple[str, ...] = ()
    locked_until: datetime | None = None  # the storage refuses to delete its objects until then


@dataclass(frozen=True)
class RetentionPolicy:
    """How many backups to keep (the last ones, per day, week, month) and how old the newest may be."""

    keep_last: int = 7
    daily: int = 7
    weekly: int = 4
    monthly: int = 6
    min_keep: int = 3
    schedule_hours: float = DEFAULT_SCHEDULE_HOURS
    max_age_hours: float | None = None  # None: twice the schedule

    @property
    def max_age(self) -> timedelta:
        hours = self.max_age_hours if self.max_age_hours is not None else 2 * self.schedule_hours
        return timedelta(hours=hours)

    def describe(self) -> str:
        return (f"keep_last {self.keep_last}, daily {self.daily}, weekly {self.weekly}, monthly {self.monthly}, "
                f"min_keep {self.min_keep}, max_age_hours {self.max_age.total_seconds() / 3600:g}")


@dataclass(frozen=True)
class Decision:
    """What pruning does with one backup, and why."""

    backup: BackupInfo
    action: str  # keep | delete | held (outside every rule, but pruning is refused)
    reasons: tuple[str, ...]

    @property
    def delete(self) -> bool:
        return self.action == "delete"

    def line(self) -> str:
        finished = self.backup.finished_at.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")
        return (f"{self.action:6} {self.backup.id}  {finished}  {human_size(self.backup.size):>9}  "
                f"{'; '.join(self.reasons)}")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.backup.id, "finished_at": iso_z(self.backup.finished_at), "size": self.backup.size,
                "keep": self.backup.keep, "tags": list(self.backup.tags),
                "verified_at": iso_z(self.backup.verified_at) if self.backup.verified_at else None,
                "decision": self.action, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class RetentionPlan:
    """Every pruning decision, the deletions refused, and whether the plan was forced."""

    decisions: tuple[Decision, ...]  # newest first
    refused: str | None = None  # why nothing may be deleted (backups are failing)
    forced: bool = False  # refused, but --force deletes anyway

    @property
    def deletions(self) -> list[Decision]:
        return [d for d in self.decisions if d.delete]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if not d.delete]

    def to_json(self) -> dict[str, Any]:
        return {"refused": self.refused, "forced": self.forced,
                "delete": [d.backup.id for d in self.deletions], "keep": [d.backup.id for d in self.kept],
                "decisions": [d.to_json() for d in self.decisions]}


# -- the planner (pure) ---------------------------------------------------------------------------

def day_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def iso_week_of(moment: datetime) -> str:
    year, week, _ = moment.astimezone(UTC).isocalendar()
    return f"{year}-W{week:02d}"


def month_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


def newest_per_period(ordered: list[BackupInfo], period: Callable[[datetime], str],
                      count: int) -> Iterator[tuple[BackupInfo, str]]:
    """The newest backup of each of the `count` most recent periods that have one (`ordered` newest first)."""
    seen: set[str] = set()
    for backup in ordered:
        key = period(backup.finished_at)
        if key in seen:
            continue
        if len(seen) == count:
            return
        seen.add(key)
        yield backup, key


def failing_reason(newest: BackupInfo | None, policy: RetentionPolicy, now: datetime) -> str | None:
    """Why backups look like they are failing (the newest is too old), or None."""
    if newest is None:
        return None
    age = now - newest.finished_at
    if age <= policy.max_age:
        return None
    return (f"the newest backup {newest.id} finished {age.total_seconds() / 3600:.1f} h ago, more than "
            f"max_age_hours {policy.max_age.total_seconds() / 3600:g} allows (schedule every "
            f"{policy.schedule_hours:g} h): backups look like they are failing")


def plan_retention(backups: list[BackupInfo], policy: RetentionPolicy, now: datetime, *,
                   force: bool = False) -> RetentionPlan:
    """Keep/delete for every backup, with every reason a kept one stays."""
    ordered = sorted(backups, key=lambda b: (b.finished_at, b.id), reverse=True)
    reasons: dict[str, list[str]] = {b.id: [] for b in ordered}
    for position, backup in enumerate(ordered[:policy.keep_last], start=1):
        reasons[backup.id].append(f"keep_last {position}/{policy.keep_last}")
    for label, count, period in (("daily", policy.daily, day_of), ("weekly", policy.weekly, iso_week_of),
                                 ("monthly", policy.monthly, month_of)):
        for backup, key in newest_per_period(ordered, period, count):
            reasons[backup.id].append(f"{label} {key}")
    for backup in ordered:
        if backup.keep:
            reasons[backup.id].append("keep flag")
    newest_verified = next((b for b in ordered if b.verified_at is not None), None)
    if newest_verified is not None:
        reasons[newest_verified.id].append("newest verified")
    _apply_floor(ordered, reasons, policy.min_keep)
    refused = failing_reason(ordered[0] if ordered else None, policy, now)
    held = refused is not None and not force
    decisions = []
    for backup in ordered:
        if reasons[backup.id]:
            decisions.append(Decision(backup, "keep", tuple(reasons[backup.id])))
        elif backup.locked_until is not None and backup.locked_until > now:
            # a delete would be refused (S3) or only hide the objects behind delete markers: never try
            decisions.append(Decision(backup, "held", (f"outside every retention rule, held until "
                                                       f"{iso_z(backup.locked_until)} by the object lock",)))
        elif held:
            decisions.append(Decision(backup, "held", ("outside every retention rule, but pruning is refused "
                                                       "while backups are failing",)))
        else:
            decisions.append(Decision(backup, "delete", ("outside every retention rule",)))
    return RetentionPlan(tuple(decisions), refused=refused, forced=refused is not None and force)


def _apply_floor(ordered: list[BackupInfo], reasons: dict[str, list[str]], min_keep: int) -> None:
    """Never fewer than `min_keep` backups remain: the newest of those otherwise going stay."""
    kept = sum(1 for backup in ordered if reasons[backup.id])
    for backup in ordered:
        if kept >= min_keep:
            return
        if not reasons[backup.id]:
            reasons[backup.id].append("min_keep floor")
            kept += 1


# -- incomplete backups and uploads (pure) --------------------------------------------------------

def id_time(backup_id: str) -> datetime | None:
    """The start time an id like 20261123T020000Z-7f3a carries, or None."""
    match = _ID_TIME.match(backup_id)
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def incomplete_is_stale(incomplete: IncompleteBackup, now: datetime) -> bool:
    """Older than a day by both its id's start time and its newest object: no longer in progress."""
    moments = [m for m in (id_time(incomplete.id), incomplete.newest_modified) if m is not None]
    return bool(moments) and now - max(moments) > INCOMPLETE_GRACE


def upload_is_stale(upload: IncompleteUpload, now: datetime) -> bool:
    return now - upload.initiated > INCOMPLETE_GRACE


# -- reading the bucket ---------------------------------------------------------------------------

@dataclass
class Survey:
    """The retention plan and the leftovers, read from the backup bucket at one moment."""

    plan: RetentionPlan
    stale_incomplete: list[IncompleteBackup] = field(default_factory=list)
    young_incomplete: list[IncompleteBackup] = field(default_factory=list)
    stale_uploads: list[IncompleteUpload] = field(default_factory=list)
    damaged: list[IncompleteBackup] = field(default_factory=list)  # a manifest that cannot be read: kept
    leftovers_held: str | None = None  # why stale leftovers stay this time

    @property
    def refused(self) -> bool:
        return self.plan.refused is not None and not self.plan.forced

    @property
    def leftovers(self) -> bool:
        return bool(self.stale_incomplete or self.stale_uploads) and self.leftovers_held is None

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(),
                "incomplete": {"remove": [i.id for i in self.stale_incomplete if self.leftovers_held is None],
                               "younger_than_a_day": [i.id for i in self.young_incomplete],
                               "abort_uploads": [u.key for u in self.stale_uploads if self.leftovers_held is None],
                               "held": self.leftovers_held},
                "damaged": [{"id": i.id, "problem": i.problem} for i in self.damaged]}


def policy_for(env: Environment) -> RetentionPolicy:
    """The environment's `backups.retention` and `backups.schedule_hours`; defaults where unset."""
    settings = env.raw("backups.retention", None) or {}
    known = {k: settings[k] for k in ("keep_last", "daily", "weekly", "monthly", "min_keep", "max_age_hours")
             if settings.get(k) is not None}
    schedule = env.raw("backups.schedule_hours", None) or DEFAULT_SCHEDULE_HOURS
    return RetentionPolicy(**known, schedule_hours=float(schedule))


def backup_info(manifest: Manifest, verifications: list[dict[str, Any]]) -> BackupInfo:
    verified = [parse_time(record["at"]) for record in verifications if record.get("ok") and record.get("at")]
    return BackupInfo(id=manifest.id, finished_at=manifest.finished, size=manifest.size, keep=manifest.keep,
                      verified_at=max(verified, default=None), tags=tuple(manifest.tags),
                      locked_until=manifest.locked_until)


def read_backups(storage: Storage) -> tuple[list[BackupInfo], list[IncompleteBackup]]:
    """Complete backups (with their verifications) and incomplete ones. A damaged manifest does not
    stop retention: that backup comes back as incomplete with its `problem`, and is never deleted."""
    complete, incomplete = read_manifests(storage)
    return [info for _manifest, info in complete], incomplete


def read_manifests(storage: Storage) -> tuple[list[tuple[Manifest, BackupInfo]], list[IncompleteBackup]]:
    """read_backups with each backup's manifest beside what retention knows of it (`status --html` charts
    their durations)."""
    complete, incomplete = list_backups(storage, strict=False)
    # One more listing tells which backups were ever verified: no request per backup for the others.
    verified = verified_ids(storage)
    return [(m, backup_info(m, read_verifications(storage, m.id) if m.id in verified else []))
            for m in complete], incomplete


def survey(storage: Storage, policy: RetentionPolicy, now: datetime, *, force: bool = False) -> Survey:
    infos, incomplete = read_backups(storage)
    plan = plan_retention(infos, policy, now, force=force)
    uploads = [u for u in storage.list_incomplete_uploads(BACKUPS_PREFIX) if upload_is_stale(u, now)]
    removable = [i for i in incomplete if i.problem is None]
    result = Survey(plan, [i for i in removable if incomplete_is_stale(i, now)],
                    [i for i in removable if not incomplete_is_stale(i, now)], uploads,
                    damaged=[i for i in incomplete if i.problem is not None])
    if result.refused:
        result.leftovers_held = "pruning is refused while backups are failing"
    elif not infos and not force:
        # With no complete backup, a dump whose manifest was never written may be all there is.
        result.leftovers_held = "no complete backup exists yet"
    return result


# -- deleting -------------------------------------------------------------------------------------

def delete_backup(storage: Storage, backup_id: str) -> int:
    """Remove one backup: its manifest first, so a half-deleted backup is never listed as complete."""
    storage.delete(manifest_key(backup_id))
    keys = [info.key for info in storage.list(backup_prefix(backup_id))]
    storage.delete_many(keys)
    storage.delete(unlocked_verification_key(backup_id))  # kept outside backups/ where a lock rule holds it
    return len(keys) + 1


def remove_incomplete(storage: Storage, backup_id: str) -> int:
    """Remove what a failed backup left under its folder (listed again now: nothing is missed)."""
    keys = [info.key for info in storage.list(backup_prefix(backup_id))]
    storage.delete_many(keys)
    return len(keys)


def apply_survey(storage: Storage, found: Survey, log: Callable[[str], None]) -> dict[str, Any]:
    """Delete what the survey says may go; what each deletion was, for the journal."""
    deleted = []
    for decision in found.plan.deletions:
        delete_backup(storage, decision.backup.id)
        log(f"deleted backup {decision.backup.id} ({'; '.join(decision.reasons)})")
        deleted.append(decision.backup.id)
    removed, aborted = [], []
    if found.leftovers_held is None:
        for incomplete in found.stale_incomplete:
            remove_incomplete(storage, incomplete.id)
            log(f"removed incomplete backup {incomplete.id} (no manifest, older than a day)")
            removed.append(incomplete.id)
        for upload in found.stale_uploads:
            storage.abort_incomplete_upload(upload)
            log(f"aborted the dangling multipart upload of {upload.key} (started {iso_z(upload.initiated)})")
            aborted.append(upload.key)
    return {"deleted": deleted, "incomplete_removed": removed, "uploads_aborted": aborted}


def prune_after_backup(ctx: RunContext) -> dict[str, Any]:
    """Retention inside a successful backup's run, on the backup bucket and each of backups.copies. Never
    fails the backup: a refusal or an error is logged and returned (`refused` / `error`) for the step outputs."""
    if not ctx.env.has("backups"):
        return {"skipped": "no backups section"}
    policy = policy_for(ctx.env)
    outcome = _prune_one(ctx, policy, None)
    copies = {name: _prune_one(ctx, policy, name) for name in copy_names(ctx.env)}
    return {**outcome, **({"copies": copies} if copies else {})}


def _prune_one(ctx: RunContext, policy: RetentionPolicy, copy: str | None) -> dict[str, Any]:
    where = "" if copy is None else f" of copy {copy}"
    try:
        storage = backups_storage(ctx, copy)
        found = survey(storage, policy, utc_now())
        if found.refused:
            ctx.log(f"retention{where} skipped: {found.plan.refused}; `inv backup.prune --env {ctx.env.name} "
                    "--force` prunes anyway")
            return {"refused": found.plan.refused, "deleted": []}
        ctx.log(f"retention{where} ({policy.describe()}): {len(found.plan.deletions)} to delete, "
                f"{len(found.plan.kept)} kept")
        outcome = apply_survey(storage, found, ctx.log)
    except OpsError as error:
        message = redact(str(error))
        ctx.output.warn(f"retention{where} did not complete (the backup itself succeeded): {message}")
        return {"error": redact(error.message)}
    return {**outcome, "kept": [d.backup.id for d in found.plan.kept]}
