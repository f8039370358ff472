"""inv restore.diff: one table of a backup compared with the live table by primary key, and a reviewed SQL
file that puts the backup's rows back (applied only with --apply; on a protected environment, confirmed).

1. diff: restore the table from the backup into a scratch database `<db>__diff_<stamp>` (ops/table_restore.py),
   merge both sides in key order (ops/table_diff.py), write the file, drop the scratch database;
2. apply (with --apply): run the file on the live database, one transaction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops import pg, pg_url, restore_db, table_diff
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import StepFailed, UsageError
from ops.restore_db import side_name
from ops.restore_steps import Plan, plan_for
from ops.secrets import redact
from ops.table_restore import claim_scratch, load_selection, selected_tables, selection

if TYPE_CHECKING:
    import psycopg

    from ops.inventory import Environment

SESSION = "SET TIME ZONE 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3"


class Diff:
    """What both steps share: the table, the options, the file."""

    def __init__(self, plan: Plan, table: str, schema: str | None, where: str | None, out: Path,
                 restore_changed: bool):
        self.plan, self.where, self.out, self.restore_changed = plan, where, out, restore_changed
        self.schema, self.table = table_diff.split_name(table, schema)
        self.scratch = side_name(plan.database, "diff", plan.stamp)

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table}"

    def connect(self, ctx: RunContext, database: str) -> psycopg.Connection:
        connection = pg.connect(pg_url.with_database(self.plan.url(ctx), database), application_name=ctx.label[:63])
        connection.execute(SESSION)  # both sides print values alike
        return connection


class DiffStep(Step):
    name = "diff"

    def __init__(self, diff: Diff):
        self.diff = diff
        self.title = (f"restore {diff.label} from backup {diff.plan.backup} into {diff.scratch}, compare it with the "
                      f"live table by primary key and write {diff.out}")

    def check(self, ctx: RunContext) -> Change | None:
        diff, manifest = self.diff, self.diff.plan.manifest(ctx)
        selected_tables(manifest, [diff.table], diff.schema)
        self._live_table(ctx)  # no such table, or no primary key: refused before the download
        return Change(f"compare {diff.label} of {manifest.id} with the live table, write {diff.out}",
                      [*diff.plan.describe_source(ctx), f"in a scratch database {diff.scratch}, dropped afterwards",
                       "rows are compared" + (f" where {diff.where}" if diff.where else "")])

    def _live_table(self, ctx: RunContext) -> table_diff.Table:
        diff = self.diff
        where = f"{diff.plan.database} on {ctx.env.name}"
        with diff.connect(ctx, diff.plan.database) as connection:
            return table_diff.require_key(table_diff.read_table(connection, diff.schema, diff.table), diff.schema,
                                          diff.table, where)

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        diff, plan = self.diff, self.diff.plan
        manifest = plan.manifest(ctx)
        chosen = selected_tables(manifest, [diff.table], diff.schema)
        live = self._live_table(ctx)
        with plan.maintenance(ctx) as connection:
            for leftover in restore_db.leftovers(connection, plan.database, "diff"):
                pg.drop_database(connection, leftover)
            owner = restore_db.database_owner(connection, plan.database) or pg_url.parse_url(plan.url(ctx)).user
            claim_scratch(connection, diff.scratch, plan.database, owner, f"restore.diff of {manifest.id}")
        try:
            load_selection(ctx, plan, diff.scratch, selection([diff.table], diff.schema), chosen)
            outcome = self._compare(ctx, live, manifest.id)
        finally:
            with plan.maintenance(ctx) as connection:
                pg.drop_database(connection, diff.scratch)
        return {"backup_id": manifest.id, "table": diff.label, **outcome}

    def _compare(self, ctx: RunContext, live: table_diff.Table, backup_id: str) -> dict[str, Any]:
        diff = self.diff
        with diff.connect(ctx, diff.scratch) as theirs, diff.connect(ctx, diff.plan.database) as ours:
            backup = table_diff.read_table(theirs, diff.schema, diff.table)
            if backup is None:
                raise StepFailed(f"{diff.label} is missing from {diff.scratch} after the restore")
            notes = table_diff.common_columns(live, backup)[1]
            columns, found = table_diff.diff_tables(theirs, ours, live, backup, diff.where)
            text = table_diff.render(ours, live, columns, found, restore_changed=diff.restore_changed, header=[
                f"restore.diff: {diff.label} on {ctx.env.name} against backup {backup_id} ({diff.plan.source.name})",
                "compared by primary key " + ", ".join(column.name for column in live.keys)
                + (f" where {diff.where}" if diff.where else ""), *notes,
                "review it; `inv restore.diff … --apply` runs it (one transaction)"])
        _write_private(diff.out, text)
        for note in notes:
            ctx.log(note)
        summary = found.summary()
        ctx.log(f"{diff.label}: {summary['missing']} missing, {summary['changed']} changed, "
                f"{summary['added_since']} only live, {summary['same']} the same; wrote {diff.out} "
                f"({table_diff.statements(found, diff.restore_changed)} statement(s))")
        remaining = len(found.added) + (0 if diff.restore_changed else len(found.changed))
        return {**summary, "file": str(diff.out), "statements": table_diff.statements(found, diff.restore_changed),
                "differences": found.count, "left_alone": remaining, "backup_sha256": found.backup_hash,
                "live_sha256": found.live_hash}

    def verify(self, ctx: RunContext) -> None:
        if not self.diff.out.exists():
            raise StepFailed(f"{self.diff.out} was not written")


def _write_private(path: Path, text: str) -> None:
    """The file holds rows of the database: readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


