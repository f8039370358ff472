"""inv backup / backup.list / backup.verify: streamed, checksummed, optionally encrypted dumps.

The steps live in ops.backup_steps (a backup is: dump & upload → manifest, written last →
metrics → retention), verification and the listing in ops.backup_verify.
"""

from __future__ import annotations

from typing import Any

from invoke import Collection, task

from ops.backup_steps import build
from ops.backup_verify import build as build_verify
from ops.backup_verify import show_backups
from ops.cli import OpsTask, TaskCall
from ops.engine import RunContext
from ops.errors import UsageError
from ops.failure_notice import run_notifying

__all__ = ["build", "build_verify", "collection"]  # build and build_verify: RUNBOOKS "backup", "backup.verify"


@task(klass=OpsTask, name="run", default=True, iterable=["tag"],
      help=dict(tag="a tag for this backup (repeatable)",
                keep="never delete this backup in retention", no_prune="do not apply retention afterwards"))
def backup(call: TaskCall, env=None, tag=None, keep=False, no_prune=False, dry_run=False, confirm=None, json=False):
    """Dump the database, compress, encrypt (if configured), upload with a manifest; then retention."""
    runbook = build(call.environment, tags=list(tag or []), keep=keep, no_prune=no_prune)

    def result(ctx: RunContext) -> dict[str, Any]:
        dumped = ctx.state.get("dump") or {}
        return {"backup": {k: dumped.get(k) for k in ("backup_id", "key", "size", "sha256", "dump_size", "seconds")},
                "prune": ctx.state.get("prune")}

    run_notifying(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm, result=result)


@task(klass=OpsTask, name="list", allow_decommissioned=True)
def list_(call: TaskCall, env=None, json=False):
    """The backups, newest first: id, time, age, size, tags, keep, last verification; incomplete ones apart."""
    show_backups(call.environment, call.output)


@task(klass=OpsTask, allow_decommissioned=True,
      help=dict(id="the backup to verify", latest="the newest backup (the default)", all="every backup",
                deep="also restore into a scratch database and compare row counts",
                identity="age identity file to decrypt with (default: backups.identity_file)"))
def verify(call: TaskCall, env=None, id=None, latest=False, all=False, deep=False, identity=None, json=False):
    """Re-read stored backups and check size and sha256 against the manifest (and decrypt); --deep restores."""
    chosen = [flag for flag, on in (("--id", id), ("--latest", latest), ("--all", all)) if on]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} cannot be combined", hint="choose one of --id, --latest, --all")
    runbook = build_verify(call.environment, backup=id or ("all" if all else "latest"), deep=deep, identity=identity)
    run_notifying(runbook, call.environment, call.output,
                  result=lambda ctx: {"verified": (ctx.state.get("verify") or {}).get("results")})


collection = Collection("backup")
collection.add_task(backup)
collection.add_task(list_)
collection.add_task(verify)
