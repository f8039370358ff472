"""`inv secrets.rotate --name DATABASE_PASSWORD` on a `database.provider: neon` environment.

Neon generates the role's new password (reset_password); it goes into the secret store as DATABASE_PASSWORD,
where the app's URLs (written without a password) take it from: opsbook's own connections at once, the
app's env file on the push that follows. The new password is checked by connecting with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ops import keys, neon, pg
from ops.clock import iso_z, utc_now
from ops.engine import Change, RunContext, Step
from ops.errors import OpsError, StepFailed, UsageError
from ops.pg_url import parse_url
from ops.secrets import reveal

if TYPE_CHECKING:
    from ops.inventory import Environment

SECRET = "DATABASE_PASSWORD"


def role_of(env: Environment) -> str:
    return str(env.raw("database.role", None) or parse_url(env.value("database.url")).user)


def check_rotatable(env: Environment) -> None:
    if not neon.is_neon(env):
        raise UsageError(f"{SECRET} is rotated through the database provider's API: envs.{env.name} has no "
                         "database.provider: neon",
                         hint="on a self-hosted database change the role's password with ALTER ROLE, then "
                              "`inv secrets.set`")
    if urlsplit(reveal(env.value("database.url"))).password is not None:
        raise UsageError(f"envs.{env.name}.database.url carries a password: a rotated one could not replace it",
                         hint="write the URL without it (postgresql://ROLE@HOST/DB); the stored "
                              f"{SECRET} fills it in")


class ResetPassword(Step):
    name = "reset-password"

    def __init__(self, env: Environment, rotation: str | None):
        self.rotation = rotation
        self.role = role_of(env)
        self.title = f"reset role {self.role}'s password through Neon's API into the secret store ({SECRET})"

    def _done(self, env: Environment) -> bool:
        return bool(self.rotation) and any(
            e.get("kind") == "secret" and e.get("name") == SECRET and e.get("rotation_id") == self.rotation
            for e in keys.read_history(env))

    def check(self, ctx: RunContext) -> Change | None:
        if self._done(ctx.env):
            return None
        return Change(f"reset role {self.role}'s password on Neon branch {neon.branch_name(ctx.env)}",
                      [f"{keys.secret_store(ctx.env).label}: {SECRET} replaced; the env files get it next",
                       "connections opened with the old password keep working until they close"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        api = neon.client(ctx.env)
        branch = api.require_branch(neon.branch_name(ctx.env))
        password = api.reset_password(branch.id, self.role)
        keys.secret_store(ctx.env).set(SECRET, password)
        at = iso_z(utc_now())
        keys.record_rotation(ctx.env, {"kind": "secret", "name": SECRET, "rotation_id": self.rotation or ctx.run_id,
                                       "at": at, "operator": ctx.operator})
        return {"secret": SECRET, "role": self.role, "at": at}

    def verify(self, ctx: RunContext) -> None:
        try:
            with pg.connect(ctx.env.database_url(direct=True), application_name=ctx.label[:63]) as connection:
                connection.execute("SELECT 1")
        except OpsError as error:  # the connector's errors name the server, never the password
            raise StepFailed(f"role {self.role} cannot connect with the new password: {error.message}",
                             hint=f"the new password is stored as {SECRET}; check it in the Neon console") from None
