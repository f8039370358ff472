"""inv restore: a verified restore with an atomic swap (the steps: ops.restore_steps).

1. download the backup, check its size and sha256, and restore it into a new database
   `<db>__restore_<stamp>`; compare that database's row counts with the manifest;
2. only then swap names: `<db>` → `<db>__old_<stamp>`, the restored copy → `<db>`,
   dropping the old one unless --keep-old.
"""

from __future__ import annotations

from typing import Any

from invoke import task

from ops.cli import OpsTask, TaskCall
from ops.engine import RunContext
from ops.failure_notice import run_notifying
from ops.maintenance_steps import with_maintenance
from ops.restore_steps import build

__all__ = ["build", "restore"]  # build: RUNBOOKS "restore"


@task(klass=OpsTask, help=dict(
    from_="the environment whose backup to restore (default: the target itself)",
    backup="backup id, or latest (default)", database="the database to replace (default: the target's)",
    keep_old="keep the replaced database as <db>__old_<stamp>",
    identity="age identity file to decrypt with (default: the source's backups.identity_file)",
    jobs="pg_restore jobs: 1 streams the download into pg_restore; N > 1 downloads, verifies, then "
         "restores in parallel (default: 1 with up to 2 CPUs, else CPUs/2, at most 4)",
    maintenance="announce a maintenance window with this title around the restore (completed when it succeeds; "
                "an incident when it fails)"))
def restore(call: TaskCall, env=None, from_=None, backup="latest", database=None, keep_old=False, identity=None, jobs=0,
            dry_run=False, confirm=None, maintenance=None, json=False):
    """Restore a verified backup into a new database, compare row counts, then swap it in."""
    target = call.environment
    runbook = build(target, source=from_, backup=backup, database=database, keep_old=keep_old, identity=identity,
                    jobs=jobs)

    def result(ctx: RunContext) -> dict[str, Any]:
        return {"restored": {**(ctx.state.get("fetch") or {}), **(ctx.state.get("load") or {}),
                             **(ctx.state.get("swap") or {})}}

    def run() -> Any:
        return run_notifying(runbook, target, call.output, dry_run=dry_run, confirm=confirm, result=result)

    if maintenance and not dry_run:
        with_maintenance(target, call.output, maintenance, run)
    else:
        run()
