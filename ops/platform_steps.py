"""The platform's steps for the runbooks: push-env, restart, rollback and the app's probes, per `app.platform`.

Importing this module registers every platform (ops.deploy_steps: ssh, ops.vercel_steps: vercel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ops import deploy_steps, vercel_steps
from ops.engine import Runbook, Step
from ops.platforms import platform

if TYPE_CHECKING:
    from ops.checks import Probe
    from ops.inventory import Environment

REGISTERED = (deploy_steps.Ssh, vercel_steps.Vercel)  # importing their modules registered them in PLATFORMS


def push_env_steps(env: Environment) -> list[Step]:
    return platform(env).push_env_steps(env)


def restart_step(env: Environment, *, batch: int = 1, max_fail: int = 0, always: bool = False) -> Step:
    return platform(env).restart_step(env, batch=batch, max_fail=max_fail, always=always)


def rollback_steps(env: Environment, *, release: str | None = None, batch: int = 1, max_fail: int = 0) -> list[Step]:
    return platform(env).rollback_steps(env, release=release, batch=batch, max_fail=max_fail)


def app_probes(env: Environment) -> list[tuple[str, Probe]]:
    return platform(env).probes(env)


def _where(env: Environment) -> str:
    return f"{env.name}'s hosts" if platform(env).name == "ssh" else f"{env.name} on {platform(env).name}"


def build_push_env(env: Environment, *, restart: bool = False, batch: int = 1, max_fail: int = 0,
                   **arguments: Any) -> Runbook:
    platform(env).require(env)
    steps = push_env_steps(env) + ([restart_step(env, batch=batch, max_fail=max_fail)] if restart else [])
    return Runbook("deploy.push-env", f"Push the app env file to {_where(env)}", steps,
                   arguments={"restart": restart, "batch": batch, "max_fail": max_fail, **arguments})


def build_restart(env: Environment, *, batch: int = 1, max_fail: int = 0, **arguments: Any) -> Runbook:
    platform(env).require(env)
    title = f"Rolling restart of {_where(env)}" if platform(env).name == "ssh" else f"Redeploy {_where(env)}"
    return Runbook("deploy.restart", title, [restart_step(env, batch=batch, max_fail=max_fail, always=True)],
                   arguments={"batch": batch, "max_fail": max_fail, **arguments})


def build_rollback(env: Environment, *, release: str | None = None, batch: int = 1, max_fail: int = 0,
                   **arguments: Any) -> Runbook:
    platform(env).require(env)
    return Runbook("deploy.rollback", f"Roll {env.name} back to the previous release",
                   rollback_steps(env, release=release, batch=batch, max_fail=max_fail),
                   arguments={"release": release, "batch": batch, "max_fail": max_fail, **arguments})


def has_app(env: Environment) -> bool:
    """Whether the environment runs an app the runbooks can configure: hosts, or a managed platform."""
    return platform(env).name != "ssh" or bool(env.host_configs())
