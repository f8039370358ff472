"""Where the app runs (`app.platform`): each platform gives the steps of push-env, restart and rollback.

`ssh` (the default, ops.deploy_steps) writes env files on hosts and restarts them over SSH;
`vercel` (ops.vercel_steps) does the same through Vercel's API. A platform module registers
itself here; the runbooks ask `platform(env)` and put the steps into their plans, so dry
runs, confirmations and journals stay the engine's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ops.errors import InventoryError

if TYPE_CHECKING:
    from ops.checks import Probe
    from ops.engine import Step
    from ops.inventory import Environment

DEFAULT = "ssh"


class Platform(Protocol):
    name: str
    describe: str

    def require(self, env: Environment) -> None:
        """An inventory error when the environment lacks what this platform needs."""

    def push_env_steps(self, env: Environment) -> list[Step]: ...

    def restart_step(self, env: Environment, *, batch: int = 1, max_fail: int = 0, always: bool = False) -> Step: ...

    def rollback_steps(self, env: Environment, *, release: str | None = None, batch: int = 1,
                       max_fail: int = 0) -> list[Step]: ...

    def probes(self, env: Environment) -> list[tuple[str, Probe]]:
        """inv health / preflight: the app answers where this platform serves it."""


PLATFORMS: dict[str, Platform] = {}


def register(platform: Platform) -> None:
    PLATFORMS[platform.name] = platform


def platform_name(env: Environment) -> str:
    return str(env.raw("app.platform", DEFAULT))


def platform(env: Environment) -> Platform:
    name = platform_name(env)
    if name not in PLATFORMS:
        raise InventoryError(f"envs.{env.name}.app.platform: unknown platform {name!r}",
                             where=env.inventory.location(f"envs.{env.name}.app"),
                             hint=f"use one of {', '.join(sorted(PLATFORMS))}")
    return PLATFORMS[name]
