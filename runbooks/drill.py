"""inv drill / drill.history / drill.due: the quarterly disaster-recovery drill, every step real and measured.

`inv drill --env prod --target staging` rehearses losing prod's database:

1. restore   the chosen backup of the source into the target (the restore runbook: checksum first,
             a new database, row counts against the manifest, then the swap);
2. migrations `migrate.status` is up to date on the restored database, or the repository's pending
             migrations apply cleanly (a rehearsal of the next deploy: migrations go before the restart);
3. staging   the target's env file pushed when it changed, a rolling restart, health and ready URLs 200
             ("not applicable: no hosts" when the target has none, as the sandbox's drill target);
4. images    a random sample of stored images: HEAD and GET through the storage API with matching sizes,
             and over HTTP through `storage.public_base` when it is set;
5. rto / rpo drill start → staging ready (without hosts: → the restored database is migrated), and the age
             of the backup used, against the source's `targets`.

When the source has point-in-time recovery (`pitr`), or with --to-time T, step 1 recovers the source to T
(default: a minute before the drill) through `inv restore --to-time`'s steps, and the RPO is the target
time minus the newest commit recovered, against `targets.rpo_seconds` (ops/drill_pitr.py).

Each check runs even when an earlier one failed, unless it needs that one (the app cannot be pointed at a
restore that did not happen), so the report names every cause. The report (Markdown, HTML, JSON: ops/drills.py)
is saved under <state>/drills/<id>/ and uploaded to the source's backups storage; any failed check exits 3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from invoke import Collection, task

from ops import drill_neon, drill_pitr, drills, image_sample, pg_url, restore_steps
from ops.cli import OpsTask, TaskCall, environment, execute
from ops.clock import iso_z, utc_now
from ops.deploy_steps import health_gate
from ops.drill_checks import DrillCheck, Session
from ops.drills import NotApplicable, duration_text
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import CheckFailed, OpsError, UsageError
from ops.migrate_steps import migrate_steps
from ops.migrations import environment_status, load_migration_source
from ops.migrations.drift import find_drift
from ops.platform_steps import has_app, push_env_steps, restart_step
from ops.platforms import platform_name
from ops.secrets import redact
from ops.storage import open_storage

if TYPE_CHECKING:

    from ops.backup_manifest import Manifest
    from ops.inventory import Environment

DEFAULT_SAMPLE = 50
DEFAULT_HEALTH_TIMEOUT = 30.0
PROBLEMS_SHOWN = 5
NEON_BRANCH = drill_neon.TARGET  # drill.target: a fresh branch of a Neon source (ops/drill_neon.py)


class RestoreCheck(DrillCheck):
    name = "restore"

    def __init__(self, session: Session):
        super().__init__(session)
        runbook = restore_steps.build(session.target, source=session.source.name, backup=session.backup)
        self.steps = runbook.steps
        self.session.restore_plan = self.steps[0].plan
        self.title = (f"restore backup {session.backup} of {session.source.name} into {session.target.name} "
                      "(checksum, new database, row counts, swap)")
        self.summary = f"restore a backup of {session.source.name} into {session.target.name}"

    def plan(self, ctx: RunContext) -> list[str]:
        change = self.steps[0].check(ctx)
        return [change.summary, *change.details] if change else []

    def run(self, ctx: RunContext) -> str:
        plan = self.session.restore_plan
        self.session.manifest = plan.manifest(ctx)
        ctx.run_steps(self.steps)
        loaded = ctx.state.get("load") or {}
        manifest = self.session.manifest
        return (f"backup {manifest.id} (taken {manifest.started_at}): sha256 matches; {loaded.get('tables')} "
                f"tables, {loaded.get('rows')} rows as in the manifest; swapped into {plan.database}")


class MigrationsCheck(DrillCheck):
    name = "migrations"
    needs = ("restore",)
    title = ("migrations: up to date on the restored database, or the repository's pending ones apply cleanly; "
             "its schema is what they build")
    summary = "compare the restored database's migrations and schema with the repository's"

    def run(self, ctx: RunContext) -> str:
        database = self.session.restore_plan.database  # the restored copy, whatever the app's URL says
        state = environment_status(ctx.env, dbname=database)
        self._refuse_unsafe(state)
        if state.up_to_date:
            done = (f"up to date: {len(state.applied)} migrations applied, as in the repository; "
                    "applying them is a no-op")
        else:
            pending = list(state.pending)
            ctx.run_steps(migrate_steps(ctx.env, backup=False, dbname=database))
            after = environment_status(ctx.env, dbname=database)
            if not after.up_to_date:
                raise CheckFailed(f"after applying, migrate.status says: {after.verdict}")
            done = f"the repository is ahead: {len(pending)} pending migration(s) applied cleanly: {', '.join(pending)}"
        return f"{done}; {self._schema(ctx, database)}"

    def _schema(self, ctx: RunContext, database: str) -> str:
        """What `inv migrate.drift` finds on the restored copy: a hand-made change on the source comes back with
        every restore, and a database built from the migrations alone would lack it."""
        source = load_migration_source(ctx.env)
        try:
            differences = find_drift(pg_url.with_database(ctx.env.database_url(direct=True), database),
                                     ctx.env.admin_url(), source.migrations, ctx.label)
        except CheckFailed as error:  # no role here may create the scratch database: said, not failed
            return f"schema not compared: {error.message}"
        if differences:
            listed = "; ".join(map(str, differences[:5])) + ("; …" if len(differences) > 5 else "")
            raise CheckFailed(f"the restored schema differs from what the {len(source.migrations)} migration(s) "
                              f"build: {listed}",
                              hint=f"`inv migrate.drift --env {self.session.source.name}` lists the differences on "
                                   "the source; record the hand-made change in a migration")
        return f"schema: what the {len(source.migrations)} migration(s) build"

    @staticmethod
    def _refuse_unsafe(state: Any) -> None:
        problems = [f"{label}: {', '.join(names)}" for label, names in (
            ("edited after being applied", state.edited), ("failed", state.failed),
            ("in the database but not in the repository", state.database_only)) if names]
        if problems:
            raise CheckFailed("the restored database and the repository disagree: " + "; ".join(problems),
                              hint="`inv migrate.status` on the source shows the same; restore the edited "
                                   "migration.sql from version control")


class StagingCheck(DrillCheck):
    name = "staging"
    needs = ("restore",)
    summary = "push the env file where it changed, rolling restart, health and ready URLs"

    def __init__(self, session: Session):
        super().__init__(session)
        self.title = (f"point {session.target.name}'s app at the restored database: env file, rolling restart, "
                      "health and ready URLs answer 200")

    def plan(self, ctx: RunContext) -> list[str]:
        hosts = ctx.env.host_configs()
        if not has_app(ctx.env):
            return [self._no_hosts(ctx)]
        if not hosts:
            return [f"platform: {platform_name(ctx.env)}"]
        return [f"hosts: {', '.join(host.name for host in hosts)}"]

    def _no_hosts(self, ctx: RunContext) -> str:
        return (f"not applicable: no hosts in {ctx.env.name}, so no app to point at the restored database "
                "(the RTO ends when the restored database is migrated)")

    def run(self, ctx: RunContext) -> str:
        hosts = ctx.env.host_configs()
        if not has_app(ctx.env):
            self.session.ready_after = self.session.elapsed()
            raise NotApplicable(self._no_hosts(ctx))
        pushed = ctx.run_steps(push_env_steps(ctx.env))
        ctx.run_steps([restart_step(ctx.env, always=True)])
        timeout = float(ctx.env.value("app.health_timeout", DEFAULT_HEALTH_TIMEOUT))
        for host in hosts:
            health_gate(ctx.env, host, timeout)
        self.session.ready_after = self.session.elapsed()
        changed = sum(1 for planned in pushed if planned.change is not None)
        if not hosts:  # a managed platform: its restart step redeployed and checked health and ready
            return (f"variables {'updated' if changed else 'unchanged'} on {platform_name(ctx.env)}; redeployed; "
                    "health and ready URLs answer 200")
        return (f"env file {'pushed to ' + str(changed) + ' host(s)' if changed else 'unchanged'}; restarted "
                f"{', '.join(host.name for host in hosts)}; health and ready URLs answer 200")


class ImagesCheck(DrillCheck):
    name = "images"
    summary = "HEAD and GET a random sample of stored images"

    def __init__(self, session: Session):
        super().__init__(session)
        self.sample = int(session.source.value("drill.sample_images", DEFAULT_SAMPLE))
        self.query = session.source.value("drill.images_query", None)
        if self.query:
            self.needs = ("restore",)  # the keys come from the restored database
        where = "public_base" if session.source.has("storage.public_base") else "the storage API"
        self.title = f"a random sample of {self.sample} stored images of {session.source.name} answers through {where}"

    def plan(self, ctx: RunContext) -> list[str]:
        storage = open_storage(self.session.source.storage_config("storage"))
        origin = "keys from the restored database (drill.images_query)" if self.query else "keys from the bucket"
        return [f"{storage.describe()}; {origin}"]

    def run(self, ctx: RunContext) -> str:
        storage = open_storage(self.session.source.storage_config("storage"))
        if self.query:
            # A connection of its own: the restore's swap ended every session opened before it.
            sample = image_sample.from_database(ctx.env.database_url(direct=True), self.query, self.sample,
                                                ctx.label)
        else:
            sample = image_sample.from_bucket(storage, self.session.source.value("drill.images_prefix", ""),
                                              self.sample)
        if not sample:
            return f"nothing to sample: no stored image in {storage.describe()}"
        problems = image_sample.probe_all(storage, sample)
        if problems:
            shown = "; ".join(problems[:PROBLEMS_SHOWN]) + ("; …" if len(problems) > PROBLEMS_SHOWN else "")
            raise CheckFailed(f"{len(problems)} of {len(sample)} sampled images failed: {shown}",
                              hint=f"restore them from the asset copies (backup.assets) into {storage.describe()}")
        public = " and over HTTP through public_base" if storage.config.public_base else ""
        return f"{len(sample)} sampled images answer HEAD and GET with matching sizes{public}"


class ObjectiveCheck(DrillCheck):
    """RTO (drill start → staging ready) or RPO (age of the backup used) against the source's targets."""

    def __init__(self, session: Session, objective: str):
        super().__init__(session)
        self.name = objective
        self.pitr = objective == "rpo" and session.pitr_plan is not None
        if self.pitr:  # the newest commit recovered against the target time (ops/drill_pitr.py)
            self.target_key, what = "rpo_seconds", "target time − newest commit recovered"
            self.limit_seconds: float | None = drill_pitr.rpo_limit(session)
        else:
            self.target_key = "rto_minutes" if objective == "rto" else "rpo_hours"
            unit = 60 if objective == "rto" else 3600
            limit = session.target_value(self.target_key)
            self.limit_seconds = limit * unit if limit is not None else None
            what = f"drill start → {session.rto_until}" if objective == "rto" else "age of the backup used"
        self.title = f"{objective.upper()} ({what}) within targets.{self.target_key}"
        self.summary = f"measure the {objective.upper()}"

    def measured(self) -> float | None:
        if self.name == "rto":
            return self.session.ready_after
        if self.pitr:
            return drill_pitr.measured_rpo(self.session)
        manifest = self.session.manifest or self._chosen_manifest()
        if manifest is None or self.session.started_at is None:
            return None
        return max((self.session.started_at - manifest.finished).total_seconds(), 0.0)

    def _chosen_manifest(self) -> Manifest | None:
        plan = self.session.restore_plan
        return getattr(plan, "_manifest", None) if plan is not None else None

    def run(self, ctx: RunContext) -> str:
        value = self.measured()
        if value is None:
            cause = "staging never became ready" if self.name == "rto" else (
                "nothing was recovered" if self.pitr else "no backup could be chosen")
            raise CheckFailed(f"{self.name.upper()} not measured: {cause}")
        limit = self.limit_seconds
        text = f"{duration_text(value)} (target {duration_text(limit) if limit is not None else 'none set'})"
        if self.pitr:
            text += f": {drill_pitr.rpo_detail(self.session)}"
        if limit is not None and value > limit:
            raise CheckFailed(f"{self.name.upper()} {text}: over the target")
        return text


