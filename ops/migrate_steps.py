"""The steps of migrate and migrate.resolve: Prisma-compatible state and a gated deploy.

A deploy is: gate (no failed migration: Prisma's P3009; no edited one unless allowed)
→ lint the pending migrations (backward-compatible changes only on protected
environments unless --allow-destructive; no heavy lock on a table the live sizes say is
large unless --allow-locks, ops/migrations/locks.py; no drop or rename of a table or
column a host's current release still uses, ops/migrations/contract.py) → pre-migration backup (protected
environments; the backup runbook's own steps, tagged `pre-migrate`) → deploy through
the direct URL with the `native` engine or the app's own `command` on the first
host → verify that nothing is pending or failed. Each step reads the state when it
checks, so a plan made before another deploy ran is re-checked before applying.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ops import pg, pg_url
from ops.backup_steps import build as backup_runbook
from ops.engine import Change, RunContext, Step, WrappedStep
from ops.errors import CheckFailed, OpsError, StepFailed, UsageError
from ops.hosts import connect
from ops.inventory import plain, resolve
from ops.migrate_lint import read_facts
from ops.migrate_lint import thresholds as lint_thresholds
from ops.migrations import (
    apply_pending,
    lint_migrations,
    load_migration_source,
    mark_applied,
    mark_rolled_back,
    read_state,
    refuse_unsafe,
    resolve_hint,
    shell_path,
    use_prisma_schema,
)
from ops.migrations.contract import Removal, conflicts, removals
from ops.migrations.lock_wait import DEFAULT_LOCK_RETRIES, DEFAULT_TABLE_LOCK_TIMEOUT_SECONDS, LockPolicy
from ops.migrations.locks import REFUSE, judge, lock_hazards
from ops.rollout import release_name
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.hosts import HostConfig, HostConnection
    from ops.inventory import Environment
    from ops.migrations import LocalMigration, MigrationSource, MigrationState
    from ops.secrets import Secret


NATIVE = "native"
COMMAND = "command"
DEFAULT_COMMAND = "npx prisma migrate deploy"
COMMAND_TIMEOUT_SECONDS = 3600
LOG_LINES = 20


def engine_settings(env: Environment) -> tuple[str, str]:
    """(engine, command) from app.migrations; native unless told otherwise."""
    settings = plain(env.value("app.migrations", {})) or {}
    return str(settings.get("engine") or NATIVE), str(settings.get("command") or DEFAULT_COMMAND)


def lock_policy(env: Environment) -> LockPolicy:
    """app.migrations.lock_timeout_seconds / lock_retries: how long each statement waits for a table lock."""
    settings = plain(env.value("app.migrations", {})) or {}
    return LockPolicy(timeout=float(settings.get("lock_timeout_seconds", DEFAULT_TABLE_LOCK_TIMEOUT_SECONDS)),
                      retries=int(settings.get("lock_retries", DEFAULT_LOCK_RETRIES)))


class MigrationFacts:
    """What the steps of one runbook read: the migrations (once per run) and the live state (each time)."""

    def __init__(self, env: Environment, dbname: str | None):
        self.env = env
        self.dbname = dbname
        self._sources: dict[str, MigrationSource] = {}
        self._warned: set[str] = set()

    def url(self) -> Secret:
        url = self.env.database_url(direct=True)
        return pg_url.with_database(url, self.dbname) if self.dbname else url

    def target(self) -> str:
        return pg_url.parse_url(self.url()).describe()

    def source(self, ctx: RunContext) -> MigrationSource:
        if ctx.run_id not in self._sources:
            self._sources[ctx.run_id] = load_migration_source(self.env)
        return self._sources[ctx.run_id]

    def state(self, ctx: RunContext) -> MigrationState:
        url = self.url()
        with pg.connect(url, application_name=ctx.label[:63], autocommit=True) as connection:
            return read_state(connection, url, self.source(ctx).migrations)

    def pending(self, ctx: RunContext, state: MigrationState) -> list[LocalMigration]:
        names = set(state.pending)
        return [migration for migration in self.source(ctx).migrations if migration.name in names]

    def warn_once(self, ctx: RunContext, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            ctx.output.warn(text)


# --- steps ------------------------------------------------------------------------------------


class GateStep(Step):
    name = "gate"

    def __init__(self, facts: MigrationFacts, allow_edited: bool):
        self.facts, self.allow_edited = facts, allow_edited
        self.title = "refuse while a migration is failed (P3009) or an applied one was edited"

    def check(self, ctx: RunContext) -> Change | None:
        state = self.facts.state(ctx)
        refuse_unsafe(state, self.facts.target(), allow_edited=self.allow_edited)
        if state.edited:
            self.facts.warn_once(ctx, f"deploying although applied migrations were edited (--allow-edited): "
                                      f"{', '.join(state.edited)}")
        if state.database_only:
            self.facts.warn_once(ctx, f"migrations in the database but not in {self.facts.source(ctx).where}: "
                                      f"{', '.join(state.database_only)} (an older checkout, or a release "
                                      "not deployed yet?)")
        return None


class LintStep(Step):
    name = "lint"

    def __init__(self, facts: MigrationFacts, allow_destructive: bool, allow_locks: bool = False):
        self.facts, self.allow_destructive, self.allow_locks = facts, allow_destructive, allow_locks
        self.title = ("lint pending migrations for changes that break the running app, lock a large table, or "
                      "remove what a host's current release still uses")

    def check(self, ctx: RunContext) -> Change | None:
        pending = self.facts.pending(ctx, self.facts.state(ctx))
        self._breaking(ctx, pending)
        self._locks(ctx, pending)
        self._contract(ctx, pending)
        return None

    def _contract(self, ctx: RunContext, pending: list[LocalMigration]) -> None:
        """Expand/contract by what runs: no drop or rename of what a host's current release still uses."""
        if self.facts.dbname is not None:  # the drill's copy serves no release
            return
        refused = contract_refusals(self.facts.env, pending, ctx.host, lambda text: self.facts.warn_once(ctx, text))
        if refused:
            lines = "\n".join(f"    {line}" for line in refused)
            raise CheckFailed(
                f"{len(refused)} removal(s) in the pending migrations are still used by a release serving "
                f"{ctx.env.name}:\n{lines}",
                hint="deploy a release that no longer uses them first (expand/contract), then migrate; "
                     "--allow-destructive does not lift this: the release would break")


    def _locks(self, ctx: RunContext, pending: list[LocalMigration]) -> None:
        """Heavy locks judged by the live table sizes (ops/migrations/locks.py)."""
        hazards = lock_hazards(pending)
        if not hazards:
            return
        url = self.facts.url()
        with pg.connect(url, application_name=ctx.label[:63], autocommit=True) as connection:
            use_prisma_schema(connection, url)  # unqualified names are the app's schema's (?schema=)
            found = judge(hazards, read_facts(connection, pending), lint_thresholds(ctx.env))
        refused = [finding for finding in found if finding.severity == REFUSE]
        # the drill's copy serves nobody: a lock there blocks no one
        if refused and self.facts.dbname is None and not self.allow_locks:
            lines = "\n".join(f"    {finding}" for finding in refused)
            raise CheckFailed(
                f"{len(refused)} statement(s) in the pending migrations lock a large table on {ctx.env.name} "
                f"while they run:\n{lines}",
                hint="use each finding's safe form in a new migration, or re-run with --allow-locks in a "
                     "maintenance window")
        for finding in found:
            self.facts.warn_once(ctx, f"lock allowed here: {finding}")

    def _breaking(self, ctx: RunContext, pending: list[LocalMigration]) -> None:
        findings = lint_migrations(pending)
        if not findings:
            return
        lines = "\n".join(f"    {finding}" for finding in findings)
        # A copy being migrated (the drill's dbname) serves no running release: a warning is enough.
        if ctx.env.protected and self.facts.dbname is None and not self.allow_destructive:
            raise CheckFailed(
                f"{len(findings)} change(s) in the pending migrations would break the app still running on "
                f"{ctx.env.name} (protected):\n{lines}",
                hint="keep migrations backward-compatible (add now, remove in a later release once no running "
                     "version uses it), or re-run with --allow-destructive when that is already so")
        for finding in findings:
            self.facts.warn_once(ctx, f"breaking change allowed here: {finding}")


