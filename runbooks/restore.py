"""inv restore: a verified restore with an atomic swap (the steps: ops.restore_steps).

1. download the backup, check its size and sha256, and restore it into a new database
   `<db>__restore_<stamp>`; compare that database's row counts with the manifest;
2. only then swap names: `<db>` → `<db>__old_<stamp>`, the restored copy → `<db>`,
   dropping the old one unless --keep-old.

With --to-time T (or latest), or --to-lsn LSN, the data comes from the PITR archive instead of a dump: a
scratch cluster recovered to T, copied into the new database with pg_dump | pg_restore (ops/pitr_restore.py).
With --table/--schema only those objects are restored, into a scratch database named by --into
(ops/table_restore.py); restore.diff compares one table with the live one (ops/table_diff_steps.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from invoke import Collection, task

from ops import neon, neon_restore, pitr_restore, restore_steps, table_diff_steps, table_restore
from ops.cli import OpsTask, TaskCall
from ops.engine import RunContext
from ops.errors import CheckFailed, UsageError
from ops.failure_notice import run_notifying
from ops.maintenance_steps import with_maintenance

if TYPE_CHECKING:
    from ops.engine import Runbook
    from ops.inventory import Environment

__all__ = ["build", "build_diff", "collection", "restore"]  # RUNBOOKS "restore", "restore.diff"


def build_diff(env: Environment, **arguments: Any) -> Runbook:
    """restore.diff for `inv runs.resume` (the run's own arguments) and `inv runbook.show` (TABLE: a placeholder)."""
    return table_diff_steps.build(env, **{"table": "TABLE", **arguments})


def build(env: Environment, **arguments: Any) -> Runbook:
    """A dump restore, or with --to-time a point-in-time recovery: on a Neon environment Neon's branch restore
    (ops/neon_restore.py), elsewhere the PITR archive (ops/pitr_restore.py), which --to-lsn also reads."""
    point_in_time = arguments.get("to_time") or arguments.get("to_lsn")
    if arguments.get("with_globals") and (point_in_time or arguments.get("tables") or arguments.get("schema")):
        raise UsageError("--with-globals goes with a whole restore from a dump (not --to-time/--to-lsn, --table or "
                         "--schema)",
                         hint="restore the whole backup with --with-globals, or leave it out")
    if arguments.get("tables") or arguments.get("schema"):
        if point_in_time:
            raise UsageError("--table/--schema restore from a dump: --to-time/--to-lsn cannot be combined with them",
                             hint="restore the point in time into another environment, then compare there")
        return table_restore.build(env, **arguments)
    if arguments.get("into"):
        raise UsageError("--into names the scratch database of a partial restore: give --table or --schema too",
                         hint="a whole restore replaces the database itself (see `inv -h restore`)")
    if point_in_time:
        if neon.is_neon(env):
            if arguments.get("to_lsn"):
                raise UsageError("--to-lsn reads opsbook's PITR archive; a Neon environment restores through "
                                 "Neon's branch restore", hint="give --to-time instead")
            return neon_restore.build(env, **arguments)
        return pitr_restore.build(env, **arguments)
    return restore_steps.build(env, **arguments)


@task(klass=OpsTask, name="run", default=True, iterable=["table"], help=dict(
    from_="the environment whose backup to restore (default: the target itself)",
    backup="backup id, or latest (default)",
    database="the database to replace (default: the target's); of a backup of several databases (database.names): "
             "the one to restore, into the database of its name (default: all of them)",
    keep_old="keep the replaced database as <db>__old_<stamp>",
    identity="age identity file to decrypt with (default: the source's backups.identity_file)",
    to_time="point-in-time recovery: the source as it was at this ISO-8601 time (UTC unless it says), or latest; "
            "from the PITR archive (`inv pitr.list`) through a scratch cluster on this machine, or on Neon through "
            "the branch restore, the current state kept as a branch",
    to_lsn="point-in-time recovery to a WAL position (as pg_current_wal_lsn() prints it, e.g. 0/3000060), from the "
           "PITR archive like --to-time (which it replaces); checked against `inv pitr.list --json`'s "
           "earliest_lsn/latest_lsn first",
    jobs="pg_restore jobs: 1 streams the download into pg_restore; N > 1 downloads, verifies, then "
         "restores in parallel (default: 1 with up to 2 CPUs, else CPUs/2, at most 4)",
    maintenance="announce a maintenance window with this title around the restore (completed when it succeeds; "
                "an incident when it fails)",
    copy="read the backup from this copy of the source's backups (backups.copies) instead of its backup bucket",
    table="restore only this table (repeatable; as the database spells it) into the --into database",
    schema="restore only this schema's objects (with --table: that schema's tables) into the --into database",
    with_globals="first create the roles the backup's globals name and the target server lacks (never altering "
                 "existing ones), and keep the dump's owners and grants",
    into="the scratch database a --table/--schema restore creates (an existing one is refused unless opsbook "
         "made it); the live database is not touched"))
def restore(call: TaskCall, env=None, from_=None, backup="latest", database=None, keep_old=False, identity=None,
            jobs=0, to_time=None, to_lsn=None, dry_run=False, confirm=None, maintenance=None, copy=None, table=None,
            schema=None, into=None, with_globals=False, json=False):
    """Restore a verified backup into a new database, compare row counts, then swap it in."""
    target = call.environment
    if copy and (to_time or to_lsn):
        raise UsageError("--copy and --to-time/--to-lsn cannot be combined: a copy holds dumps, not the PITR archive",
                         hint="drop one of them")
    partial = {key: value for key, value in (("tables", list(table or [])), ("schema", schema), ("into", into))
               if value}
    runbook = build(target, source=from_, backup=backup, database=database, keep_old=keep_old, identity=identity,
                    jobs=jobs, **({"to_time": to_time} if to_time else {}), **({"to_lsn": to_lsn} if to_lsn else {}),
                    **({"copy": copy} if copy else {}),
                    **partial, **({"with_globals": True} if with_globals else {}))

    def result(ctx: RunContext) -> dict[str, Any]:
        restored = {**(ctx.state.get("fetch") or {}), **(ctx.state.get("load") or {}),
                    **(ctx.state.get("swap") or {}), **(ctx.state.get("verify") or {}),
                    **(ctx.state.get("restore") or {})}
        several = {step.name.partition("-")[2] for step in runbook.steps if step.name.startswith("swap-")}
        if several:  # a backup of several databases: one entry each
            parts = {name: {**(ctx.state.get(f"fetch-{name}") or {}), **(ctx.state.get(f"load-{name}") or {}),
                            **(ctx.state.get(f"swap-{name}") or {})} for name in sorted(several)}
            ids = [part["backup_id"] for part in parts.values() if part.get("backup_id")]
            restored = {**restored, "backup_id": ids[0] if ids else None, "databases": parts}
        return {"restored": restored}

    def run() -> Any:
        return run_notifying(runbook, target, call.output, dry_run=dry_run, confirm=confirm, result=result)

    if maintenance and not dry_run:
        with_maintenance(target, call.output, maintenance, run)
    else:
        run()


@task(klass=OpsTask, name="diff", help=dict(
    table="the table to compare (as the database spells it, e.g. User); it needs a primary key",
    schema="its schema (default: public)", from_="the environment whose backup to compare with (default: the "
                                                   "target itself)",
    backup="backup id, or latest (default)", where="compare only the rows matching this SQL condition (both sides)",
    out="the SQL file to write (default: in the state dir, named in the output)",
    restore_changed="also restore the rows changed since the backup (default: only re-insert missing rows)",
    apply="run the file on the live table (one transaction; a protected environment asks for its name)",
    identity="age identity file to decrypt with (default: the source's backups.identity_file)",
    database="the live database of the table (default: the target's); with a backup of several databases, the "
             "one to compare (required there)"))
def diff(call: TaskCall, table=None, env=None, from_=None, backup="latest", schema=None, where=None, out=None,
         restore_changed=False, apply=False, identity=None, database=None, dry_run=False, confirm=None, json=False):
    """Compare a table with a backup's copy by primary key and write SQL that puts the backup's rows back;
    exit 3 when they differ (after --apply: when differences are left), 0 when not."""
    target = call.environment
    runbook = table_diff_steps.build(target, source=from_, backup=backup, table=table, schema=schema, where=where,
                                     out=out, restore_changed=restore_changed, apply=apply, identity=identity,
                                     jobs=1, database=database)
    found: dict[str, Any] = {}

    def result(ctx: RunContext) -> dict[str, Any]:
        found.update(ctx.state.get("diff") or {})
        return {"diff": {**found, **(ctx.state.get("apply") or {})}}

    run_notifying(runbook, target, call.output, dry_run=dry_run, confirm=confirm, result=result)
    left = found.get("left_alone", 0) if apply else found.get("differences", 0)
    if left:
        raise CheckFailed(f"{found['table']}: {left} row(s) differ from backup {found['backup_id']}"
                          + (" after the apply" if apply else "") + f"; see {found['file']}",
                          hint="review the file, then --apply it" if not apply else
                          "rows changed or added since the backup are left alone unless --restore-changed")


collection = Collection("restore")
collection.add_task(restore)
collection.add_task(diff)
