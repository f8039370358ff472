"""`inv pitr.base`: a compressed base backup through the engine (ops/pitr_engine.py), then the engine's own
retention by recovery window (`pitr.window_days`). `inv pitr.list`: the base backups and what each recovers to.

The backup runs on the server's machine (`pitr.host` over SSH, else here) as the server's OS user (it reads
PGDATA) and connects as the admin role, which needs EXECUTE on pg_backup_start/pg_backup_stop, pg_switch_wal,
pg_create_restore_point and pg_monitor (a superuser has them): without them the engine fails after uploading.
A barman-cloud backup killed half-way stays in the bucket without `status=DONE`: it is listed as incomplete
and never restored from; pgBackRest's info lists only the backups it completed (the next backup resumes or
removes the rest). The engine's temporary files (barman-cloud-backup's tar parts) go to a folder of opsbook's
beside the engine's configuration, emptied before each base backup: what a killed one left there goes with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops import pg_url, pitr_catalog, pitr_host
from ops.clock import iso_z_or_none
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import StepFailed

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.output import Output


TEMPORARY_FOLDER = "tmp"


def temporary_folder(host: pitr_host.DatabaseHost, machine: pitr_host.LocalMachine | pitr_host.SshMachine,
                     log: Callable[[str], None]) -> Path:
    """The engine's TMPDIR on the server's machine, emptied (0700: its files hold the database's data): only base
    backups use it, and the environment's lock lets one run at a time."""
    folder = host.config_dir / TEMPORARY_FOLDER
    left = machine.empty_folder(folder, host.os_user)
    if left:
        log(f"removed what an interrupted base backup left in {folder}: {', '.join(left[:5])}")
    return folder


class BaseStep(Step):
    name = "base"

    def __init__(self, env: Environment):
        self.env = env
        self.host = pitr_host.database_host(env)
        self.engine = pitr_host.engine_of(env)
        self.machine = pitr_host.machine_of(self.host)
        self.title = f"take a compressed base backup of {env.name} into {self.engine.location} ({self.engine.name})"

    def check(self, ctx: RunContext) -> Change | None:
        with self.machine.session():
            self.machine.check_installed(self.engine)
            pitr_host.check_data_dir(self.host, self.machine)
        target = pg_url.parse_url(self.env.admin_url())
        return Change(f"take a base backup of {target.describe()} ({self.host.data_dir} on {self.host.where})",
                      [f"as the OS user {self.host.os_user}, connected as {target.user}; "
                       f"to {self.engine.location} ({self.engine.name})"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        before = {item.backup.backup_id for item in self.catalog(ctx).backups}
        target = pg_url.parse_url(self.env.admin_url())
        started = time.monotonic()
        command = self.engine.backup_command(self.host, target)
        extra = {**pg_url.libpq_environment(pg_url.with_database(self.env.admin_url(), "postgres")),
                 "TMPDIR": str(temporary_folder(self.host, self.machine, ctx.log))}
        pitr_host.run_engine(self.host, self.machine, command, self.engine, extra=extra,
                             what=f"the base backup of {ctx.env.name}")
        new = [item for item in self.catalog(ctx).backups if item.backup.backup_id not in before]
        done = [item for item in new if item.backup.complete]
        if not done:
            raise StepFailed(f"{command[0]} ended without a complete base backup in {self.engine.location}",
                             hint=f"`inv pitr.list --env {ctx.env.name}` shows what is there")
        backup = done[-1].backup
        seconds = round(time.monotonic() - started, 2)
        ctx.log(f"base backup {backup.backup_id}: WAL {backup.begin_wal} to {backup.end_wal}, {seconds} s")
        return {"backup_id": backup.backup_id, "begin_wal": backup.begin_wal, "end_wal": backup.end_wal,
                "end_time": iso_z_or_none(backup.end_time), "seconds": seconds}

    def verify(self, ctx: RunContext) -> None:
        backup_id = (ctx.state.get("base") or {}).get("backup_id")
        if backup_id and not any(item.backup.backup_id == backup_id and item.backup.complete
                                 for item in self.catalog(ctx).backups):
            raise StepFailed(f"base backup {backup_id} is not complete in the bucket")

    def catalog(self, ctx: RunContext) -> pitr_catalog.Catalog:
        return pitr_catalog.read(ctx.storage("backups"), self.engine)


class RetentionStep(Step):
    name = "retention"

    def __init__(self, env: Environment):
        self.engine = pitr_host.engine_of(env)
        self.host = pitr_host.database_host(env)
        self.window = self.host.window_days
        self.title = (f"delete base backups and WAL no longer needed for a recovery window of {self.window} days "
                      f"({' '.join(self.engine.retention_command(self.host)[:1])})")

    def check(self, ctx: RunContext) -> Change | None:
        return Change(f"apply the recovery window of {self.window} days",
                      [" ".join(self.engine.retention_command(self.host)[1:])])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        pitr_host.run_engine(self.host, pitr_host.machine_of(self.host), self.engine.retention_command(self.host),
                             self.engine, as_server=self.engine.server_owns_archive,
                             what=f"retention of {ctx.env.name}'s base backups")
        return {"window_days": self.window}

    def verify(self, ctx: RunContext) -> None:
        return None  # the engine keeps what the window needs; nothing to re-check


def build(env: Environment, **arguments: Any) -> Runbook:
    steps: list[Step] = [BaseStep(env)]
    if not arguments.get("no_prune"):
        steps.append(RetentionStep(env))
    return Runbook("pitr.base", f"Base backup of {env.name} for point-in-time recovery", steps,
                   arguments=arguments, locks=("environment",), confirm_exempt="a base backup changes nothing that "
                                                                              "serves users")


def show(env: Environment, output: Output, storage: Any) -> dict[str, Any]:
    """`inv pitr.list`: each base backup with its earliest and latest recoverable time, newest first."""
    engine = pitr_host.engine_of(env)
    catalog = pitr_catalog.read(storage, engine)
    items = [item.to_json() for item in reversed(catalog.backups)]
    output.info(f"{env.name}: {len(catalog.complete())} complete base backups in {engine.location}, "
                f"{len(catalog.segments)} WAL segments")
    for item in items:
        if not item["complete"]:
            output.info(f"  {item['backup_id']}  incomplete ({item['status']}): not restorable")
            continue
        gap = f"; gap at {item['gap']['missing']}" if item["gap"] else ""
        output.info(f"  {item['backup_id']}  recoverable {item['earliest']} .. {item['latest'] or '(WAL missing)'}"
                    f"{gap}")
    result = {"env": env.name, "engine": engine.name, "archive": engine.location, "backups": items,
              "segments": len(catalog.segments)}
    output.result(result)
    return result
