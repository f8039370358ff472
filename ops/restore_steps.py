"""The restore runbook's steps and builder: a verified restore with an atomic swap (`inv restore`).

1. download the backup, check its size and sha256, and restore it into a new database
   `<db>__restore_<stamp>`; compare that database's row counts with the manifest;
2. only then swap names: `<db>` → `<db>__old_<stamp>`, the restored copy → `<db>`,
   dropping the old one unless --keep-old.

Ownership: objects are restored with --no-owner, owned by the target's own database
role (the user of its direct URL), so the app that connects as that role owns its
tables whichever environment the dump came from. Across environments ACLs are
dropped too (--no-acl): the source's grantees rarely exist on the target.
An interruption before the swap leaves the target untouched; the scratch database is
dropped on the way out, or by the next restore if the process was killed.

A backup of several databases (`database.names`) restores each into the database of its name (into
another environment: see target_databases): every one is loaded into its own scratch database and
checked first, and the swaps come only after all of them passed (a failure drops every scratch
database; no live one is touched). `--database NAME` restores one of them.

Two ways to fill the scratch database (`--jobs`):
- streamed (jobs 1, the default on machines with up to 2 CPUs): the download is decoded
  straight into pg_restore, so downloading and restoring overlap; the checksum is
  complete when the download ends, and a mismatch drops the scratch database;
- parallel (jobs N > 1, the default with more CPUs): the dump is decoded into a private
  file in the state dir and verified first, then `pg_restore -j N` loads it.
"""


from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops import cluster_globals, fetch, pg, pg_tools, pg_url, restore_db
from ops.backup_copies import UNREACHABLE, open_copy, use_a_copy
from ops.backup_verify import identities_for, select
from ops.cli import environment as load_environment
from ops.clock import utc_now
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import StepFailed, UsageError
from ops.output import human_size
from ops.restore_db import side_name
from ops.storage import EarlyRead, open_storage

if TYPE_CHECKING:
    from ops.backup_manifest import Manifest
    from ops.inventory import Environment
    from ops.storage import Storage