class ReportStep(Step):
    name = "report"

    def __init__(self, session: Session):
        self.session = session
        self.title = (f"write the evidence report (Markdown, HTML with charts, JSON) to .ops/drills/ and to "
                      f"{session.source.name}'s backups storage under drills/")

    def check(self, ctx: RunContext) -> Change | None:
        return Change("write and upload the drill report")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        report = self.report(ctx)
        markdown = drills.render_markdown(report)
        html = drills.render_html(report, drills.list_drills(self.session.source))
        folder = drills.save_report(ctx.env.inventory.state_dir, report, markdown, html)
        uploaded = self._upload(ctx, report, markdown, html)
        ctx.state["drill"] = {**report, "folder": str(folder), "uploaded": uploaded}
        ctx.log(f"report: {folder / drills.REPORT_MARKDOWN}" + (f" and {uploaded[0]} …" if uploaded else ""))
        if not report["passed"]:
            raise CheckFailed(f"the drill failed {len(report['failures'])} check(s): " + "; ".join(report["failures"]),
                              hint=f"{folder / drills.REPORT_MARKDOWN} names each cause; fix them and run the "
                                   "drill again")
        return {"id": report["id"], "passed": True, "folder": str(folder)}

    def verify(self, ctx: RunContext) -> None:
        """apply raised when a check failed; the report is written either way."""

    def report(self, ctx: RunContext) -> dict[str, Any]:
        session = self.session
        manifest = session.manifest or (session.restore_plan and getattr(session.restore_plan, "_manifest", None))
        results = [session.results[step] for step in ("branch", "restore", "migrations", "staging", "images", "rto",
                                                      "rpo", "cleanup") if step in session.results]
        rpo = None
        started = session.started_at or utc_now()
        if manifest is not None:
            rpo = max((started - manifest.finished).total_seconds(), 0.0)
        restored = manifest is not None and session.passed("restore")
        measured: dict[str, Any] = {
            "backup_id": manifest.id if manifest else None, "rpo_seconds": rpo,
            "targets": {"rto_minutes": session.target_value("rto_minutes"),
                        "rpo_hours": session.target_value("rpo_hours")},
            "restored_bytes": manifest.object.dump_size if restored else None,
            "restored_rows": sum(manifest.row_counts.values()) if restored else None}
        if session.pitr_plan is not None:
            measured = drill_pitr.report_fields(session)
        return drills.DrillReport(
            id=ctx.run_id, source_env=session.source.name, target_env=session.target.name, operator=ctx.operator,
            started_at=iso_z(started), finished_at=iso_z(utc_now()), rto_seconds=session.ready_after,
            rto_until=session.rto_until, steps=results, **measured).to_json()

    def _upload(self, ctx: RunContext, report: dict[str, Any], markdown: str, html: str) -> list[str]:
        try:
            return drills.upload_report(open_storage(self.session.source.storage_config("backups")), report,
                                        markdown, html)
        except OpsError as error:
            ctx.output.warn(f"the drill report was not uploaded to {self.session.source.name}'s backups storage: "
                            f"{redact(error.message)}; it is kept in the state dir")
            return []


