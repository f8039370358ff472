"""inv keys.rotate / keys.status: blue/green rotation of the storage key, and its age.

Rotation: create a new key → probe it → make it current in the secret store (the old one
kept as STORAGE_PREVIOUS_*) → push the hosts' env files → rolling restart with the health
gate → confirm every app serves with the new key → revoke the old key → record it.
Every step reads where the rotation stands (the secret store, the provider, the hosts)
when it checks, so running the rotation again or `inv runs.resume ID` after an
interruption at any point finishes it, ending with one key that the apps use. The steps live
in ops.key_rotation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from invoke import Collection, task

from ops import keys
from ops.cli import OpsTask, TaskCall, execute
from ops.engine import Runbook, RunContext, Step
from ops.errors import CheckFailed
from ops.journal import new_run_id
from ops.key_rotation import AfterSwitch, ConfirmServing, CreateKey, ProbeKey, RecordRotation, RevokeOld, StoreKey
from ops.platform_steps import has_app, push_env_steps, restart_step

if TYPE_CHECKING:
    from ops.inventory import Environment


def build(env: Environment, rotation: str | None = None, **arguments: Any) -> Runbook:
    steps: list[Step] = [CreateKey(rotation), ProbeKey(), StoreKey()]
    if has_app(env):
        steps += [AfterSwitch(step, f"{step.title} with the new key") for step in push_env_steps(env)]
        steps.append(AfterSwitch(restart_step(env), "restart the hosts whose env file changes"))
    steps += [ConfirmServing(), RevokeOld(), RecordRotation(rotation)]
    return Runbook("keys.rotate", f"Rotate the storage key of {env.name}", steps,
                   arguments={"rotation": rotation, **arguments})


@task(klass=OpsTask)
def rotate(call: TaskCall, env=None, dry_run=False, confirm=None, json=False):
    """Blue/green rotation of the storage key: new key, probe, switch the apps, revoke the old one."""

    def result(ctx: RunContext) -> dict[str, Any]:
        return {"key": keys.key_status(call.environment).to_json()}

    execute(build(call.environment, rotation=new_run_id()), call.environment, call.output, dry_run=dry_run,
            confirm=confirm, result=result)


@task(klass=OpsTask, multi_env=True)
def status(call: TaskCall, env=None, json=False):
    """The storage key in use: id (masked), created, age, due date, last rotation; exit 3 when overdue."""
    report = keys.key_status(call.environment)
    for line in report.lines():
        call.output.info(line)
    call.output.result(report.to_json())
    if report.overdue:
        name = call.environment.name
        raise CheckFailed(f"the storage key of {name} is due for rotation (every {report.max_age_days} days)",
                          hint=f"`inv keys.rotate --env {name}`")


collection = Collection("keys")
collection.add_task(rotate)
collection.add_task(status)
