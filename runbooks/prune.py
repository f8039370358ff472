"""inv backup.prune: retention of the environment's backups, and the clean-up of incomplete uploads.

Two steps: delete the backups the retention policy no longer keeps (manifest
first, so a half-deleted backup is never listed as complete), then remove what
failed backups left behind more than a day ago. Nothing is deleted while backups
are failing (the newest is older than the schedule allows) unless --force. Each of
backups.copies is pruned by the same policy, from what it holds, with the same two steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from invoke import task

from ops import retention
from ops.backup_copies import backups_storage, copy_names
from ops.backup_manifest import BACKUPS_DIR, backup_prefix
from ops.cli import OpsTask, TaskCall
from ops.clock import utc_now
from ops.engine import Change, Runbook, RunContext, Runner, Step
from ops.errors import CheckFailed, StepFailed
from ops.retention import delete_backup, policy_for, remove_incomplete

if TYPE_CHECKING:
    from ops.engine import RunResult
    from ops.inventory import Environment
    from ops.output import Output
    from ops.retention import RetentionPolicy, Survey

SURVEY_STATE = "retention"  # ctx.state key: the survey the last check before apply saw


def survey_key(copy: str | None) -> str:
    return SURVEY_STATE if copy is None else f"{SURVEY_STATE}:{copy}"


def take_survey(ctx: RunContext, policy: RetentionPolicy, force: bool, copy: str | None = None) -> Survey:
    storage = backups_storage(ctx, copy)
    found = retention.survey(storage, policy, utc_now(), force=force)
    ctx.state[survey_key(copy)] = found
    if found.refused:
        for decision in found.plan.decisions:
            ctx.log(decision.line())
        where = "" if copy is None else f" on copy {copy}"
        raise CheckFailed(f"refusing to prune the backups of {ctx.env.name}{where}: {found.plan.refused}",
                          where=storage.describe(),
                          hint=f"find out why backups fail (`inv backup.list --env {ctx.env.name}`, `inv runs.list`);"
                               f" `inv backup.prune --env {ctx.env.name} --force` prunes anyway")
    return found


def leftover_objects(ctx: RunContext, backup_ids: list[str], copy: str | None = None) -> list[str]:
    storage = backups_storage(ctx, copy)
    return [backup_id for backup_id in backup_ids if any(True for _ in storage.list(backup_prefix(backup_id)))]


class ExpiredBackupsStep(Step):
    def __init__(self, policy: RetentionPolicy, force: bool, copy: str | None = None):
        self.policy, self.force, self.copy = policy, force, copy
        self.name = "expired-backups" if copy is None else f"expired-backups-copy-{copy}"
        where = "" if copy is None else f" on copy {copy}"
        self.title = f"delete the backups{where} retention no longer keeps ({policy.describe()})"

    def check(self, ctx: RunContext) -> Change | None:
        found = take_survey(ctx, self.policy, self.force, self.copy)
        plan = found.plan
        if not plan.deletions:
            return None
        details = [decision.line() for decision in plan.decisions]
        if plan.forced:
            details.insert(0, f"--force: pruning although {plan.refused}")
        deletions = [{"id": d.backup.id, "reasons": list(d.reasons)} for d in plan.deletions]
        return Change(f"delete {len(deletions)} expired backup(s), keep {len(plan.kept)}", details,
                      {"delete": deletions})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        deleted = []
        for item in change.data["delete"]:
            delete_backup(backups_storage(ctx, self.copy), item["id"])
            ctx.log(f"deleted backup {item['id']} ({'; '.join(item['reasons'])})")
            deleted.append(item["id"])
        return {"deleted": deleted}

    def verify(self, ctx: RunContext) -> None:
        deleted = (ctx.state.get(self.name) or {}).get("deleted", [])
        remaining = leftover_objects(ctx, deleted, self.copy)
        if remaining:
            raise StepFailed(f"objects of deleted backups are still there: {', '.join(remaining)}",
                             where=backups_storage(ctx, self.copy).describe(),
                             hint="run the prune again; it finishes what was left")


class IncompleteUploadsStep(Step):
    def __init__(self, policy: RetentionPolicy, force: bool, copy: str | None = None):
        self.policy, self.force, self.copy = policy, force, copy
        self.name = "incomplete-uploads" if copy is None else f"incomplete-uploads-copy-{copy}"
        where = "" if copy is None else f" on copy {copy}"
        self.title = f"remove incomplete backups and dangling multipart uploads{where} older than a day"

    def check(self, ctx: RunContext) -> Change | None:
        found = take_survey(ctx, self.policy, self.force, self.copy)
        if not found.leftovers:
            return None
        details = [f"remove incomplete backup {i.id}: no manifest, last written {i.newest_modified:%Y-%m-%d %H:%MZ}"
                   f" ({len(i.keys)} object(s))" for i in found.stale_incomplete]
        details += [f"abort the multipart upload of {u.key}, started {u.initiated:%Y-%m-%d %H:%MZ}"
                    for u in found.stale_uploads]
        details += [f"keep incomplete backup {i.id}: younger than a day, may still be in progress"
                    for i in found.young_incomplete]
        summary = (f"remove {len(found.stale_incomplete)} incomplete backup(s), abort "
                   f"{len(found.stale_uploads)} dangling multipart upload(s)")
        return Change(summary, details, {"incomplete": [i.id for i in found.stale_incomplete],
                                         "uploads": list(found.stale_uploads)})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        storage = backups_storage(ctx, self.copy)
        for backup_id in change.data["incomplete"]:
            remove_incomplete(storage, backup_id)
            ctx.log(f"removed incomplete backup {backup_id}")
        for upload in change.data["uploads"]:
            storage.abort_incomplete_upload(upload)
            ctx.log(f"aborted the multipart upload of {upload.key}")
        return {"incomplete_removed": change.data["incomplete"],
                "uploads_aborted": [{"key": u.key, "upload_id": u.upload_id} for u in change.data["uploads"]]}

    def verify(self, ctx: RunContext) -> None:
        outputs = ctx.state.get(self.name) or {}
        remaining = leftover_objects(ctx, outputs.get("incomplete_removed", []), self.copy)
        aborted = {item["upload_id"] for item in outputs.get("uploads_aborted", [])}
        storage = backups_storage(ctx, self.copy)
        still_open = [u.key for u in storage.list_incomplete_uploads(BACKUPS_DIR) if u.upload_id in aborted]
        if remaining or still_open:
            raise StepFailed(f"still there after the clean-up: {', '.join([*remaining, *still_open])}",
                             where=storage.describe(), hint="run the prune again")


def build(env: Environment, force: bool = False, **arguments: Any) -> Runbook:
    policy = policy_for(env)
    steps: list[Step] = []
    for copy in [None, *copy_names(env)]:
        steps += [ExpiredBackupsStep(policy, force, copy), IncompleteUploadsStep(policy, force, copy)]
    return Runbook("backup.prune", f"Prune the backups of {env.name}", steps,
                   arguments={"force": force, **arguments})


def run_prune(env: Environment, output: Output, *, dry_run: bool, confirm: str | None,
              force: bool) -> tuple[RunResult, Survey | None, dict[str, Survey]]:
    """Like ops.cli.execute, keeping the run's context so the surveys (the bucket's, each copy's) can be reported."""
    ctx = RunContext(env, output=output)
    result = Runner(build(env, force=force), ctx, confirm=confirm, prompt=input).run(dry_run=dry_run)
    copies = {name: ctx.state[survey_key(name)] for name in copy_names(env) if survey_key(name) in ctx.state}
    return result, ctx.state.get(SURVEY_STATE), copies