class ApplyStep(Step):
    name = "apply"

    def __init__(self, diff: Diff):
        self.diff = diff
        self.title = f"run {diff.out} on the live database {diff.plan.database}, in one transaction"

    def check(self, ctx: RunContext) -> Change | None:
        done = ctx.state.get("diff")
        if done is not None and not done.get("statements"):
            return None
        return Change(f"run the statements of {self.diff.out} on {self.diff.plan.database} ({self.diff.label})",
                      ["re-insert the rows missing from the live table"
                       + (", restore the changed ones" if self.diff.restore_changed else ""), "one transaction"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        diff = self.diff
        statements = (ctx.state.get("diff") or {}).get("statements", 0)
        if not statements:
            ctx.log("nothing to apply")
            return {"applied": 0}
        with pg.connect(diff.plan.url(ctx), application_name=ctx.label[:63], autocommit=True) as connection:
            try:
                connection.execute(diff.out.read_text())  # the file: BEGIN; … COMMIT;
            except pg.Error as error:
                raise StepFailed(f"applying {diff.out} to {diff.label} failed: {redact(str(error).strip())}",
                                 hint="nothing was changed (one transaction); run the diff again and review the "
                                      "file") from None
        ctx.log(f"applied {statements} statement(s) to {diff.label}")
        return {"applied": statements}

    def verify(self, ctx: RunContext) -> None:
        """The transaction committed or raised: nothing is half applied."""


def build(env: Environment, **arguments: Any) -> Runbook:
    table = arguments.get("table")
    if not table:
        raise UsageError("restore.diff compares one table: give it with --table NAME",
                         hint="e.g. --table User (as the database spells it); --schema S when it is not in public")
    plan = plan_for(env, arguments)
    out = Path(arguments.get("out") or env.inventory.state_dir / "restore" /
               f"diff-{table_diff.split_name(table, arguments.get('schema'))[1]}-{plan.stamp:%Y%m%d%H%M%S}.sql")
    diff = Diff(plan, table, arguments.get("schema"), arguments.get("where"), out.absolute(),
                bool(arguments.get("restore_changed")))
    apply = bool(arguments.get("apply"))
    steps: list[Step] = [DiffStep(diff), *([ApplyStep(diff)] if apply else [])]
    return Runbook("restore.diff", f"Compare {diff.label} on {env.name} with a backup of {plan.source.name}", steps,
                   arguments=arguments, locks=("environment",) if apply else (),
                   confirm_exempt=None if apply else "reads the backup and the live table, writes a file; "
                                                     "nothing is applied without --apply")
