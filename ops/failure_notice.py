"""Running a runbook with the environment's notify channels told when it fails.

Usage errors and a held lock are not incidents; a failed send only warns: the failure matters more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ops.cli import execute
from ops.notify import notify_failure as send
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.engine import Runbook, RunContext, RunResult
    from ops.errors import OpsError
    from ops.inventory import Environment
    from ops.output import Output

NOT_NOTIFIED = {2, 75}  # usage errors and a held lock are not incidents


def run_notifying(runbook: Runbook, env: Environment, output: Output, *, dry_run: bool = False,
                  confirm: str | None = None, result: Any = None) -> RunResult:
    """ops.cli.execute, with the environment's channels told of failures."""
    def on_failure(ctx: RunContext, error: OpsError) -> None:
        if not dry_run and error.exit_code not in NOT_NOTIFIED:
            notify_failure(env, runbook, ctx.run_id, error, output)

    return execute(runbook, env, output, dry_run=dry_run, confirm=confirm, result=result, on_failure=on_failure)


def notify_failure(env: Environment, runbook: Runbook, run_id: str, error: OpsError, output: Output) -> None:
    """Tell the environment's internal notify channels (a failed send only warns: the failure matters more)."""
    if env.has("notify"):
        send(env, f"{runbook.name} failed on {env.name}", redact(f"run {run_id}: {error}"))
