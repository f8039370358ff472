"""`inv restore --to-time T` on a `database.provider: neon` environment: Neon's own point-in-time restore.

1. window   T inside the project's history retention, else refused (exit 3) before anything is done;
2. verify   a scratch branch of the environment's branch at T, checked before anything is swapped: every
            table of the nearest backup's manifest (the newest taken at or before T) is there, none empty
            that had rows, and the migrations agree with the repository; the scratch branch is deleted;
3. restore  the branch-restore call: the branch becomes its own state at T, its current state kept as a
            branch under a preserved name (`BRANCH-before-restore-STAMP`), so nothing is lost.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from ops import neon, pg, pg_url, restore_db
from ops.backup_manifest import list_backups
from ops.clock import compact_z, iso_z, utc_now
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import CheckFailed, StepFailed, UsageError
from ops.migrations import environment_status
from ops.pitr_restore import target_time

if TYPE_CHECKING:
    from ops.backup_manifest import Manifest
    from ops.inventory import Environment


def nearest_manifest(manifests: list[Manifest], moment: datetime) -> Manifest | None:
    """The newest backup finished at or before `moment`, else the oldest one after it."""
    before = [m for m in manifests if m.finished <= moment]
    if before:
        return max(before, key=lambda m: m.finished)
    return min(manifests, key=lambda m: m.finished) if manifests else None


def branch_problems(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    """What makes the branch at T unfit to restore: a table of the manifest missing, or empty where it had rows."""
    missing = [table for table in sorted(expected) if table not in actual]
    emptied = [table for table in sorted(expected) if expected[table] and actual.get(table) == 0]
    return ([f"{table}: missing" for table in missing]
            + [f"{table}: empty (the backup had {expected[table]} rows)" for table in emptied])


class Plan:
    def __init__(self, env: Environment, moment: datetime):
        self.env, self.moment = env, moment
        self.stamp = compact_z(utc_now())
        self.branch = neon.branch_name(env)
        self.preserved = f"{self.branch}-before-restore-{self.stamp}"
        self.scratch = f"restore-check-{self.stamp}"
        self._api: neon.NeonApi | None = None

    @property
    def api(self) -> neon.NeonApi:
        if self._api is None:
            self._api = neon.client(self.env)
        return self._api


class WindowStep(Step):
    name = "window"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.title = f"{iso_z(plan.moment)} is inside the Neon project's history window"

    def check(self, ctx: RunContext) -> Change | None:
        api = self.plan.api
        neon.refuse_outside_window(self.plan.moment, utc_now(), api.history_retention_seconds(), api.project_id)
        api.require_branch(self.plan.branch)
        return None  # a check: nothing to change

    def verify(self, ctx: RunContext) -> None:
        """check() raised already when the time is outside the window."""


class VerifyStep(Step):
    name = "verify"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.title = (f"a scratch branch of {plan.branch} at {iso_z(plan.moment)}: tables against the nearest "
                      "backup's manifest, migrations against the repository (then deleted)")

    def check(self, ctx: RunContext) -> Change | None:
        return Change(f"check branch {self.plan.branch} as it was at {iso_z(self.plan.moment)}",
                      [f"create scratch branch {self.plan.scratch} at that time, check it, delete it"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        plan, api = self.plan, self.plan.api
        parent = api.require_branch(plan.branch)
        created = api.create_branch(parent.id, plan.scratch, at=plan.moment)
        try:
            if created.connection_uri is None:
                raise StepFailed(f"Neon created branch {created.branch.id} without a connection URI")
            return self._check_branch(ctx, created.connection_uri)
        finally:
            api.delete_branch(created.branch.id)

    def _check_branch(self, ctx: RunContext, uri: Any) -> dict[str, Any]:
        manifests, _ = list_backups(ctx.storage("backups"), strict=False)
        manifest = nearest_manifest(manifests, self.plan.moment)
        with pg.connect(uri, application_name=ctx.label[:63]) as connection:
            counts = pg.table_row_counts(connection)
        where = f"the branch at {iso_z(self.plan.moment)}"
        if manifest is not None:
            problems = branch_problems(manifest.row_counts, counts)
            if problems:
                raise CheckFailed(f"{where} does not hold backup {manifest.id}'s tables: " + "; ".join(problems[:10]),
                                  hint="nothing was restored; choose another time (`inv backup.list` shows when "
                                       "the backups were taken)")
            differing = len(restore_db.compare_row_counts(manifest.row_counts, counts))
            ctx.log(f"{len(counts)} tables; {differing} differ in rows from backup {manifest.id} "
                    f"(taken {manifest.finished_at}): changes between the two")
        state = environment_status(self.plan.env.with_overrides({"database": {"url": uri, "direct_url": uri}}),
                                   dbname=pg_url.parse_url(uri).dbname)
        unsafe = [f"{label}: {', '.join(names)}" for label, names in (
            ("failed", state.failed), ("in the database but not in the repository", state.database_only)) if names]
        if unsafe:
            raise CheckFailed(f"{where} and the repository disagree on migrations: " + "; ".join(unsafe),
                              hint="nothing was restored; `inv migrate.status` explains each")
        ctx.log(f"migrations: {len(state.applied)} applied, {len(state.pending)} pending from the repository")
        return {"tables": len(counts), "rows": sum(counts.values()),
                "manifest": manifest.id if manifest else None, "pending_migrations": list(state.pending)}

    def verify(self, ctx: RunContext) -> None:
        """apply raised when the branch was unfit."""


class RestoreStep(Step):
    name = "restore"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.title = (f"restore branch {plan.branch} to {iso_z(plan.moment)} (Neon's branch restore); its "
                      f"current state kept as branch {plan.preserved}")

    def check(self, ctx: RunContext) -> Change | None:
        return Change(f"restore branch {self.plan.branch} to {iso_z(self.plan.moment)}",
                      [f"keep its current state as branch {self.plan.preserved}",
                       "the endpoint keeps its host: the app's URL does not change"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        plan, api = self.plan, self.plan.api
        branch = api.require_branch(plan.branch)
        api.restore_branch(branch.id, branch.id, plan.moment, plan.preserved)
        ctx.log(f"branch {plan.branch} now holds its state at {iso_z(plan.moment)}; the previous state is "
                f"branch {plan.preserved}")
        return {"branch": plan.branch, "to_time": iso_z(plan.moment), "preserved": plan.preserved}

    def verify(self, ctx: RunContext) -> None:
        if self.plan.api.find_branch(self.plan.preserved) is None:
            raise StepFailed(f"Neon shows no branch {self.plan.preserved} after the restore",
                             hint="look at the project's branches and operations in the Neon console")


def build(env: Environment, **arguments: Any) -> Runbook:
    if arguments.get("source") not in (None, env.name):
        raise UsageError("restore --to-time on a Neon environment restores its own branch; --from does not apply",
                         hint="leave out --from")
    plan = Plan(env, target_time(str(arguments["to_time"])) or utc_now())  # latest: now
    title = f"Restore {env.name}'s Neon branch {plan.branch} to {iso_z(plan.moment)}"
    return Runbook("restore", title, [WindowStep(plan), VerifyStep(plan), RestoreStep(plan)],
                   arguments={"to_time": iso_z(plan.moment)}, locks=("environment",))
