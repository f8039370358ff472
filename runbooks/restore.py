"""inv restore: a verified restore with an atomic swap.

1. download the backup and check its size and sha256 (decrypting and decompressing
   it into a private file in the state dir) before anything touches the target;
2. restore into a new database `<db>__restore_<stamp>` (pg_restore -j 2), compare
   its row counts with the manifest;
3. only then swap names: `<db>` → `<db>__old_<stamp>`, the restored copy → `<db>`,
   dropping the old one unless --keep-old.

Ownership: objects are restored with --no-owner, owned by the target's own database
role (the user of its direct URL), so the app that connects as that role owns its
tables whichever environment the dump came from. Across environments ACLs are
dropped too (--no-acl): the source's grantees rarely exist on the target.
An interruption before step 3 leaves the target untouched; the scratch database is
dropped on the way out, or by the next restore if the process was killed.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import task

from ops.cli import environment, helps, make_output, opstask
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import StepFailed
from ops.output import human_size

if TYPE_CHECKING:
    from ops.backup_manifest import Manifest
    from ops.inventory import Environment
    from ops.storage import Storage


class Plan:
    """What the steps share: the source, the chosen backup, the target's names."""

    def __init__(self, target: Environment, source: Environment, backup: str, database: str, stamp: datetime,
                 keep_old: bool, identity: str | None):
        from ops.restore_db import side_name

        self.target, self.source, self.backup, self.database = target, source, backup, database
        self.keep_old, self.identity = keep_old, identity
        self.scratch = side_name(database, "restore", stamp)
        self.old = side_name(database, "old", stamp)
        self._manifest: Manifest | None = None

    @property
    def cross_environment(self) -> bool:
        return self.source.name != self.target.name

    def storage(self, ctx: RunContext) -> Storage:
        if not self.cross_environment:
            return ctx.storage("backups")
        from ops.storage import open_storage

        return open_storage(self.source.storage_config("backups"))

    def manifest(self, ctx: RunContext) -> Manifest:
        """The chosen backup, resolved once per run ("latest" must not change between steps)."""
        if self._manifest is None:
            from runbooks.backup_verify import select

            self._manifest = select(self.storage(ctx), self.backup)[0]
        return self._manifest

    def identities(self) -> list[Any] | None:
        from runbooks.backup_verify import identities_for

        assert self._manifest is not None
        return identities_for(self.source, self.identity, [self._manifest], required=True)

    def archive(self, ctx: RunContext) -> Path:
        return ctx.env.inventory.state_dir / "restore" / f"{ctx.run_id}.pgc"

    def url(self, ctx: RunContext) -> Any:
        from ops import pg

        return pg.with_database(ctx.env.database_url(direct=True), self.database)

    def maintenance(self, ctx: RunContext) -> Any:
        from ops import restore_db

        return restore_db.maintenance_connection(ctx.env.admin_url(), ctx.label)

    def tool(self, ctx: RunContext) -> Any:
        """pg_restore able to read this dump for this server; CheckFailed naming the versions otherwise."""
        from ops import pg, restore_db

        manifest = self.manifest(ctx)
        with self.maintenance(ctx) as connection:
            major = pg.server_version(connection)[0]
        where = pg.parse_url(ctx.env.admin_url()).describe()
        return pg.find_client_tool("pg_restore", restore_db.readable_by(manifest, major, where))