def report(output: Output, result: RunResult, found: Survey | None, copies: dict[str, Survey] | None = None) -> None:
    """What the plan's details did not show: why each backup stays when none goes, and what is held."""
    planned = {step["step"] for step in result.steps if step["change"]}
    if found is not None and ExpiredBackupsStep.name not in planned:
        output.info(f"retention keeps all {len(found.plan.decisions)} backup(s):" if found.plan.decisions
                    else "no complete backup to prune")
        for decision in found.plan.decisions:
            output.info(f"       {decision.line()}")
    if found is not None:
        for incomplete in found.young_incomplete if IncompleteUploadsStep.name not in planned else []:
            output.info(f"kept incomplete backup {incomplete.id}: younger than a day, may still be in progress")
        if found.leftovers_held and (found.stale_incomplete or found.stale_uploads):
            output.warn(f"incomplete uploads kept: {found.leftovers_held} (--force removes them)")
        for damaged in found.damaged:
            output.warn(f"backup {damaged.id} kept: its manifest cannot be read ({damaged.problem}); inspect it")
    for name, survey in (copies or {}).items():
        output.info(f"copy {name}: by the same policy {len(survey.plan.deletions)} to delete, "
                    f"{len(survey.plan.kept)} kept")
    output.info(f"{result.status} (run {result.run_id}; `inv runs.show {result.run_id}` for the journal)")
    output.result({**result.to_json(), **(found.to_json() if found is not None else {}),
                   **({"copies": {name: survey.to_json() for name, survey in copies.items()}} if copies else {})})


@task(klass=OpsTask, help=dict(force="prune even though the newest backup is older than the schedule allows"))
def prune(call: TaskCall, env=None, dry_run=False, force=False, confirm=None, json=False):
    """Apply the retention policy (keep_last, daily, weekly, monthly, min_keep); remove stale incomplete uploads."""
    result, found, copies = run_prune(call.environment, call.output, dry_run=dry_run, confirm=confirm, force=force)
    report(call.output, result, found, copies)
