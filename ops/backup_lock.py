"""Immutable backups (`backups.lock_days`, `backups.lock_mode`): what a backup's objects are locked with, the
backup's step that makes sure the bucket can hold them, and preflight's check that the nightly key cannot
delete them.

On S3 every object a backup writes (dump, manifest) carries an Object Lock retention until the run's start +
lock_days; on R2, which has no per-object retention, a bucket lock rule (ops/r2_lock.py) holds every object
under the backup prefix for lock_days from its creation. Either way the manifest records `lock` (mode,
retain_until), which retention reads to hold the backup until then instead of trying to delete it.

The default mode is governance: it stops the nightly job's key (preflight proves the key cannot bypass it),
and leaves a way out to an administrator allowed s3:BypassGovernanceRetention when lock_days was a mistake.
Compliance stops everyone, the account's root included, until the date: choose it knowingly.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ops import r2_lock
from ops.checks import Warn
from ops.clock import iso_z, utc_now
from ops.engine import Change, RunContext, Step
from ops.errors import CheckFailed
from ops.storage import ObjectLock, open_storage

if TYPE_CHECKING:
    from ops.checks import Probe
    from ops.inventory import Environment
    from ops.storage import Storage

DEFAULT_MODE = "governance"
PROBE_KEY = "lock-probe"  # at the backup prefix's root, outside backups/: never listed as a backup
PROBE_SECONDS = 60  # how long preflight's probe object stays locked


def lock_days(env: Environment) -> int | None:
    days = env.raw("backups.lock_days", None)
    return int(days) if days else None


def lock_mode(env: Environment) -> str:
    return str(env.raw("backups.lock_mode", None) or DEFAULT_MODE)


def held_by_a_bucket_rule(env: Environment) -> bool:
    """Whether an R2 bucket lock rule holds every object under backups/: none of them can be rewritten."""
    return lock_days(env) is not None and env.storage_config("backups").provider == "r2"


def object_lock(env: Environment, now: datetime) -> ObjectLock | None:
    """The retention each object of a backup started at `now` is written with (S3 only; None elsewhere)."""
    days = lock_days(env)
    if days is None or env.storage_config("backups").provider != "s3":
        return None
    # whole seconds (S3 keeps no more), so the manifest, written later from the recorded start, gets the same
    return ObjectLock(lock_mode(env).upper(), (now + timedelta(days=days)).replace(microsecond=0))


def manifest_record(env: Environment, started: datetime, finished: datetime) -> dict[str, str] | None:
    """The manifest's `lock`: until when none of the backup's objects can be deleted."""
    days = lock_days(env)
    if days is None:
        return None
    lock = object_lock(env, started)
    if lock is not None:
        return {"mode": lock_mode(env), "retain_until": iso_z(lock.retain_until)}
    # R2's rule counts from each object's creation; the manifest, written last, is held longest
    return {"mode": "r2-bucket-lock", "retain_until": iso_z(finished + timedelta(days=days, minutes=5))}


def _local_refused(storage: Storage) -> CheckFailed:
    return CheckFailed(f"{storage.describe()}: a folder cannot lock backups (backups.lock_days is set)",
                       hint="keep backups in an S3 bucket with Object Lock or an R2 bucket, or unset backups.lock_days")


def _no_object_lock(storage: Storage) -> CheckFailed:
    return CheckFailed(f"{storage.describe()}: the bucket has no Object Lock, so backups.lock_days cannot hold "
                       "its backups", hint="create the backup bucket with Object Lock enabled "
                                           "(aws s3api create-bucket --object-lock-enabled-for-bucket) and point "
                                           "backups.bucket at it, or unset backups.lock_days")


class LockStep(Step):
    """First in a backup with lock_days: the bucket must be able to hold what the backup writes."""

    name = "object-lock"

    def __init__(self, days: int):
        self.days = days
        self.title = f"make sure the backup bucket holds each backup for {days} day(s) (backups.lock_days)"

    def check(self, ctx: RunContext) -> Change | None:
        storage = ctx.storage("backups")
        provider = storage.config.provider
        if provider == "local":
            raise _local_refused(storage)
        if provider == "s3":
            if not storage.object_lock_enabled():
                raise _no_object_lock(storage)
            return None
        rules = r2_lock.BucketLocks.for_env(ctx.env)
        return rules.change(storage.config.prefix, self.days)

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        r2_lock.BucketLocks.for_env(ctx.env).apply(change)
        return {"rule": change.data}

    def verify(self, ctx: RunContext) -> None:
        storage = ctx.storage("backups")
        if storage.config.provider == "r2":
            r2_lock.BucketLocks.for_env(ctx.env).require(storage.config.prefix, self.days)


# --- preflight -----------------------------------------------------------------------------------


def lock_probe(env: Environment) -> Probe:
    """Warn when a protected environment's backups are not locked; else prove the lock holds against the
    nightly job's own key: a probe object locked as the backups are, then a delete of that very version
    with x-amz-bypass-governance-retention, must be refused."""
    def probe() -> str:
        days = lock_days(env)
        if days is None:
            raise Warn(f"the backups of {env.name} are not locked: the nightly job's key (or anyone holding it) "
                       "can delete every one of them; set backups.lock_days on an Object Lock (S3) or R2 bucket")
        storage = open_storage(env.storage_config("backups"))
        if storage.config.provider == "local":
            raise _local_refused(storage)
        if storage.config.provider == "r2":
            return r2_lock.BucketLocks.for_env(env).require(storage.config.prefix, days)
        return _probe_s3(env, storage, days)

    return probe


def _probe_s3(env: Environment, storage: Storage, days: int) -> str:
    if not storage.object_lock_enabled():
        raise _no_object_lock(storage)
    mode = lock_mode(env)
    storage.put_bytes(PROBE_KEY, b"opsbook lock probe\n",
                      lock=ObjectLock(mode.upper(), utc_now() + timedelta(seconds=PROBE_SECONDS)))
    if storage.delete_locked_version(PROBE_KEY, bypass_governance=True):
        raise CheckFailed(f"the backup key deleted a {mode}-locked probe object ({PROBE_KEY}) by bypassing "
                          "governance retention: whoever holds this key can erase the locked backups",
                          where=storage.describe(),
                          hint="deny s3:BypassGovernanceRetention to the backup key's IAM user, or set "
                               "backups.lock_mode: compliance")
    held = (f"each backup is held {days} day(s) in {mode} mode; the backup key's delete of a locked probe "
            "version was refused")
    if not any(rule.get("Status") == "Enabled" and rule.get("NoncurrentVersionExpiration")
               for rule in storage.lifecycle_rules()):
        # an Object Lock bucket is versioned: a deletion only adds a marker, the old version stays billed
        raise Warn(f"{held}; but no lifecycle rule expires noncurrent versions, so pruned backups stay stored "
                   "(add NoncurrentVersionExpiration to the bucket's lifecycle rules)")
    return held