class Plan:
    """What the steps share: the source, the chosen backup, the target's names."""

    def __init__(self, target: Environment, source: Environment, backup: str, database: str, stamp: datetime,
                 keep_old: bool, identity: str | None, jobs: int = 1, copy: str | None = None,
                 part_name: str | None = None):
        self.target, self.source, self.backup, self.database = target, source, backup, database
        self.part_name = part_name  # --database: which database of a backup of several (a usage error if it holds none)
        self.keep_old, self.identity, self.jobs, self.copy, self.stamp = keep_old, identity, jobs, copy, stamp
        self._copy_storage: Storage | None = None
        self.owners = False  # keep the dump's owners and grants (its roles were restored first: --with-globals)
        self.scratch = side_name(database, "restore", stamp)
        self.old = side_name(database, "old", stamp)
        self._manifest: Manifest | None = None
        self._tool: Any = None

    @property
    def cross_environment(self) -> bool:
        return self.source.name != self.target.name

    def storage(self, ctx: RunContext | None) -> Storage:
        """The source's backup bucket, or with --copy that copy of it (ctx None: while the runbook is built)."""
        if self.copy is not None:
            if self._copy_storage is None:
                self._copy_storage = open_copy(self.source, self.copy)
            return self._copy_storage
        if not self.cross_environment and ctx is not None:
            return ctx.storage("backups")

        return open_storage(self.source.storage_config("backups"))

    def manifest(self, ctx: RunContext) -> Manifest:
        """The chosen backup, resolved once per run ("latest" must not change between steps). An unreachable
        backup bucket's error names the copies to restore from instead."""
        if self._manifest is None:
            whole = self.whole(ctx)
            self._manifest = whole if not whole.databases else whole.part(self.part_name)
        return self._manifest

    def whole(self, ctx: RunContext | None) -> Manifest:
        """The chosen backup's manifest with every database it holds."""
        try:
            return select(self.storage(ctx), self.backup)[0]
        except UNREACHABLE as error:
            raise (error if self.copy is not None else use_a_copy(self.source, error)) from None

    def for_part(self, part: Manifest, into: str) -> Plan:
        """The plan of one database of a backup of several, restored into the target's database `into`."""
        plan = Plan(self.target, self.source, part.id, into, self.stamp, self.keep_old, self.identity,
                    self.jobs, self.copy, part.database.name)
        plan._manifest, plan._copy_storage, plan.owners = part, self._copy_storage, self.owners
        return plan

    def restored_what(self, ctx: RunContext) -> str:
        """What the target holds after the swap, for its log line."""
        return f"backup {self.manifest(ctx).id}"

    def identities(self) -> list[Any] | None:
        assert self._manifest is not None
        return identities_for(self.source, self.identity, [self._manifest], required=True)

    def archive(self, ctx: RunContext) -> Path:
        name = ctx.run_id if self.part_name is None else f"{ctx.run_id}-{self.database}"
        return ctx.env.inventory.state_dir / "restore" / f"{name}.pgc"

    def url(self, ctx: RunContext) -> Any:
        return pg_url.with_database(ctx.env.database_url(direct=True), self.database)

    def maintenance(self, ctx: RunContext) -> Any:
        return restore_db.shared_maintenance(ctx, ctx.env.admin_url())

    def tool(self, ctx: RunContext) -> Any:
        """pg_restore able to read this dump for this server; CheckFailed naming the versions otherwise."""
        if self._tool is None:
            self._tool = self._find_tool(ctx)
        return self._tool

    def _find_tool(self, ctx: RunContext) -> Any:
        manifest = self.manifest(ctx)
        with self.maintenance(ctx) as connection:
            major = pg.server_version(connection)[0]
        where = pg_url.parse_url(ctx.env.admin_url()).describe()
        return pg_tools.find_client_tool("pg_restore", restore_db.readable_by(manifest, major, where))


    def create_scratch(self, ctx: RunContext) -> str:
        """Drop scratch databases left by killed restores, create this run's; returns its owner."""
        with self.maintenance(ctx) as connection:
            for leftover in restore_db.leftovers(connection, self.database, "restore"):
                ctx.log(f"dropping {leftover}, left by an interrupted restore")
                pg.drop_database(connection, leftover)
            owner = restore_db.database_owner(connection, self.database) or pg_url.parse_url(self.url(ctx)).user
            pg.create_database(connection, self.scratch, owner=owner)
        return owner

    def drop_scratch(self, ctx: RunContext) -> None:
        with self.maintenance(ctx) as connection:
            pg.drop_database(connection, self.scratch)

    def check_counts(self, ctx: RunContext) -> dict[str, int]:
        counts = restore_db.check_row_counts(self.manifest(ctx), self.url(ctx), self.scratch, ctx.label)
        ctx.log(f"{len(counts)} tables, {sum(counts.values())} rows: as in the manifest")
        return counts

    def scratch_exists(self, ctx: RunContext) -> None:
        with self.maintenance(ctx) as connection:
            if not pg.database_exists(connection, self.scratch):
                raise StepFailed(f"{self.scratch} is missing after the restore")

    def describe_source(self, ctx: RunContext) -> list[str]:
        manifest = self.manifest(ctx)
        tool = self.tool(ctx)
        self.identities()  # an encrypted backup without its key is refused before the download
        return [f"{self.storage(ctx).describe()}: {manifest.object.key}",
                f"taken {manifest.started_at} from {manifest.database.target} "
                f"(PostgreSQL {manifest.database.server_version}); restored with pg_restore {tool.version}"]


def named(step: str, plan: Plan, several: bool) -> str:
    """A step's name; with several databases, one step of each kind per database."""
    return f"{step}-{plan.database}" if several else step