def contract_refusals(env: Environment, pending: list[LocalMigration], host: Callable[[HostConfig], Any],
                      warn: Callable[[str], None]) -> list[str]:
    """Each drop or rename in `pending` that a host's current release still uses (its prisma/schema.prisma,
    read through `host(config)`, a connection), as one line naming host and release."""
    found = removals(pending)
    if not found:
        return []
    return [line for config in env.host_configs() for line in _in_use(env, host, config, found, warn)]


def _in_use(env: Environment, connect_to: Callable[[HostConfig], Any], host: HostConfig, found: list[Removal],
            warn: Callable[[str], None]) -> list[str]:
    """The removals host's current release uses, read from its prisma/schema.prisma."""
    app = plain(resolve(env.app_settings(host.name))) or {}
    if not app.get("dir"):
        return []
    directory = str(app["dir"]).rstrip("/")
    subdir = str((app.get("migrations") or {}).get("dir") or "prisma/migrations").rstrip("/")
    relative = f"{posixpath.dirname(subdir) or '.'}/schema.prisma"
    connection = connect_to(host)
    link = connection.readlink(f"{directory}/current")
    release = f"release {release_name(link)}" if link else f"{directory} (no releases layout)"
    path = f"{directory}/current/{relative}" if link else f"{directory}/{relative}"
    text = connection.read_text(path)
    if text is None:
        warn(f"contract not checked on host {host.name}: no {path} ({release})")
        return []
    return [f"{removal} while {release} on host {host.name} uses it ({relative}: {reference.where})"
            for removal, reference in conflicts(found, text)]


