"""inv secrets.rotate --name NAME: a new app secret, pushed to the hosts' env files, rolling restart.

ADMIN_PASSWORD (on staff changes): a generated password, shown once on stderr and kept
only as a salted scrypt hash (ADMIN_PASSWORD_HASH). AUTH_SECRET (NEXTAUTH_SECRET /
BETTER_AUTH_SECRET, written under all three names): a new random value, never shown.
Signing a new AUTH_SECRET ends every session: users log in again.
"""

from __future__ import annotations

import secrets as random_tokens
from typing import TYPE_CHECKING, Any

from invoke import Collection, task

from ops import keys, neon_password
from ops.cli import OpsTask, TaskCall, execute
from ops.clock import iso_z, utc_now
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import UsageError
from ops.journal import new_run_id
from ops.key_rotation import AfterSwitch
from ops.platform_steps import has_app, push_env_steps, restart_step
from ops.secrets import Secret

if TYPE_CHECKING:
    from ops.inventory import Environment

ALIASES = {"ADMIN_PASSWORD": "ADMIN_PASSWORD", "ADMIN_PASSWORD_HASH": "ADMIN_PASSWORD",
           "AUTH_SECRET": "AUTH_SECRET", "NEXTAUTH_SECRET": "AUTH_SECRET", "BETTER_AUTH_SECRET": "AUTH_SECRET",
           "DATABASE_PASSWORD": "DATABASE_PASSWORD"}  # Neon only: reset through its API (ops/neon_password.py)
AUTH_SECRET_BYTES = 48  # 64 characters once encoded; the libraries ask for at least 32


def canonical(name: str) -> str:
    try:
        return ALIASES[name.strip().upper()]
    except KeyError:
        raise UsageError(f"no rotatable secret named {name!r}",
                         hint=f"--name is one of {', '.join(sorted(ALIASES))}") from None


class GenerateSecret(Step):
    name = "generate-secret"

    def __init__(self, secret: str, rotation: str | None):
        self.secret = secret
        self.rotation = rotation
        self.title = ("generate a new admin password (shown once) and store only its scrypt hash"
                      if secret == "ADMIN_PASSWORD" else "generate a new AUTH_SECRET (64 random characters)")

    def _done(self, env: Environment) -> bool:
        return bool(self.rotation) and any(
            e.get("kind") == "secret" and e.get("name") == self.secret and e.get("rotation_id") == self.rotation
            for e in keys.read_history(env))

    def check(self, ctx: RunContext) -> Change | None:
        if self._done(ctx.env):
            return None
        stored_as = "ADMIN_PASSWORD_HASH" if self.secret == "ADMIN_PASSWORD" else "AUTH_SECRET"
        return Change(f"generate a new {self.secret} into the secret store as {stored_as}",
                      [f"{keys.secret_store(ctx.env).label}: {stored_as} replaced; the env files get it next"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        store = keys.secret_store(ctx.env)
        if self.secret == "ADMIN_PASSWORD":
            keys.issue_admin_password(ctx.env, ctx.output, f"New admin password for {ctx.env.name}")
        else:
            store.set("AUTH_SECRET", Secret(random_tokens.token_urlsafe(AUTH_SECRET_BYTES)))
        at = iso_z(utc_now())
        keys.record_rotation(ctx.env, {"kind": "secret", "name": self.secret, "rotation_id": self.rotation or
                                       ctx.run_id, "at": at, "operator": ctx.operator})
        return {"secret": self.secret, "at": at}

    def verify(self, ctx: RunContext) -> None:
        """apply stored and recorded it; the env files and restarts that follow carry it to the apps."""


def build(env: Environment, name: str = "ADMIN_PASSWORD", rotation: str | None = None,
          **arguments: Any) -> Runbook:
    secret = canonical(name)
    after = ("generate-secret",)
    steps: list[Step] = [GenerateSecret(secret, rotation)]
    if secret == neon_password.SECRET:
        neon_password.check_rotatable(env)
        after, steps = ("reset-password",), [neon_password.ResetPassword(env, rotation)]
    if has_app(env):
        steps += [AfterSwitch(step, f"{step.title} with the new {secret}", after) for step in push_env_steps(env)]
        steps.append(AfterSwitch(restart_step(env), "restart the hosts whose env file changes", after))
    return Runbook("secrets.rotate", f"Rotate {secret} on {env.name}", steps,
                   arguments={"name": secret, "rotation": rotation, **arguments})


@task(klass=OpsTask, help=dict(name="ADMIN_PASSWORD, AUTH_SECRET (alias NEXTAUTH_SECRET / BETTER_AUTH_SECRET), or "
                                    "DATABASE_PASSWORD (database.provider: neon)"))
def rotate(call: TaskCall, name, env=None, dry_run=False, confirm=None, json=False):
    """Rotate an app secret: generate it, push the env files, rolling restart (the admin password shown once)."""
    execute(build(call.environment, name=name, rotation=new_run_id()), call.environment, call.output, dry_run=dry_run,
            confirm=confirm)


collection = Collection("secrets")
collection.add_task(rotate)