class ScratchLoad(Step):
    """Loading into the run's scratch database, dropped again on any failure: the target keeps no trace."""

    def __init__(self, plan: Plan, several: bool = False):
        self.plan = plan
        self.name = named("load", plan, several)

    def into_scratch(self, ctx: RunContext, change: Change, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Create the scratch database, `load()` into it and check its row counts."""
        plan = self.plan
        owner = plan.create_scratch(ctx)
        try:
            loaded = load()
            counts = plan.check_counts(ctx)
        except BaseException:  # interrupted, damaged or failed
            self.undo(ctx, change)
            raise
        return {**loaded, "database": plan.scratch, "owner": owner, "tables": len(counts),
                "rows": sum(counts.values())}

    def verify(self, ctx: RunContext) -> None:
        self.plan.scratch_exists(ctx)

    def undo(self, ctx: RunContext, change: Change) -> None:
        self.plan.drop_scratch(ctx)


class StreamStep(ScratchLoad):
    """Download, verify and restore in one pass (see the module's docstring)."""

    def __init__(self, plan: Plan, several: bool = False):
        super().__init__(plan, several)
        what = f"the {plan.database} dump of backup {plan.backup}" if several else f"backup {plan.backup}"
        self.title = (f"download {what} of {plan.source.name}, restore it into a new database "
                      f"{plan.scratch} as it arrives, check its sha256 and row counts")

    def check(self, ctx: RunContext) -> Change | None:
        manifest = self.plan.manifest(ctx)
        return Change(f"download {manifest.id} ({human_size(manifest.size)}) from {self.plan.source.name}, "
                      f"restoring it into {self.plan.scratch} as it arrives", [*self.plan.describe_source(ctx),
                                               f"on {ctx.env.name}; the live database {self.plan.database} is "
                                               "not touched (a checksum or row-count mismatch drops the copy)"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        plan = self.plan
        manifest = plan.manifest(ctx)

        def stream() -> dict[str, Any]:
            fetched = restore_db.restore_streamed(
                plan.tool(ctx), plan.url(ctx), plan.scratch, plan.storage(ctx), manifest,
                identities=plan.identities(), cross_environment=plan.cross_environment, owners=plan.owners,
                on_progress=ctx.progress("downloaded and restored", total_bytes=manifest.size),
                opened=download)
            ctx.log(f"{manifest.id}: size and sha256 match the manifest ({fetched.sha256})")
            return {"backup_id": manifest.id, "sha256": fetched.sha256}

        download = EarlyRead(plan.storage(ctx), manifest.object.key)  # the server's first byte, while we set up
        try:
            return self.into_scratch(ctx, change, stream)
        finally:
            download.close()  # already closed once read; here also when it never was


class FetchStep(Step):
    def __init__(self, plan: Plan, several: bool = False):
        self.plan = plan
        self.name = named("fetch", plan, several)
        what = f"the {plan.database} dump of backup" if several else "backup"
        self.title = (f"download {what} {plan.backup} of {plan.source.name} and check its sha256 before "
                      "anything else")

    def check(self, ctx: RunContext) -> Change | None:
        manifest = self.plan.manifest(ctx)
        return Change(f"download {manifest.id} ({human_size(manifest.size)}) from {self.plan.source.name} "
                      "and verify it", [*self.plan.describe_source(ctx),
                                        f"decoded into {self.plan.archive(ctx)} "
                                        f"({human_size(manifest.object.dump_size)})"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        manifest = self.plan.manifest(ctx)
        archive = self.plan.archive(ctx)
        _remove_stale_archives(archive.parent, keep=archive)
        fetched = fetch.fetch_verified(self.plan.storage(ctx), manifest, path=archive,
                                       identities=self.plan.identities(),
                                       on_progress=ctx.progress("downloaded", total_bytes=manifest.size))
        ctx.log(f"{manifest.id}: size and sha256 match the manifest ({fetched.sha256})")
        return {"backup_id": manifest.id, "archive": str(archive), "sha256": fetched.sha256}

    def verify(self, ctx: RunContext) -> None:
        if not self.plan.archive(ctx).exists():
            raise StepFailed(f"{self.plan.archive(ctx)} is missing after the download")

    def undo(self, ctx: RunContext, change: Change) -> None:
        self.plan.archive(ctx).unlink(missing_ok=True)


def _remove_stale_archives(directory: Path, keep: Path) -> None:
    """Decoded dumps of restores that were killed: they hold a whole database, do not let them pile up."""
    for stale in directory.glob("*.pgc") if directory.exists() else []:
        if stale != keep:
            stale.unlink(missing_ok=True)


class LoadStep(ScratchLoad):
    def __init__(self, plan: Plan, several: bool = False):
        super().__init__(plan, several)
        self.fetched = named("fetch", plan, several)
        self.title = f"restore into a new database {plan.scratch} and compare row counts with the manifest"

    def check(self, ctx: RunContext) -> Change | None:
        return Change(f"create {self.plan.scratch} and pg_restore -j {self.plan.jobs} into it",
                      [f"on {ctx.env.name}; the live database {self.plan.database} is not touched"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        plan = self.plan
        archive = Path((ctx.state.get(self.fetched) or {}).get("archive") or plan.archive(ctx))

        def load() -> dict[str, Any]:
            restore_db.restore_archive(plan.tool(ctx), plan.url(ctx), plan.scratch, str(archive), jobs=plan.jobs,
                                       cross_environment=plan.cross_environment, owners=plan.owners)
            return {}

        try:
            return self.into_scratch(ctx, change, load)
        finally:
            archive.unlink(missing_ok=True)


class RolesStep(Step):
    """--with-globals: the roles the target server lacks, created before the restore (ops/cluster_globals.py)."""

    name = "roles"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.title = (f"create the roles of backup {plan.backup} missing on the target server (existing ones are "
                      "left as they are), so the restore keeps its owners and grants")

    def check(self, ctx: RunContext) -> Change | None:
        manifest = self.plan.manifest(ctx)
        stored = cluster_globals.require_globals(manifest)
        where = pg_url.parse_url(ctx.env.admin_url()).describe()
        return Change(f"create the missing roles of {manifest.id} on {where}",
                      [f"from {stored['key']}" + ("" if stored.get("role_passwords")
                                                  else " (stored without role passwords)")])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        manifest = self.plan.manifest(ctx)
        text = cluster_globals.read_globals(self.plan.storage(ctx), manifest, self.plan.identities())
        with self.plan.maintenance(ctx) as connection:
            roles = cluster_globals.create_missing_roles(connection, text)
        ctx.log(f"created {len(roles.create)} role(s): {', '.join(roles.create) or 'none missing'}"
                + "".join(f"; {role} skipped: {why}" for role, why in roles.skipped.items())
                + (f"; left out: {', '.join(roles.left_out)}" if roles.left_out else ""))
        if manifest.globals and not manifest.globals.get("role_passwords") and roles.create:
            ctx.log("the roles were stored without passwords: set those of the login roles before the app connects")
        return {"created_roles": roles.create, "skipped_roles": sorted(roles.skipped)}

    def verify(self, ctx: RunContext) -> None:
        """Created in one transaction, or the step raised."""


class SwapStep(Step):
    def __init__(self, plan: Plan, several: bool = False):
        self.plan = plan
        self.name = named("swap", plan, several)
        ending = f"kept as {plan.old}" if plan.keep_old else "dropped"
        self.title = f"swap {plan.database} for the restored copy (its sessions are ended; the old one is {ending})"

    def check(self, ctx: RunContext) -> Change | None:
        plan = self.plan
        return Change(f"make {plan.scratch} the database {plan.database}",
                      [f"end the sessions on {plan.database} and rename it {plan.old}",
                       f"rename {plan.scratch} to {plan.database}",
                       f"keep {plan.old}" if plan.keep_old else f"drop {plan.old}"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        plan = self.plan
        with plan.maintenance(ctx) as connection:
            had_old = restore_db.swap(connection, plan.database, plan.scratch, plan.old)
            if had_old and not plan.keep_old:
                pg.drop_database(connection, plan.old)
        ctx.log(f"{plan.database} now holds {plan.restored_what(ctx)}"
                + (f"; the previous one is {plan.old}" if had_old and plan.keep_old else ""))
        return {"database": plan.database, "old": plan.old if had_old and plan.keep_old else None}

    def verify(self, ctx: RunContext) -> None:
        with self.plan.maintenance(ctx) as connection:
            if pg.database_exists(connection, self.plan.scratch) or not pg.database_exists(connection,
                                                                                           self.plan.database):
                raise StepFailed(f"the swap of {self.plan.database} did not complete",
                                 hint=f"look at the databases on the server: {self.plan.scratch}, {self.plan.old}")


def plan_for(env: Environment, arguments: dict[str, Any]) -> Plan:
    """The source, backup and names a restore of `env` works with (also a partial restore's and a diff's)."""
    source_name = arguments.get("source") or env.name
    source = env if source_name == env.name else _environment(source_name)
    database = arguments.get("database") or env.database_name()
    return Plan(env, source, str(arguments.get("backup") or "latest"), database, utc_now(),
                bool(arguments.get("keep_old")), arguments.get("identity"), restore_jobs(arguments.get("jobs")),
                arguments.get("copy") or None, arguments.get("database") or None)


def build(env: Environment, **arguments: Any) -> Runbook:
    plan = plan_for(env, arguments)
    if arguments.get("with_globals"):
        plan.owners = True
    plans = [plan]
    if plan.source.database_names() is not None:  # the backups may hold several databases: read which
        whole = plan.whole(None)
        if whole.databases:
            parts = [whole.part(plan.part_name)] if plan.part_name else whole.parts()
            into = target_databases(plan, whole)
            plans = [plan.for_part(part, into[part.database.name]) for part in parts]
    several = plans[0] is not plan
    names = ", ".join(p.database for p in plans)
    title = f"Restore {env.name} ({names}) from a backup of {plan.source.name}"
    loading: list[Step] = []
    for each in plans:
        loading += ([StreamStep(each, several)] if plan.jobs == 1
                    else [FetchStep(each, several), LoadStep(each, several)])
    roles: list[Step] = [RolesStep(plans[0])] if arguments.get("with_globals") else []
    swaps: list[Step] = [SwapStep(each, several) for each in plans]  # only once every database passed its checks
    return Runbook("restore", title, [*roles, *loading, *swaps], arguments=arguments, locks=("environment",))


def target_databases(plan: Plan, whole: Manifest) -> dict[str, str]:
    """Which database of the target each database of a backup of several replaces: its own name in its own
    environment; in another, the one at the same place in the target's database.names (a list as long), or
    with --database the target's database. UsageError otherwise: never a guess that might hit the source's."""
    names = whole.database_names
    if not plan.cross_environment:
        return {name: name for name in names}
    listed = plan.target.database_names()
    if isinstance(listed, list) and len(listed) == len(names):
        return dict(zip(names, listed, strict=True))
    if plan.part_name is not None:
        return {plan.part_name: plan.target.database_name()}
    raise UsageError(f"backup {whole.id} of {plan.source.name} holds {len(names)} databases ({', '.join(names)}): "
                     f"{plan.target.name}'s database.names must list as many, in the same order, to restore into",
                     hint=f"list them in {plan.target.name}'s database.names, or restore one with --database NAME "
                          f"(into {plan.target.name}'s database)")


def restore_jobs(requested: int | str | None) -> int:
    """pg_restore jobs: 1 streams (best with up to 2 CPUs, where download and restore share them)."""
    if requested not in (None, "", 0, "0", "auto"):
        jobs = int(requested)
        if jobs < 1:
            raise UsageError(f"--jobs {requested}: give 1 (streamed) or more (parallel)")
        return jobs
    cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else min(4, cpus // 2)


def _environment(name: str) -> Environment:
    """The source may be decommissioned: its final backup is what one restores from."""
    return load_environment(name, allow_decommissioned=True)
