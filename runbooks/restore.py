"""inv restore: a verified restore with an atomic swap (the steps: ops.restore_steps).

1. download the backup, check its size and sha256, and restore it into a new database
   `<db>__restore_<stamp>`; compare that database's row counts with the manifest;
2. only then swap names: `<db>` → `<db>__old_<stamp>`, the restored copy → `<db>`,
   dropping the old one unless --keep-old.

With --to-time T (or latest) the data comes from the PITR archive instead of a dump: a scratch cluster
recovered to T, copied into the new database with pg_dump | pg_restore (ops/pitr_restore.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from invoke import task

from ops import neon, neon_restore, pitr_restore, restore_steps
from ops.cli import OpsTask, TaskCall
from ops.engine import RunContext
from ops.errors import UsageError
from ops.failure_notice import run_notifying
from ops.maintenance_steps import with_maintenance

if TYPE_CHECKING:
    from ops.engine import Runbook
    from ops.inventory import Environment

__all__ = ["build", "restore"]  # build: RUNBOOKS "restore"


def build(env: Environment, **arguments: Any) -> Runbook:
    """A dump restore, or with --to-time a point-in-time recovery: on a Neon environment Neon's branch restore
    (ops/neon_restore.py), elsewhere the PITR archive (ops/pitr_restore.py)."""
    if arguments.get("to_time"):
        if neon.is_neon(env):
            return neon_restore.build(env, **arguments)
        return pitr_restore.build(env, **arguments)
    return restore_steps.build(env, **arguments)


@task(klass=OpsTask, help=dict(
    from_="the environment whose backup to restore (default: the target itself)",
    backup="backup id, or latest (default)", database="the database to replace (default: the target's)",
    keep_old="keep the replaced database as <db>__old_<stamp>",
    identity="age identity file to decrypt with (default: the source's backups.identity_file)",
    to_time="point-in-time recovery: the source as it was at this ISO-8601 time (UTC unless it says), or latest; "
            "from the PITR archive (`inv pitr.list`) through a scratch cluster on this machine, or on Neon through "
            "the branch restore, the current state kept as a branch",
    jobs="pg_restore jobs: 1 streams the download into pg_restore; N > 1 downloads, verifies, then "
         "restores in parallel (default: 1 with up to 2 CPUs, else CPUs/2, at most 4)",
    maintenance="announce a maintenance window with this title around the restore (completed when it succeeds; "
                "an incident when it fails)",
    copy="read the backup from this copy of the source's backups (backups.copies) instead of its backup bucket"))
def restore(call: TaskCall, env=None, from_=None, backup="latest", database=None, keep_old=False, identity=None,
            jobs=0, to_time=None, dry_run=False, confirm=None, maintenance=None, copy=None, json=False):
    """Restore a verified backup into a new database, compare row counts, then swap it in."""
    target = call.environment
    if copy and to_time:
        raise UsageError("--copy and --to-time cannot be combined: a copy holds dumps, not the PITR archive",
                         hint="drop one of them")
    runbook = build(target, source=from_, backup=backup, database=database, keep_old=keep_old, identity=identity,
                    jobs=jobs, **({"to_time": to_time} if to_time else {}), **({"copy": copy} if copy else {}))

    def result(ctx: RunContext) -> dict[str, Any]:
        return {"restored": {**(ctx.state.get("fetch") or {}), **(ctx.state.get("load") or {}),
                             **(ctx.state.get("swap") or {}), **(ctx.state.get("verify") or {}),
                             **(ctx.state.get("restore") or {})}}

    def run() -> Any:
        return run_notifying(runbook, target, call.output, dry_run=dry_run, confirm=confirm, result=result)

    if maintenance and not dry_run:
        with_maintenance(target, call.output, maintenance, run)
    else:
        run()
