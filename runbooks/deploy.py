"""inv deploy.push-env / deploy.restart / deploy.rollback: the app hosts' configuration, restarts and releases.

The steps, and what each does, are in ops.deploy_steps (hosts over SSH) and ops.vercel_steps (Vercel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from invoke import Collection, task

from ops.cli import OpsTask, TaskCall, execute
from ops.deploy_steps import PROGRESS
from ops.engine import Runbook, RunContext
from ops.errors import OpsError
from ops.platform_steps import build_push_env, build_restart, build_rollback
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.inventory import Environment

__all__ = ["build", "build_push_env", "build_restart", "build_rollback", "collection"]  # the builders: RUNBOOKS

build = build_push_env  # RUNBOOKS "deploy.push-env"

ROLLING = {"batch": "hosts restarted at a time (default 1)",
           "max_fail": "failed hosts tolerated before the rollout stops (default 0)"}


def _run(runbook: Runbook, env: Environment, output: Any, *, dry_run: bool, confirm: str | None) -> None:
    def result(ctx: RunContext) -> dict[str, Any]:
        return {"hosts": ctx.state[PROGRESS]} if PROGRESS in ctx.state else {}

    def on_failure(ctx: RunContext, error: OpsError) -> None:
        if ctx.state.get(PROGRESS):
            output.result({"ok": False, "exit_code": error.exit_code, "error": redact(error.message),
                           "hint": error.hint, "run_id": ctx.run_id, "hosts": ctx.state[PROGRESS]})

    execute(runbook, env, output, dry_run=dry_run, confirm=confirm, result=result, on_failure=on_failure)


@task(klass=OpsTask,
      help={**ROLLING, "restart": "then restart (rolling, health-gated) the hosts whose env file changed"})
def push_env(call: TaskCall, env=None, restart=False, batch=1, max_fail=0, dry_run=False, confirm=None, json=False):
    """Render the app env file for each host and write it atomically (0600, previous kept as .prev)."""
    runbook = build_push_env(call.environment, restart=restart, batch=int(batch), max_fail=int(max_fail))
    _run(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm)
    if not restart and not dry_run:
        call.output.info(f"the apps read the file when they start: `inv deploy.restart --env {call.environment.name}`")


@task(klass=OpsTask, help=ROLLING)
def restart(call: TaskCall, env=None, batch=1, max_fail=0, dry_run=False, confirm=None, json=False):
    """Rolling restart: batches of hosts, each gated on its health and ready URLs; stops past --max-fail."""
    runbook = build_restart(call.environment, batch=int(batch), max_fail=int(max_fail))
    _run(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm)


@task(klass=OpsTask, help={**ROLLING,
                               "release": "roll back to this release id (default: the one before the current release)"})
def rollback(call: TaskCall, env=None, release=None, batch=1, max_fail=0, dry_run=False, confirm=None, json=False):
    """Point `current` at the previous release on every host and restart rolling; warns on a newer schema."""
    runbook = build_rollback(call.environment, release=release, batch=int(batch), max_fail=int(max_fail))
    _run(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm)


collection = Collection("deploy")
collection.add_task(push_env, name="push-env")
collection.add_task(restart)
collection.add_task(rollback)