def build(env: Environment, **arguments: Any) -> Runbook:
    """`env` is the target; with no `source` argument and a `drill.target` set, `env` is the source."""
    source_name = arguments.get("source")
    if source_name is None and env.value("drill.target", None) == NEON_BRANCH:
        target = drill_neon.target_environment(env)
        return build_neon_branch(env, target, backup=str(arguments.get("backup") or "latest"))
    if source_name is None and env.has("drill.target"):
        source, target = env, _environment(str(env.value("drill.target")))
    else:
        source = env if source_name in (None, env.name) else _environment(source_name)
        target = env
    session = Session(source, target, str(arguments.get("backup") or "latest"))
    to_time = drill_pitr.drill_target_time(source, arguments.get("to_time"), session.backup)
    restore: DrillCheck = RestoreCheck(session) if to_time is None else drill_pitr.PitrRestoreCheck(session, to_time)
    steps: list[Step] = [restore, MigrationsCheck(session), StagingCheck(session),
                         ImagesCheck(session), ObjectiveCheck(session, "rto"), ObjectiveCheck(session, "rpo"),
                         ReportStep(session)]
    if session.pitr_plan is None:
        title = f"DR drill: restore {source.name} into {target.name} and prove it serves"
    else:
        title = (f"DR drill: recover {source.name} to {session.pitr_plan.when} into {target.name} and prove it "
                 "serves")
    return Runbook("drill", title, steps, arguments={"source": source.name, "backup": session.backup,
                                                      **({"to_time": to_time} if to_time else {})},
                   locks=("environment",))