class FetchStep(Step):
    name = "fetch"
    changes_data = False

    def __init__(self, plan: Plan):
        self.plan = plan
        self.title = f"download backup {plan.backup} of {plan.source.name} and check its sha256 before anything else"

    def check(self, ctx: RunContext) -> Change | None:

        manifest = self.plan.manifest(ctx)
        tool = self.plan.tool(ctx)
        self.plan.identities()  # an encrypted backup without its key is refused before the download
        return Change(f"download {manifest.id} ({human_size(manifest.size)}) from {self.plan.source.name} "
                      "and verify it", [f"{self.plan.storage(ctx).describe()}: {manifest.object.key}",
                                        f"taken {manifest.started_at} from {manifest.database.target} "
                                        f"(PostgreSQL {manifest.database.server_version}); restored with "
                                        f"pg_restore {tool.version}",
                                        f"decoded into {self.plan.archive(ctx)} "
                                        f"({human_size(manifest.object.dump_size)})"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        from ops import dump

        manifest = self.plan.manifest(ctx)
        archive = self.plan.archive(ctx)
        _remove_stale_archives(archive.parent, keep=archive)
        fetched = dump.fetch_verified(self.plan.storage(ctx), manifest, path=archive,
                                      identities=self.plan.identities(),
                                      on_progress=dump.ProgressLines(ctx.log, "downloaded"))
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


class LoadStep(Step):
    name = "load"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.title = f"restore into a new database {plan.scratch} and compare row counts with the manifest"

    def check(self, ctx: RunContext) -> Change | None:
        return Change(f"create {self.plan.scratch} and pg_restore -j 2 into it",
                      [f"on {ctx.env.name}; the live database {self.plan.database} is not touched"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        from ops import pg, restore_db

        archive = Path((ctx.state.get("fetch") or {}).get("archive") or self.plan.archive(ctx))
        manifest = self.plan.manifest(ctx)
        url = self.plan.url(ctx)
        with self.plan.maintenance(ctx) as connection:
            for leftover in restore_db.leftovers(connection, self.plan.database, "restore"):
                ctx.log(f"dropping {leftover}, left by an interrupted restore")
                pg.drop_database(connection, leftover)
            owner = restore_db.database_owner(connection, self.plan.database) or pg.parse_url(url).user
            pg.create_database(connection, self.plan.scratch, owner=owner)
        try:
            restore_db.restore_archive(self.plan.tool(ctx), url, self.plan.scratch, str(archive),
                                       cross_environment=self.plan.cross_environment)
            counts = restore_db.check_row_counts(manifest, url, self.plan.scratch, ctx.label)
        except BaseException:  # interrupted or failed: the target keeps no trace of this run
            self.undo(ctx, change)
            raise
        finally:
            archive.unlink(missing_ok=True)
        ctx.log(f"{len(counts)} tables, {sum(counts.values())} rows: as in the manifest")
        return {"database": self.plan.scratch, "owner": owner, "tables": len(counts), "rows": sum(counts.values())}

    def verify(self, ctx: RunContext) -> None:
        from ops import pg

        with self.plan.maintenance(ctx) as connection:
            if not pg.database_exists(connection, self.plan.scratch):
                raise StepFailed(f"{self.plan.scratch} is missing after the restore")

    def undo(self, ctx: RunContext, change: Change) -> None:
        from ops import pg

        with self.plan.maintenance(ctx) as connection:
            pg.drop_database(connection, self.plan.scratch)


class SwapStep(Step):
    name = "swap"

    def __init__(self, plan: Plan):
        self.plan = plan
        ending = f"kept as {plan.old}" if plan.keep_old else "dropped"
        self.title = f"swap {plan.database} for the restored copy (its sessions are ended; the old one is {ending})"

    def check(self, ctx: RunContext) -> Change | None:
        plan = self.plan
        return Change(f"make {plan.scratch} the database {plan.database}",
                      [f"end the sessions on {plan.database} and rename it {plan.old}",
                       f"rename {plan.scratch} to {plan.database}",
                       f"keep {plan.old}" if plan.keep_old else f"drop {plan.old}"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        from ops import pg, restore_db

        plan = self.plan
        with plan.maintenance(ctx) as connection:
            had_old = restore_db.swap(connection, plan.database, plan.scratch, plan.old)
            if had_old and not plan.keep_old:
                pg.drop_database(connection, plan.old)
        ctx.log(f"{plan.database} now holds backup {plan.manifest(ctx).id}"
                + (f"; the previous one is {plan.old}" if had_old and plan.keep_old else ""))
        return {"database": plan.database, "old": plan.old if had_old and plan.keep_old else None}

    def verify(self, ctx: RunContext) -> None:
        from ops import pg

        with self.plan.maintenance(ctx) as connection:
            if pg.database_exists(connection, self.plan.scratch) or not pg.database_exists(connection,
                                                                                           self.plan.database):
                raise StepFailed(f"the swap of {self.plan.database} did not complete",
                                 hint=f"look at the databases on the server: {self.plan.scratch}, {self.plan.old}")


def build(env: Environment, **arguments: Any) -> Runbook:
    from ops.journal import utc_now
    from runbooks.backup import database_name

    source_name = arguments.get("source") or env.name
    source = env if source_name == env.name else _environment(source_name)
    database = arguments.get("database") or database_name(env)
    plan = Plan(env, source, str(arguments.get("backup") or "latest"), database, utc_now(),
                bool(arguments.get("keep_old")), arguments.get("identity"))
    title = f"Restore {env.name} ({database}) from a backup of {source.name}"
    return Runbook("restore", title, [FetchStep(plan), LoadStep(plan), SwapStep(plan)], arguments=arguments,
                   locks=("environment",))


def _environment(name: str) -> Environment:
    from ops.cli import environment as load

    return load(name)


@task(help=helps("env", "dry_run", "confirm", "json", from_="the environment whose backup to restore "
                 "(default: the target itself)", backup="backup id, or latest (default)",
                 database="the database to replace (default: the target's)",
                 keep_old="keep the replaced database as <db>__old_<stamp>",
                 identity="age identity file to decrypt with (default: the source's backups.identity_file)"))
@opstask
def restore(c, env=None, from_=None, backup="latest", database=None, keep_old=False, identity=None,
            dry_run=False, confirm=None, json=False):
    """Restore a verified backup into a new database, compare row counts, then swap it in."""
    from runbooks.backup import run

    output = make_output(json)
    target = environment(env, output=output)
    runbook = build(target, source=from_, backup=backup, database=database, keep_old=keep_old, identity=identity)

    def result(ctx: RunContext) -> dict[str, Any]:
        return {"restored": {**(ctx.state.get("fetch") or {}), **(ctx.state.get("swap") or {})}}

    run(runbook, target, output, dry_run=dry_run, confirm=confirm, result=result)
