"""inv backup / backup.list / backup.verify: streamed, checksummed, optionally encrypted dumps.

The steps live in ops.backup_steps (a backup is: dump & upload → manifest, written last →
copies → metrics → retention), verification and the listing in ops.backup_verify, the copies
(backups.copies, `backup.copy`) in ops.backup_copies.
"""

from __future__ import annotations

from typing import Any

from invoke import Collection, task

from ops.backup_copies import build as build_copy
from ops.backup_steps import build, dumps
from ops.backup_verify import build as build_verify
from ops.backup_verify import show_backups
from ops.cli import OpsTask, TaskCall
from ops.engine import RunContext
from ops.errors import UsageError
from ops.failure_notice import run_notifying

__all__ = ["build", "build_copy", "build_verify", "collection"]  # RUNBOOKS "backup", "backup.copy", "backup.verify"


@task(klass=OpsTask, name="run", default=True, iterable=["tag"],
      help=dict(tag="a tag for this backup (repeatable)",
                keep="never delete this backup in retention", no_prune="do not apply retention afterwards"))
def backup(call: TaskCall, env=None, tag=None, keep=False, no_prune=False, dry_run=False, confirm=None, json=False):
    """Dump the database, compress, encrypt (if configured), upload with a manifest; then retention."""
    runbook = build(call.environment, tags=list(tag or []), keep=keep, no_prune=no_prune)

    def result(ctx: RunContext) -> dict[str, Any]:
        done = dumps(ctx)
        fields = ("backup_id", "key", "size", "sha256", "dump_size", "seconds")
        made = {k: (done[0] if done else {}).get(k) for k in fields}
        if any(step.name.startswith("dump-") for step in runbook.steps):
            made["databases"] = [{"name": d["database"], **{k: d.get(k) for k in fields[1:]}} for d in done]
        return {"backup": made, "copies": (ctx.state.get("copies") or {}).get("copied", []),
                "prune": ctx.state.get("prune")}

    run_notifying(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm, result=result)


@task(klass=OpsTask, name="list", allow_decommissioned=True)
def list_(call: TaskCall, env=None, json=False):
    """The backups, newest first: id, time, age, size, tags, keep, last verification; incomplete ones apart."""
    show_backups(call.environment, call.output)


@task(klass=OpsTask, allow_decommissioned=True,
      help=dict(id="the backup to verify", latest="the newest backup (the default)", all="every backup",
                deep="also restore into a scratch database and compare row counts",
                identity="age identity file to decrypt with (default: backups.identity_file)",
                copy="verify only this copy (backups.copies); by default the backup bucket and every copy"))
def verify(call: TaskCall, env=None, id=None, latest=False, all=False, deep=False, identity=None, copy=None,
           json=False):
    """Re-read stored backups (and their copies) and check size and sha256 against the manifest; --deep restores."""
    chosen = [flag for flag, on in (("--id", id), ("--latest", latest), ("--all", all)) if on]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} cannot be combined", hint="choose one of --id, --latest, --all")
    runbook = build_verify(call.environment, backup=id or ("all" if all else "latest"), deep=deep, identity=identity,
                           copy=copy)
    run_notifying(runbook, call.environment, call.output,
                  result=lambda ctx: {"verified": (ctx.state.get("verify") or {}).get("results")})


@task(klass=OpsTask, name="copy",
      help=dict(id="the backup to copy (required)", copy="only this copy (default: every copy that lacks it)"))
def copy_(call: TaskCall, env=None, id=None, copy=None, dry_run=False, confirm=None, json=False):
    """Put a backup on the copies (backups.copies) that lack it: the dump, then its manifest."""
    if not id:
        raise UsageError("backup.copy needs --id", hint="`inv backup.list` shows the backups and the copies missing")
    runbook = build_copy(call.environment, backup_id=id, copy=copy)
    run_notifying(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm,
                  result=lambda ctx: {"copied": (ctx.state.get("copies") or {}).get("copied", [])})


collection = Collection("backup")
collection.add_task(backup)
collection.add_task(list_)
collection.add_task(verify)
collection.add_task(copy_)