class WhenPending(WrappedStep):
    """Another runbook's step, planned only when there are migrations to deploy (the pre-migration backup)."""

    def __init__(self, inner: Step, facts: MigrationFacts):
        super().__init__(inner, title=f"pre-migration backup: {inner.title}")
        self.facts = facts

    def check(self, ctx: RunContext) -> Change | None:
        if not self.facts.state(ctx).pending:
            return None
        return self.inner.check(ctx)


class DeployStep(Step):
    name = "deploy"

    def __init__(self, facts: MigrationFacts, allow_edited: bool):
        self.facts, self.allow_edited = facts, allow_edited
        engine, command = engine_settings(facts.env)
        self.engine, self.command = engine, command
        how = "the app's own command (app.migrations.command) on the first host" if engine == COMMAND \
            else "the native engine"
        self.title = f"deploy pending migrations with {how} (direct URL), then check nothing is pending or failed"

    def check(self, ctx: RunContext) -> Change | None:
        pending = self.facts.pending(ctx, self.facts.state(ctx))
        if not pending:
            return None
        policy = lock_policy(self.facts.env)
        how = self._describe_command() if self.engine == COMMAND else \
            f"native engine, Prisma's advisory lock, lock_timeout {policy.timeout:g} s, {policy.attempts} attempt(s)"
        details = [f"{migration.name}" for migration in pending]
        details += [f"into {self.facts.target()} ({how})", f"from {self.facts.source(ctx).where}"]
        return Change(f"apply {len(pending)} pending migration(s)", details)

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        applied = self._native(ctx) if self.engine == NATIVE else self._run_command(ctx)
        return {"engine": self.engine, "applied": applied}

    def verify(self, ctx: RunContext) -> None:
        state = self.facts.state(ctx)
        if state.failed or state.pending:
            raise failure_report(state, f"after deploying, migrate.status on {self.facts.target()} says: "
                                        f"{state.verdict}")

    # --- engines ---

    def _native(self, ctx: RunContext) -> list[str]:
        def on_event(event: str, detail: str) -> None:
            ctx.journal.write("migration", kind=event, detail=detail)  # each attempt of each migration
            if event == "waiting":
                ctx.log(f"waiting for the Prisma migration lock, held by {detail}")
            elif event == "lock-timeout":
                ctx.output.warn(f"lock timeout: {detail}")
            else:
                ctx.log(f"{event} {detail}")

        try:
            return apply_pending(self.facts.url(), self.facts.source(ctx).migrations, on_event=on_event,
                                 allow_edited=self.allow_edited, application_name=ctx.label,
                                 policy=lock_policy(self.facts.env))
        except StepFailed as error:
            raise failure_report(self.facts.state(ctx), error.message, fallback=error) from None

    def _run_command(self, ctx: RunContext) -> list[str]:
        before = set(self.facts.state(ctx).pending)
        host, directory = self._host_and_dir()
        url = self.facts.url()
        with connect(host) as connection:
            result = _run_in_app_dir(connection, directory, self.command, url)
        for line in (result.stdout + result.stderr).strip().splitlines()[-LOG_LINES:]:
            ctx.log(line)
        state = self.facts.state(ctx)
        if not result.ok:
            raise failure_report(state, f"`{self.command}` exited with code {result.exit_code} on host "
                                        f"{host.name} ({host.target}) in {directory}",
                                 fallback=StepFailed("", hint="read the command's output above"))
        return sorted(before - set(state.pending))

    def _host_and_dir(self) -> tuple[Any, str]:
        hosts = self.facts.env.host_configs()
        if not hosts:
            raise self.facts.env.missing("hosts")
        settings = plain(resolve(self.facts.env.app_settings(hosts[0].name))) or {}
        if not settings.get("dir"):
            raise self.facts.env.missing("app.dir")
        return hosts[0], str(settings["dir"])

    def _describe_command(self) -> str:
        hosts = self.facts.env.host_configs()
        where = f"host {hosts[0].name}" if hosts else "the first host (none configured)"
        return f"`{self.command}` on {where}"