def build_neon_branch(source: Environment, target: Environment, *, backup: str = "latest",
                      provider_pitr: bool = False, keep: bool = False) -> Runbook:
    """The drill into a fresh Neon branch (ops/drill_neon.py); it runs on `target`, whose database becomes the
    branch's."""
    session = drill_neon.NeonSession(source, target, backup, keep=keep)
    restore: DrillCheck = RestoreCheck(session)
    if provider_pitr:
        restore = drill_neon.BranchRestoreCheck(session)  # the restore plan above still picks the backup
    else:
        restore.needs = ("branch",)
    steps: list[Step] = [drill_neon.BranchStep(session), restore, MigrationsCheck(session), StagingCheck(session),
                         ImagesCheck(session), ObjectiveCheck(session, "rto"), ObjectiveCheck(session, "rpo"),
                         drill_neon.CleanupStep(session), ReportStep(session)]
    how = "take the branch itself as the restore" if provider_pitr else "restore the backup into it"
    title = f"DR drill: a fresh Neon branch of {source.name}, {how}, and prove it serves"
    return Runbook("drill", title, steps, arguments={"source": source.name, "backup": backup,
                                                      "target": drill_neon.TARGET, "provider_pitr": provider_pitr,
                                                      "keep": keep}, locks=("environment",))


