"""inv backup.assets: the runbook's periodic copy of the app's images to cold storage.

An incremental, parallel copy of the app bucket into the backup bucket under
assets/ (layout and skip rules in ops/assets.py), and, with --lifecycle, the
bucket lifecycle rules the runbook asks for where the provider has them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from invoke import task

from ops.assets import (
    ASSETS,
    DEFAULT_WORKERS,
    AssetManifest,
    describe_plan,
    describe_rule,
    desired_rules,
    lifecycle_unsupported,
    manifest_key,
    merged_rules,
    plan_copy,
    rules_to_set,
    run_copy,
    timestamp,
)
from ops.cli import OpsTask, TaskCall, execute
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import StepFailed, UsageError
from ops.storage import open_storage

if TYPE_CHECKING:
    from ops.inventory import Environment

NAME = "backup.assets"
PLAN_REUSE_SECONDS = 60


class CopyAssetsStep(Step):
    name = "assets-copy"
    title = "copy new and changed objects of the app bucket to cold storage (assets/ in the backup bucket)"

    def __init__(self, workers: int):
        self.workers = workers
        self._written: str | None = None
        self._planned: tuple[float, Any] | None = None

    def check(self, ctx: RunContext) -> Change | None:
        plan = self._fresh_plan()
        if plan is None:
            plan = plan_copy(ctx.storage("storage"), ctx.storage("backups"))
            self._planned = (time.monotonic(), plan)
        if plan.is_empty():
            return None
        lines = describe_plan(plan)
        return Change(lines[0], lines[1:], data={"plan": plan})

    def _fresh_plan(self) -> Any:
        """The plan made moments ago, when the Runner checks again right before applying: listing
        a large bucket twice buys nothing, the app keeps uploading either way (the next run catches up)."""
        if self._planned is None or time.monotonic() - self._planned[0] > PLAN_REUSE_SECONDS:
            return None
        plan = self._planned[1]
        self._planned = None  # once: a later check (verify, resume) lists again
        return plan

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        plan = change.data["plan"]
        manifest = run_copy(ctx.storage("storage"), ctx.storage("backups"), plan, run_id=ctx.run_id,
                            env=ctx.env.name, started_at=timestamp(), workers=self.workers,
                            on_progress=ctx.progress("objects copied", total_bytes=plan.bytes_to_copy))
        self._written = manifest_key(ctx.run_id)
        copied = [e for e in manifest.entries.values() if e.stored.startswith(f"assets/{ctx.run_id}/")]
        deleted = [e for e in manifest.entries.values() if e.deleted_at_source]
        return {"manifest": self._written, "objects": len(manifest.entries) - len(deleted),
                "copied": len(copied), "bytes_copied": sum(e.size for e in copied),
                "deleted_at_source": len(deleted)}

    def verify(self, ctx: RunContext) -> None:
        """The manifest reads back and every copy it names is there with its size.

        Not "a new plan is empty": the app keeps uploading while we copy."""
        if self._written is None:  # not applied in this process (a resumed run): nothing may be left to do
            super().verify(ctx)
            return
        backups = ctx.storage("backups")
        manifest = AssetManifest.from_json(backups.get_bytes(self._written), self._written)
        # This run's copies are listed again; the older ones were listed by the plan moments ago.
        stored = {info.key: info.size for info in backups.list(f"{ASSETS}{ctx.run_id}/")}
        bad = [e.key for e in manifest.entries.values()
               if e.stored.startswith(f"{ASSETS}{ctx.run_id}/") and stored.get(e.stored) != e.size]
        if bad:
            raise StepFailed(f"{len(bad)} copies named by {self._written} are missing or of the wrong size: "
                             f"{', '.join(bad[:5])}", hint="run it again: missing copies are copied again")


class LifecycleStep(Step):
    def __init__(self, section: str, bucket: str, *, abort_days: int, archive_days: int | None):
        self.section = section
        self.abort_days = abort_days
        self.archive_days = archive_days
        self.name = f"{section}-lifecycle"
        which = "app" if section == "storage" else "backup"
        self.title = f"set the lifecycle rules of the {which} bucket {bucket}"

    def _desired(self, ctx: RunContext) -> list[dict[str, Any]]:
        return desired_rules(ctx.storage(self.section), abort_days=self.abort_days, archive_days=self.archive_days)

    def check(self, ctx: RunContext) -> Change | None:
        missing = rules_to_set(ctx.storage(self.section).lifecycle_rules(), self._desired(ctx))
        if not missing:
            return None
        return Change(f"set {len(missing)} lifecycle rule(s) on {ctx.storage(self.section).config.bucket}",
                      [describe_rule(rule) for rule in missing])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        storage = ctx.storage(self.section)
        desired = self._desired(ctx)
        storage.set_lifecycle_rules(merged_rules(storage.lifecycle_rules(), desired))
        return {"bucket": storage.config.bucket, "rules": [rule["ID"] for rule in desired]}


def lifecycle_steps(env: Environment, *, abort_days: int, archive_days: int | None) -> tuple[list[Step], list[str]]:
    """The lifecycle steps for buckets whose provider has rules, and why the others get none."""
    steps: list[Step] = []
    unsupported: list[str] = []
    for section in ("storage", "backups"):
        storage = open_storage(env.storage_config(section))
        reason = lifecycle_unsupported(storage)
        if reason:
            unsupported.append(reason)
            continue
        steps.append(LifecycleStep(section, storage.config.bucket, abort_days=abort_days,
                                   archive_days=archive_days if section == "backups" else None))
    return steps, unsupported


def build(env: Environment, **arguments: Any) -> Runbook:
    workers = int(arguments.get("workers", DEFAULT_WORKERS))
    if workers < 1:
        raise UsageError(f"--workers {workers}: at least 1",
                         hint=f"the default, {DEFAULT_WORKERS}, suits most buckets")
    steps: list[Step] = [CopyAssetsStep(workers)]
    exempt: str | None = "only adds copies to cold storage: a nightly job runs unattended"
    if arguments.get("lifecycle"):  # rules on the app's own bucket: confirmed like any change to it
        abort_days, archive_days = _days(arguments)
        steps += lifecycle_steps(env, abort_days=abort_days, archive_days=archive_days)[0]
        exempt = None
    return Runbook(NAME, f"Copy the app bucket of {env.name} to cold storage", steps, arguments=arguments,
                   locks=("assets",), confirm_exempt=exempt)


def _days(arguments: dict[str, Any]) -> tuple[int, int | None]:
    abort_days = int(arguments.get("abort_after_days", 7))
    archive_days = int(arguments.get("archive_after_days", 30))
    if abort_days < 1 or archive_days < 0:
        raise UsageError("--abort-after-days must be at least 1 and --archive-after-days at least 0",
                         hint="--archive-after-days 0 leaves out the archive rule")
    return abort_days, archive_days or None


@task(klass=OpsTask, help=dict(
    lifecycle="also set lifecycle rules: abort incomplete multipart uploads on both buckets, "
              "move the cold copies to a colder class (S3: GLACIER_IR, R2: Infrequent Access)",
    abort_after_days="with --lifecycle: abort multipart uploads left incomplete this many days (default 7)",
    archive_after_days="with --lifecycle: archive cold copies after this many days; 0 = no archive rule "
                       "(default 30)",
    workers=f"objects copied in parallel (default {DEFAULT_WORKERS})"))
def assets(call: TaskCall, env=None, dry_run=False, confirm=None, json=False, lifecycle=False, abort_after_days=7,
           archive_after_days=30, workers=DEFAULT_WORKERS):
    """Copy the app bucket's new and changed objects to cold storage (assets/ in the backup bucket)."""
    arguments = {"workers": workers, "lifecycle": lifecycle, "abort_after_days": abort_after_days,
                 "archive_after_days": archive_after_days}
    runbook = build(call.environment, **arguments)
    if lifecycle:
        for reason in lifecycle_steps(call.environment, abort_days=1, archive_days=None)[1]:
            call.output.warn(f"lifecycle rules unsupported: {reason}")
    else:
        call.output.info("lifecycle rules not checked: --lifecycle sets the runbook's rules (abort incomplete "
                         "uploads, archive the cold copies) where the provider supports them")
    execute(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm)