def _run_in_app_dir(connection: HostConnection, directory: str, command: str, url: Secret) -> Any:
    """The app's own command in its directory; the direct URL travels as a secret variable (stdin)."""
    return connection.run(f"cd {shell_path(directory)} && {command}", check=False,
                          timeout=COMMAND_TIMEOUT_SECONDS, environment={"DATABASE_URL": url, "DIRECT_URL": url})


def failure_report(state: MigrationState, message: str, *, fallback: OpsError | None = None) -> OpsError:
    """StepFailed (exit 1) with the failing migrations' logs from `_prisma_migrations`."""
    failed = [entry for entry in state.entries if entry.status == "failed"]
    lines = [message]
    for entry in failed:
        logs = (entry.logs or "(no logs recorded)").strip().splitlines()[-LOG_LINES:]
        lines.append(f"  logs of {entry.name}:")
        lines += [f"    {redact(line)}" for line in logs]
    if state.pending:
        lines.append(f"  still pending: {', '.join(state.pending)}")
    hint = resolve_hint(failed[0].name) if failed else (fallback.hint if fallback else None)
    return StepFailed("\n".join(lines), hint=hint or "run `inv migrate.status` and read the logs")


class ResolveStep(Step):
    """`prisma migrate resolve`: mark a failed migration rolled back, or a migration applied by hand."""

    name = "resolve"

    def __init__(self, facts: MigrationFacts, migration: str, action: str):
        self.facts, self.migration, self.action = facts, migration, action
        self.title = f"mark migration {migration} as {action.replace('-', ' ')}"

    def check(self, ctx: RunContext) -> Change | None:
        status = self._status(ctx)
        if self.action == "applied":
            return None if status == "applied" else Change(f"record {self.migration} as applied (was {status})")
        if status != "failed":
            raise CheckFailed(f"migration {self.migration} is {status}, not failed, in {self.facts.target()}: "
                              "there is nothing to mark rolled back", hint="run migrate.status")
        return Change(f"mark the failed attempt of {self.migration} rolled back (it will be pending again)")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        url = self.facts.url()
        with pg.connect(url, application_name=ctx.label[:63], autocommit=True) as connection:
            use_prisma_schema(connection, url, create=self.action == "applied")
            if self.action == "applied":
                mark_applied(connection, self._local(ctx))
            else:
                mark_rolled_back(connection, self.migration)
        return {"migration": self.migration, "action": self.action}

    def verify(self, ctx: RunContext) -> None:
        status = self._status(ctx)
        if status == "failed" or (self.action == "applied" and status != "applied"):
            raise StepFailed(f"migration {self.migration} is still {status} in {self.facts.target()}")

    def _status(self, ctx: RunContext) -> str:
        self._local(ctx)  # a name that is not a migration folder is a usage error
        statuses = {entry.name: entry.status for entry in self.facts.state(ctx).entries}
        return statuses[self.migration]

    def _local(self, ctx: RunContext) -> LocalMigration:
        for migration in self.facts.source(ctx).migrations:
            if migration.name == self.migration:
                return migration
        raise UsageError(f"no migration named {self.migration} in {self.facts.source(ctx).where}",
                         hint="use the folder name, as migrate.status lists it")


# --- building ---------------------------------------------------------------------------------


def migrate_steps(env: Environment, *, allow_edited: bool = False, allow_destructive: bool = False,
                  allow_locks: bool = False, backup: bool | None = None, dbname: str | None = None,
                  backup_id: str | None = None) -> list[Step]:
    """Gate, lint, pre-migration backup (protected environments), deploy + verify: for migrate,
    provision and the drill to compose. `dbname` migrates another database of the environment's
    server (the drill's restored copy); its backup is then off unless `backup=True`."""
    if backup is False and env.protected and dbname is None:
        raise UsageError(f"{env.name} is protected: a migration there always takes a backup first",
                         hint="drop --no-backup; the pre-migration backup is what makes a bad migration recoverable")
    facts = MigrationFacts(env, dbname)
    steps: list[Step] = [GateStep(facts, allow_edited), LintStep(facts, allow_destructive, allow_locks)]
    if backup if backup is not None else (env.protected and dbname is None):
        steps += [WhenPending(step, facts) for step in backup_steps(env, backup_id)]
    steps.append(DeployStep(facts, allow_edited))
    return steps


def backup_steps(env: Environment, backup_id: str | None) -> list[Step]:
    """The backup runbook's own steps (dump, manifest, metrics), tagged pre-migrate, no retention."""
    arguments: dict[str, Any] = {"tags": ["pre-migrate"], "no_prune": True}
    if backup_id:
        arguments["backup_id"] = backup_id
    return backup_runbook(env, **arguments).steps
