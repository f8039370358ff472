"""inv migrate.status / migrate / migrate.lint / migrate.drift / migrate.resolve: Prisma-compatible state, a gated
deploy, and drift between the schema and the migrations.

The steps, and what a deploy is, are in ops.migrate_steps; what the lint judges, in ops.migrate_lint.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import Collection, task

from ops import pg, pg_url
from ops.cli import OpsTask, TaskCall, execute
from ops.engine import Runbook, RunContext
from ops.errors import CheckFailed, UsageError
from ops.hosts import connect
from ops.journal import new_run_id
from ops.maintenance_steps import with_maintenance
from ops.migrate_lint import Review, read_facts, review, thresholds
from ops.migrate_steps import LOG_LINES, MigrationFacts, ResolveStep, contract_refusals, migrate_steps
from ops.migrations import load_migration_source, read_local_migrations, read_state, resolve_hint
from ops.migrations.drift import environment_drift, find_drift
from ops.migrations.locks import Thresholds

if TYPE_CHECKING:
    from ops.hosts import HostConfig, HostConnection
    from ops.inventory import Environment
    from ops.migrations import LocalMigration, MigrationState
    from ops.migrations.drift import Difference
    from ops.output import Output
    from ops.secrets import Secret


def build(env: Environment, **arguments: Any) -> Runbook:
    if "migration" in arguments:
        return build_resolve(env, **arguments)
    wants_backup = arguments.get("backup")
    if wants_backup is not False and (wants_backup or env.protected) and arguments.get("dbname") is None:
        arguments.setdefault("backup_id", new_run_id())  # kept in the journal: a resume reuses it
    steps = migrate_steps(env, allow_edited=bool(arguments.get("allow_edited")),
                          allow_destructive=bool(arguments.get("allow_destructive")),
                          allow_locks=bool(arguments.get("allow_locks")), backup=wants_backup,
                          dbname=arguments.get("dbname"), backup_id=arguments.get("backup_id"))
    return Runbook("migrate", f"Deploy pending migrations to {env.name}", steps, arguments=arguments)


def build_resolve(env: Environment, **arguments: Any) -> Runbook:
    if not arguments.get("migration") or arguments.get("action") not in ("rolled-back", "applied"):
        raise UsageError("migrate.resolve needs the migration's name and --rolled-back or --applied",
                         hint="inv migrate.resolve --env E --name NAME --rolled-back (or --applied)")
    facts = MigrationFacts(env, arguments.get("dbname"))
    step = ResolveStep(facts, arguments["migration"], arguments["action"])
    return Runbook("migrate.resolve", f"Resolve migration {arguments['migration']} on {env.name}", [step],
                   arguments=arguments)


# --- tasks ------------------------------------------------------------------------------------


@task(klass=OpsTask, name="status", help=dict(database="another database on the same server (default: the app's)"))
def status(call: TaskCall, env=None, database=None, json=False):
    """Prisma-compatible migration status: each migration and a verdict; exit 3 unless up to date."""
    facts = MigrationFacts(call.environment, database)
    source = load_migration_source(call.environment)
    with pg.connect(facts.url(), application_name="opsbook migrate.status", autocommit=True) as connection:
        state = read_state(connection, facts.url(), source.migrations)
    show_status(call.output, state, source.where, facts.target())
    call.output.result({"env": call.environment.name, "database": facts.target(), "source": source.where,
                        **state.to_json()})
    if not state.up_to_date:
        raise CheckFailed(f"{call.environment.name}: {state.verdict}",
                          hint=_status_hint(state, call.environment.name))


def show_status(output: Output, state: MigrationState, source: str, target: str) -> None:
    output.info(f"migrations from {source}")
    output.info(f"database {target}")
    rows = [[entry.name, entry.status, _when(entry.started_at), _when(entry.finished_at)] for entry in state.entries]
    output.table(["migration", "status", "started", "finished"], rows)
    for entry in state.entries:
        if entry.status == "failed" and entry.logs:
            output.info(f"logs of {entry.name}:")
            for line in entry.logs.strip().splitlines()[-LOG_LINES:]:
                output.info(f"    {line}")
    output.info(state.verdict)


def _when(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _status_hint(state: MigrationState, env: str) -> str:
    if state.failed:
        return resolve_hint(state.failed[0])
    if state.edited:
        return "restore the applied migration.sql from version control; put changes in a new migration"
    if state.pending:
        return f"deploy them: inv migrate --env {env}"
    return "these migrations exist only in the database: deploy the release that has them, or check the checkout"


@task(klass=OpsTask, name="deploy", default=True,
      help=dict(allow_edited="deploy even though applied migrations were edited since",
                allow_destructive="allow breaking changes (DROP, RENAME, type changes...) on a protected env",
                allow_locks="allow statements that lock a large table (a maintenance window)",
                no_backup="skip the pre-migration backup (refused on protected environments)",
                maintenance="announce a maintenance window with this title around the migration (completed when "
                            "it succeeds; an incident when it fails)"))
def migrate(call: TaskCall, env=None, allow_edited=False, allow_destructive=False, allow_locks=False, no_backup=False,
            dry_run=False, confirm=None, maintenance=None, json=False):
    """Deploy pending migrations: gate, lint, pre-migration backup (protected envs), deploy, verify."""
    arguments: dict[str, Any] = {"allow_edited": allow_edited, "allow_destructive": allow_destructive,
                                 "allow_locks": allow_locks}
    if no_backup:
        arguments["backup"] = False
    runbook = build(call.environment, **arguments)

    def result(ctx: RunContext) -> dict[str, Any]:
        deployed = ctx.state.get("deploy") or {}
        backup_id = (ctx.state.get("manifest") or {}).get("backup_id")
        return {"applied": deployed.get("applied", []), "engine": deployed.get("engine"), "backup_id": backup_id}

    def run() -> Any:
        return execute(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm, result=result)

    if maintenance and not dry_run:
        with_maintenance(call.environment, call.output, maintenance, run)
    else:
        run()


@task(klass=OpsTask, name="lint",
      help=dict(path="lint this migrations folder, with no environment (an app's CI): every lock rule refuses",
                since="with --path: judge only the migrations after this one (those already deployed stay "
                      "as they are); the earlier ones still say which tables exist",
                allow_destructive="report breaking changes (DROP, RENAME...) as warnings, not refusals"))
def lint(call: TaskCall, env=None, path=None, since=None, allow_destructive=False, json=False):
    """Lint migrations, applying nothing: an env's pending ones by its live table sizes, or a folder (--path).

    With --env, also the deploy's contract gate (a drop or rename a host's current release still uses: refused)
    and migrate.drift against the applied migrations (a warning). Exit 3 on a refusal (a statement the parser
    cannot read; a breaking change on a protected env or in a folder; a heavy lock on a large table, or on any
    table in a folder; a removal a live release uses), 0 when only warnings remain."""
    if path is not None and env is not None:
        raise UsageError("migrate.lint takes --env (its pending migrations) or --path (a folder), not both",
                         hint="inv migrate.lint --path prisma/migrations in an app's CI; --env E before a deploy")
    if since is not None and path is None:
        raise UsageError("--since goes with --path (with --env the database says what is deployed)",
                         hint="inv migrate.lint --path prisma/migrations --since LAST_DEPLOYED_MIGRATION")
    if path is not None:
        folder = Path(path)
        if not folder.is_dir():
            raise UsageError(f"--path {path}: no such folder", hint="point it at the app's prisma/migrations")
        migrations = read_local_migrations(folder)
        if since is not None and since not in {migration.name for migration in migrations}:
            raise UsageError(f"--since {since}: no migration of that name in {folder}",
                             hint="name a migration folder, as migrate.status lists it")
        found = review(migrations, None, Thresholds(), refuse_breaking=not allow_destructive, since=since)
        linted = [migration.name for migration in migrations if since is None or migration.name > since]
        report_lint(call.output, found, {"path": str(folder), "migrations": linted})
        return
    environment = call.environment
    source = load_migration_source(environment)
    url = environment.database_url(direct=True)
    with pg.connect(url, application_name="opsbook migrate.lint", autocommit=True) as connection:
        state = read_state(connection, url, source.migrations)
        pending = [migration for migration in source.migrations if migration.name in set(state.pending)]
        facts = read_facts(connection, pending)
    found = review(pending, facts, thresholds(environment),
                   refuse_breaking=environment.protected and not allow_destructive)
    applied = [migration for migration in source.migrations if migration.name in set(state.applied)]
    found = replace(found, contract=tuple(_releases_using(environment, pending, call.output)),
                    drift=tuple(_drift(environment, url, applied, call.output)))
    call.output.info(f"{len(pending)} pending migration(s) from {source.where}, judged by the sizes in "
                     f"{pg_url.parse_url(url).describe()}, the releases on its hosts and its schema")
    report_lint(call.output, found, {"env": environment.name, "migrations": [m.name for m in pending]})


def _releases_using(environment: Environment, pending: list[LocalMigration], output: Output) -> list[str]:
    """The deploy's contract gate: removals a host's current release still uses."""
    with ExitStack() as connections:
        def host(config: HostConfig) -> HostConnection:
            connection = connect(config)
            connections.callback(connection.close)
            return connection

        return contract_refusals(environment, pending, host, output.warn)


def _drift(environment: Environment, url: Secret, applied: list[LocalMigration], output: Output) -> list[Difference]:
    """migrate.drift against the applied migrations (the pending ones are not in the schema yet)."""
    try:
        return find_drift(url, environment.admin_url(), applied, f"opsbook migrate.lint {environment.name}")
    except CheckFailed as error:  # no role here may create the scratch database: said, not refused
        output.warn(f"schema not compared: {error.message}")
        return []


def report_lint(output: Output, found: Review, about: dict[str, Any]) -> None:
    for line in found.refusals:
        output.info(f"refused: {line}")
    for line in found.warnings:
        output.warn(line)
    output.result({**about, **found.to_json()})
    if found.refusals:
        raise CheckFailed(f"migrate.lint: {len(found.refusals)} refusal(s), {len(found.warnings)} warning(s)",
                          hint="rewrite each refused statement in its safe form (shown after `safe:`)")
    output.info(f"migrate.lint: no refusal ({len(found.warnings)} warning(s))")


@task(klass=OpsTask, name="drift")
def drift(call: TaskCall, env=None, json=False):
    """Compare the live schema with what the migrations build in a scratch database; exit 3 listing each
    difference (a table, column, index, constraint or enum value on one side only, or different), 0 when none."""
    environment = call.environment
    where = pg_url.parse_url(environment.database_url(direct=True)).describe()
    source, differences = environment_drift(environment, f"opsbook migrate.drift {environment.name}")
    call.output.info(f"{len(source.migrations)} migration(s) from {source.where} applied to a scratch database, "
                     f"compared with {where}")
    for difference in differences:
        call.output.info(f"drift: {difference}")
    call.output.result({"env": environment.name, "database": where, "source": source.where,
                        "drift": [difference.to_json() for difference in differences]})
    if differences:
        raise CheckFailed(f"{environment.name}: {len(differences)} difference(s) between the schema and the "
                          "migrations", hint="put a hand-made change into a new migration (prisma migrate diff "
                                             "writes it), or undo it")
    call.output.info("no drift: the schema is what the migrations build")


@task(klass=OpsTask, name="resolve",
      help=dict(name="the migration's folder name",
                rolled_back="its failed attempt was undone: mark it rolled back (pending again)",
                applied="it was finished by hand: record it as applied"))
def resolve(call: TaskCall, name, env=None, rolled_back=False, applied=False, dry_run=False, confirm=None, json=False):
    """Like `prisma migrate resolve`: mark a failed migration --rolled-back, or one finished by hand --applied."""
    if rolled_back == applied:
        raise UsageError("say what happened to the migration: --rolled-back or --applied (one of them)",
                         hint="--rolled-back when its changes were undone, --applied when you finished it by hand")
    runbook = build(call.environment, migration=name, action="applied" if applied else "rolled-back")
    execute(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm)


collection = Collection("migrate")
collection.add_task(migrate)
collection.add_task(status)
collection.add_task(lint)
collection.add_task(drift)
collection.add_task(resolve)
