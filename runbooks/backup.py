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
from ops.cli import OpsTask, environment, make_output
from ops.engine import RunContext
from ops.errors import UsageError
from ops.failure_notice import run_notifying

__all__ = ["build", "build_verify", "collection"]  # build and build_verify: RUNBOOKS "backup", "backup.verify"


@task(klass=OpsTask, name="run", default=True, iterable=["tag"],
      help=dict(tag="a tag for this backup (repeatable)",
                keep="never delete this backup in retention", no_prune="do not apply retention afterwards"))
def backup(c, env=None, tag=None, keep=False, no_prune=False, dry_run=False, confirm=None, json=False):
    """Dump the database, compress, encrypt (if configured), upload with a manifest; then retention."""
    output = make_output(json)
    environment_ = environment(env, output=output, confirm=confirm)
    runbook = build(environment_, tags=list(tag or []), keep=keep, no_prune=no_prune)

    def result(ctx: RunContext) -> dict[str, Any]:
        dumped = ctx.state.get("dump") or {}
        return {"backup": {k: dumped.get(k) for k in ("backup_id", "key", "size", "sha256", "dump_size", "seconds")},
                "prune": ctx.state.get("prune")}

    run_notifying(runbook, environment_, output, dry_run=dry_run, confirm=confirm, result=result)


@task(klass=OpsTask, name="list")
def list_(c, env=None, json=False):
    """The backups, newest first: id, time, age, size, tags, keep, last verification; incomplete ones apart."""
    output = make_output(json)
    environment_ = environment(env, output=output, allow_decommissioned=True)
    show_backups(environment_, output)


@task(klass=OpsTask, help=dict(id="the backup to verify", latest="the newest backup (the default)",
                               all="every backup", deep="also restore into a scratch database and compare row counts",
                               identity="age identity file to decrypt with (default: backups.identity_file)"))
def verify(c, env=None, id=None, latest=False, all=False, deep=False, identity=None, json=False):
    """Re-read stored backups and check size and sha256 against the manifest (and decrypt); --deep restores."""
    chosen = [flag for flag, on in (("--id", id), ("--latest", latest), ("--all", all)) if on]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} cannot be combined", hint="choose one of --id, --latest, --all")
    output = make_output(json)
    environment_ = environment(env, output=output, allow_decommissioned=True)
    runbook = build_verify(environment_, backup=id or ("all" if all else "latest"), deep=deep, identity=identity)
    run_notifying(runbook, environment_, output,
                  result=lambda ctx: {"verified": (ctx.state.get("verify") or {}).get("results")})


collection = Collection("backup")
collection.add_task(backup)
collection.add_task(list_)
collection.add_task(verify)