def _environment(name: str) -> Environment:
    return environment(name)


# --- tasks --------------------------------------------------------------------------------------


@task(klass=OpsTask, name="run", default=True,
      help=dict(env="the SOURCE environment whose backup is restored",
                target="the environment to restore into (default: the source's drill.target)",
                backup="backup id of the source, or latest (default)",
                provider_pitr=f"with --target {NEON_BRANCH}: the branch itself is the restore (no dump loaded)",
                keep=f"with --target {NEON_BRANCH}: keep the drill's branch afterwards",
                to_time="recover the source to this ISO-8601 time (UTC unless it says), or latest, from its PITR "
                        "archive; the default when the source has `pitr`: a minute ago"))
def drill(call: TaskCall, env=None, target=None, backup="latest", provider_pitr=False, keep=False, to_time=None,
          dry_run=False, confirm=None, json=False):
    """The DR drill: restore, migrations, restart, health, image sample, RTO/RPO; writes the evidence report."""
    source = environment(env, output=call.output)
    target_name = target or source.value("drill.target", None)
    if not target_name:
        raise UsageError(f"no target environment for the drill of {source.name}",
                         hint=f"pass --target STAGING or set envs.{source.name}.drill.target")
    if str(target_name) == source.name:
        raise UsageError(f"the drill would restore {source.name} over itself",
                         hint="choose a staging environment as --target")
    if str(target_name) == NEON_BRANCH:
        if to_time:
            raise UsageError(f"--to-time applies to a drill into an environment, not --target {NEON_BRANCH}",
                             hint="--provider-pitr takes the branch itself as the restore")
        target_env = drill_neon.target_environment(source)
        runbook = build_neon_branch(source, target_env, backup=backup, provider_pitr=provider_pitr, keep=keep)
    elif provider_pitr or keep:
        raise UsageError(f"--provider-pitr and --keep apply to a drill into --target {NEON_BRANCH} only")
    else:
        target_env = environment(str(target_name), output=call.output, confirm=confirm)
        runbook = build(target_env, source=source.name, backup=backup, **({"to_time": to_time} if to_time else {}))

    def on_failure(ctx: RunContext, error: OpsError) -> None:
        if "drill" in ctx.state:  # the report was written: it is the result, failed or not
            call.output.result({"drill": ctx.state["drill"], "ok": False, "exit_code": error.exit_code})

    execute(runbook, target_env, call.output, dry_run=dry_run, confirm=confirm, on_failure=on_failure,
            result=lambda ctx: {"drill": ctx.state.get("drill")})


@task(klass=OpsTask, allow_decommissioned=True, help=dict(env="the source environment whose drills to list"))
def history(call: TaskCall, env=None, json=False):
    """Past drills of an environment, newest first: result, target, backup, RTO and RPO."""
    source = call.environment
    found = drills.list_drills(source)
    call.output.table(["id", "started", "target", "result", "backup", "RTO", "RPO"], [
        [d["id"], d.get("started_at"), d.get("target_env"), "passed" if d.get("passed") else "FAILED",
         d.get("backup_id") or "-", duration_text(d.get("rto_seconds")), duration_text(d.get("rpo_seconds"))]
        for d in found])
    if not found:
        call.output.info(f"no drill of {source.name} on record")
    call.output.result({"env": source.name, "drills": found})


@task(klass=OpsTask, multi_env=True, allow_decommissioned=True,
      help=dict(env="the source environment; several (prod,staging), or all (but decommissioned ones and the sandbox)"))
def due(call: TaskCall, env=None, json=False):
    """Whether this quarter's drill is done (a passed one); exit 3 when it is not, so a scheduler can nag."""
    source = call.environment
    status = drills.drill_due(source)
    last = status.last_passed
    if status.done_this_quarter and last:
        call.output.info(f"{status.quarter}: done — drill {last['id']} into {last.get('target_env')} passed")
        call.output.result({"env": source.name, **status.to_json()})
        return
    latest = f"; the last drill, {status.last['id']}, {'passed' if status.last.get('passed') else 'FAILED'}" \
        if status.last else "; no drill on record"
    call.output.result({"env": source.name, **status.to_json()})
    raise CheckFailed(f"{status.quarter}: no passed drill of {source.name} yet (due by {iso_z(status.due_by)}){latest}",
                      hint=f"run `inv drill --env {source.name} --target STAGING`")


collection = Collection("drill")
collection.add_task(drill)
collection.add_task(history)
collection.add_task(due)
