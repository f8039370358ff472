"""inv secrets.status / secrets.move: what an environment's secrets are and where they live; moving the
file store into a manager (the status: ops.secret_status; the move's steps: ops.secret_move)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from invoke import task

from ops.cli import OpsTask, TaskCall, execute
from ops.clock import utc_now
from ops.engine import Runbook
from ops.errors import CheckFailed
from ops.secret_move import CopyEntries, RemoveFile, target_store
from ops.secret_status import secrets_status

if TYPE_CHECKING:
    from ops.inventory import Environment


@task(klass=OpsTask, multi_env=True)
def status(call: TaskCall, env=None, json=False):
    """Every secret the environment uses: its source, last change, rotation; exit 3 when one is past its age."""
    now = utc_now()
    report = secrets_status(call.environment, now)
    for line in report.lines(now):
        call.output.info(line)
    call.output.result(report.to_json())
    if report.overdue:
        raise CheckFailed(f"{', '.join(report.overdue)} of {call.environment.name} past its rotation age",
                          hint="rotate each with the task its line names (set secrets.max_age_days to change "
                          "the age)")


def build(env: Environment, to: str | None = None, **arguments: Any) -> Runbook:
    to = to or env.store_kind
    target_store(env, to)  # a usage error before any plan
    return Runbook("secrets.move", f"Move the secrets of {env.name} from the file store to {to}",
                   [CopyEntries(to), RemoveFile(to)], arguments={"to": to})


@task(klass=OpsTask, help={"to": "aws-sm or kubernetes: the store the inventory's secrets.store names now (default: "
                                 "that store)"})
def move(call: TaskCall, to=None, env=None, dry_run=False, confirm=None, json=False):
    """Copy the file store's entries into the manager, read them back, then remove the file."""
    execute(build(call.environment, to), call.environment, call.output, dry_run=dry_run, confirm=confirm)
