"""inv restore --table/--schema --into: only some objects of a backup, restored into a scratch database.

The download is streamed into `pg_restore -t/-n`, as a whole restore's is (ops/restore_db.py), into a
database opsbook creates on the target's server and marks as its own (a COMMENT): a later run may replace
a database carrying that mark, never another one. The live database is not touched. restore.diff
(ops/table_diff_steps.py) loads its copy the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ops import pg, pg_url, processes, restore_db
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import CheckFailed, StepFailed, UsageError
from ops.output import ProgressLines, human_size
from ops.restore_steps import Plan, plan_for

if TYPE_CHECKING:
    import psycopg

    from ops.backup_manifest import Manifest
    from ops.inventory import Environment

SCRATCH_MARK = "opsbook scratch database"
NEVER_SCRATCH = ("postgres", "template0", "template1")


def selection(tables: list[str], schema: str | None) -> tuple[str, ...]:
    """pg_restore's options for these objects: -n SCHEMA (with -t, only that schema's tables), -t TABLE."""
    options = ["--schema", schema] if schema else []
    for table in tables:
        options += ["--table", table]
    return tuple(options)


def selected_tables(manifest: Manifest, tables: list[str], schema: str | None) -> list[str]:
    """The manifest's "schema.table" names the selection restores; UsageError naming one the backup lacks."""
    known = manifest.row_counts
    if tables:
        chosen = [name for name in known if name.partition(".")[2] in tables
                  and (schema is None or name.partition(".")[0] == schema)]
        absent = [table for table in tables if not any(name.partition(".")[2] == table for name in chosen)]
    else:
        chosen = [name for name in known if name.partition(".")[0] == schema]
        absent = [] if chosen else [f"{schema}.*"]
    if absent:
        raise UsageError(f"backup {manifest.id} has no table {', '.join(absent)}"
                         + (f" in schema {schema}" if schema and tables else ""),
                         hint=f"its tables: {', '.join(sorted(known)[:20]) or 'none'} (names are case-sensitive)")
    return sorted(chosen)


def claim_scratch(conn: psycopg.Connection, name: str, live: str, owner: str, about: str) -> bool:
    """Create `name` marked as opsbook's scratch; a scratch left by an earlier run is replaced, any other
    database refused. Returns whether one was replaced."""
    if name in (live, *NEVER_SCRATCH):
        raise UsageError(f"--into {name}: that is {'the live database' if name == live else 'a system database'}",
                         hint="name a new database for the restored copy; opsbook creates it")
    replaced = pg.database_exists(conn, name)
    if replaced and not is_scratch(conn, name):
        raise UsageError(f"database {name} already exists and is not a scratch database opsbook created: "
                         "refusing to restore into it", hint="name a new database for --into; opsbook creates it")
    if replaced:
        pg.drop_database(conn, name)
    with processes.interrupts_held():  # made, it is ours to drop: an interrupt lands in the block below
        pg.create_database(conn, name, owner=owner)
    try:
        conn.execute(f"COMMENT ON DATABASE {pg.quote_identifier(conn, name)} IS "
                     f"{pg.quote_literal(conn, f'{SCRATCH_MARK}: {about}')}")
    except BaseException:  # unmarked, a later run would refuse to replace it
        pg.drop_database(conn, name)
        raise
    return replaced


def is_scratch(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                       (name,)).fetchone()
    return bool(row and row[0] and str(row[0]).startswith(SCRATCH_MARK))


def load_selection(ctx: RunContext, plan: Plan, database: str, options: tuple[str, ...], tables: list[str]
                   ) -> dict[str, int]:
    """Stream the backup into `database` (already created) through pg_restore `options`; the restored
    tables' row counts, checked against the manifest."""
    manifest = plan.manifest(ctx)
    download_label = ProgressLines(ctx.log, "downloaded")
    restore_db.restore_streamed(plan.tool(ctx), plan.url(ctx), database, plan.storage(ctx), manifest,
                                identities=plan.identities(), cross_environment=plan.cross_environment,
                                selection=options, on_progress=download_label)
    with pg.connect(pg_url.with_database(plan.url(ctx), database), application_name=ctx.label[:63]) as connection:
        counts = pg.table_row_counts(connection)
    wrong = [f"{name}: {counts.get(name, 'missing')} rows, manifest: {manifest.row_counts[name]}"
             for name in tables if counts.get(name) != manifest.row_counts[name]]
    if wrong:
        raise CheckFailed(f"backup {manifest.id} restored into {database} does not match its manifest: "
                          f"{'; '.join(wrong)}", hint="try another backup (`inv backup.list`)")
    return {name: counts[name] for name in tables}


class SelectionStep(Step):
    """Restore the chosen objects into the named scratch database (kept: that is what it is for)."""

    name = "load"

    def __init__(self, plan: Plan, into: str, tables: list[str], schema: str | None):
        self.plan, self.into, self.tables, self.schema = plan, into, tables, schema
        what = ", ".join(tables) if tables else f"schema {schema}"
        self.what = what + (f" (schema {schema})" if tables and schema else "")
        self.title = f"restore {self.what} of backup {plan.backup} of {plan.source.name} into a scratch database {into}"

    def check(self, ctx: RunContext) -> Change | None:
        manifest = self.plan.manifest(ctx)
        chosen = selected_tables(manifest, self.tables, self.schema)
        return Change(f"create {self.into} and restore {', '.join(chosen)} of {manifest.id} into it "
                      f"(download {human_size(manifest.size)})",
                      [*self.plan.describe_source(ctx), f"on {ctx.env.name}; the live database "
                                                        f"{self.plan.database} is not touched"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        plan = self.plan
        manifest = plan.manifest(ctx)
        chosen = selected_tables(manifest, self.tables, self.schema)
        with plan.maintenance(ctx) as connection:
            owner = restore_db.database_owner(connection, plan.database) or pg_url.parse_url(plan.url(ctx)).user
            if claim_scratch(connection, self.into, plan.database, owner, f"{self.what} of backup {manifest.id}"):
                ctx.log(f"replaced {self.into}, a scratch database of an earlier restore")
        try:
            counts = load_selection(ctx, plan, self.into, selection(self.tables, self.schema), chosen)
        except BaseException:
            self.undo(ctx, change)
            raise
        ctx.log(f"{self.into} holds {', '.join(f'{name} ({rows} rows)' for name, rows in counts.items())} "
                f"from backup {manifest.id}, as in its manifest; drop it when done")
        return {"backup_id": manifest.id, "database": self.into, "tables": counts}

    def verify(self, ctx: RunContext) -> None:
        with self.plan.maintenance(ctx) as connection:
            if not pg.database_exists(connection, self.into):
                raise StepFailed(f"{self.into} is missing after the restore")

    def undo(self, ctx: RunContext, change: Change) -> None:
        with self.plan.maintenance(ctx) as connection:
            if is_scratch(connection, self.into):
                pg.drop_database(connection, self.into)


def build(env: Environment, **arguments: Any) -> Runbook:
    tables, schema, into = list(arguments.get("tables") or []), arguments.get("schema"), arguments.get("into")
    if not into:
        raise UsageError("--table/--schema restore into a scratch database: give it a name with --into NAME",
                         hint="e.g. --into shop_user_check; opsbook creates it; the live database is not touched")
    plan = plan_for(env, arguments)
    return Runbook("restore", f"Restore part of a backup of {plan.source.name} into {into} on {env.name}",
                   [SelectionStep(plan, into, tables, schema)], arguments=arguments, locks=(),
                   confirm_exempt="restores into a new scratch database; the live database is not touched")
