"""inv pitr.setup / pitr.base / pitr.list / pitr.status: point-in-time recovery through the engine of the backup
storage (barman-cloud for S3/R2, pgBackRest for a folder: ops/pitr_engine.py) and ops/pitr_*.py.

`inv restore --to-time T` (runbooks/restore.py) recovers a scratch cluster from these and moves its
data into the target as a dump restore does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from invoke import Collection, task

from ops import pitr_base, pitr_setup, pitr_status
from ops.cli import OpsTask, TaskCall
from ops.engine import RunContext
from ops.errors import CheckFailed
from ops.failure_notice import run_notifying
from ops.metrics import write_textfile
from ops.storage import open_storage

__all__ = ["build_base", "build_setup", "collection"]  # RUNBOOKS "pitr.setup", "pitr.base"

build_setup = pitr_setup.build
build_base = pitr_base.build


@task(klass=OpsTask)
def setup(call: TaskCall, env=None, dry_run=False, confirm=None, json=False):
    """Turn on WAL archiving to the backup bucket (wal_level, archive_mode/command/timeout), restart, prove it."""
    run_notifying(build_setup(call.environment), call.environment, call.output, dry_run=dry_run, confirm=confirm,
                  result=lambda ctx: {"archive": ctx.state.get("archive")})


@task(klass=OpsTask, help=dict(no_prune="do not apply the recovery window afterwards"))
def base(call: TaskCall, env=None, no_prune=False, dry_run=False, confirm=None, json=False):
    """Take a compressed base backup through the engine, then delete what the recovery window no longer needs."""

    def result(ctx: RunContext) -> dict[str, Any]:
        return {"base": ctx.state.get("base"), "retention": ctx.state.get("retention")}

    run_notifying(build_base(call.environment, no_prune=no_prune), call.environment, call.output, dry_run=dry_run,
                  confirm=confirm, result=result)


@task(klass=OpsTask, name="list", allow_decommissioned=True)
def list_(call: TaskCall, env=None, json=False):
    """The base backups, newest first, each with its earliest and latest recoverable time; WAL gaps named."""
    pitr_base.show(call.environment, call.output, open_storage(call.environment.storage_config("backups")))


@task(klass=OpsTask, multi_env=True,
      help=dict(prometheus="also write the numbers to this Prometheus textfile (node_exporter)"))
def status(call: TaskCall, env=None, json=False, prometheus=None):
    """Archive lag, failed archive attempts, last base backup's age, recoverable window; exit 3 unless ok."""
    report = pitr_status.collect(call.environment, open_storage(call.environment.storage_config("backups")))
    for line in pitr_status.lines(report):
        call.output.info(line)
    if prometheus:
        path = Path(prometheus).expanduser()
        write_textfile(path, pitr_status.families(report), replace={"env": call.environment.name})
        call.output.info(f"wrote {path}")
    call.output.result(report.to_json())
    if report.verdict != "ok":
        raise CheckFailed(f"point-in-time recovery of {call.environment.name} is {report.verdict}: {report.reasons[0]}",
                          hint="see the lines above")


collection = Collection("pitr")
collection.add_task(setup)
collection.add_task(base)
collection.add_task(list_)
collection.add_task(status)
