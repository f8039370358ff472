"""`inv provision` on a `database.provider: neon` environment: the branch, the role and the database through
Neon's API instead of SQL, then the URLs the environment uses.

Neon generates the role's password: it goes into the secret store as DATABASE_PASSWORD, as a role made over
SQL does. Without a written `database.url` (a new branch's endpoint host is known only once it exists), the
branch's URLs go into the store too: DATABASE_URL on the pooler (`-pooler` host, unless `database.pooled:
false`) for the app, DIRECT_URL for migrations, dumps and restores. They are stored without the password,
which DATABASE_PASSWORD fills in, so a password rotation reaches them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ops import neon
from ops.engine import Change, RunContext, Step
from ops.envfile import DATABASE_PASSWORD, with_connection_parameters
from ops.errors import StepFailed
from ops.secrets import Secret, reveal

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.neon import Branch, NeonApi

def writes_urls(env: Environment) -> bool:
    """Whether provisioning stores the URLs: the inventory writes none (the store's would be read as written)."""
    return "url" not in (env.raw("database", {}) or {})


def pooled(env: Environment) -> bool:
    return bool(env.raw("database.pooled", True))


def without_password(url: Secret | str) -> str:
    parts = urlsplit(reveal(url))
    userinfo, at, hostport = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}{at}{hostport}"))


def provision_steps(env: Environment, role: str, database: str) -> list[Step]:
    steps: list[Step] = [NeonBranchStep(env), NeonRoleStep(env, role), NeonDatabaseStep(env, database, role)]
    if writes_urls(env):
        steps.append(NeonUrlStep(env, role, database))
    return steps


class _OnBranch(Step):
    def __init__(self, env: Environment):
        self.branch = neon.branch_name(env)

    def found(self, ctx: RunContext) -> tuple[NeonApi, Branch | None]:
        api = neon.client(ctx.env)
        return api, api.find_branch(self.branch)


class NeonBranchStep(_OnBranch):
    name = "neon-branch"

    def __init__(self, env: Environment):
        super().__init__(env)
        self.title = f"create the Neon branch {self.branch} from the project's default branch"

    def check(self, ctx: RunContext) -> Change | None:
        _api, branch = self.found(ctx)
        if branch is not None:
            return None
        return Change(f"create Neon branch {self.branch} from the default branch, with a read-write endpoint",
                      [f"project {neon.client(ctx.env).project_id}"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        api = neon.client(ctx.env)
        created = api.create_branch(api.primary_branch().id, self.branch)
        return {"branch": self.branch, "branch_id": created.branch.id}

    def verify(self, ctx: RunContext) -> None:
        neon.client(ctx.env).require_branch(self.branch)


class NeonRoleStep(_OnBranch):
    name = "database-role"

    def __init__(self, env: Environment, role: str):
        super().__init__(env)
        self.role = role
        self.title = f"create the role {role} on the Neon branch {self.branch}, its password in the secret store"

    def _has_password(self, env: Environment) -> bool:
        written = (env.raw("database", {}) or {}).get("url")
        return bool(env.secret_store().get(DATABASE_PASSWORD)) or (
            written is not None and urlsplit(reveal(env.value("database.url"))).password is not None)

    def check(self, ctx: RunContext) -> Change | None:
        api, branch = self.found(ctx)
        store = ctx.env.secret_store().label
        if branch is None or self.role not in api.roles(branch.id):
            return Change(f"create role {self.role} on Neon branch {self.branch} (Neon generates its password, "
                          f"stored as {DATABASE_PASSWORD} in {store})")
        if self._has_password(ctx.env):
            return None
        return Change(f"store role {self.role}'s password (Neon's reveal_password) as {DATABASE_PASSWORD} in {store}")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        api = neon.client(ctx.env)
        branch = api.require_branch(self.branch)
        created = self.role not in api.roles(branch.id)
        password = (api.create_role(branch.id, self.role) if created else None) \
            or api.reveal_password(branch.id, self.role)
        if not password.reveal():
            raise StepFailed(f"Neon gave no password for role {self.role} on branch {self.branch}",
                             where=api.api_base, hint="reset it in the Neon console, then run provision again")
        ctx.env.secret_store().set(DATABASE_PASSWORD, password)
        return {"role": self.role, "created": created}


class NeonDatabaseStep(_OnBranch):
    name = "database"

    def __init__(self, env: Environment, database: str, owner: str):
        super().__init__(env)
        self.database_name, self.owner = database, owner
        self.title = f"create the database {database} owned by {owner} on the Neon branch {self.branch}"

    def check(self, ctx: RunContext) -> Change | None:
        api, branch = self.found(ctx)
        if branch is not None and self.database_name in api.databases(branch.id):
            return None
        return Change(f"create database {self.database_name} (owner {self.owner}) on Neon branch {self.branch}")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        api = neon.client(ctx.env)
        api.create_database(api.require_branch(self.branch).id, self.database_name, self.owner)
        return {"database": self.database_name}


class NeonUrlStep(_OnBranch):
    name = "database-urls"

    def __init__(self, env: Environment, role: str, database: str):
        super().__init__(env)
        self.role, self.database_name, self.pooled = role, database, pooled(env)
        kind = "pooled" if self.pooled else "direct"
        self.title = (f"store the branch's URLs in the secret store: DATABASE_URL ({kind}, for the app) and "
                      "DIRECT_URL (migrations, dumps, restores)")

    def _wanted(self, api: NeonApi, branch: Branch) -> dict[str, str]:
        # pgbouncer=true on the pooled one, as the app's env file would add it: Prisma then skips prepared statements
        return {name: with_connection_parameters(without_password(
                    api.connection_uri(branch.id, self.database_name, self.role, pooled=pool)),
                    require_tls=False, pooled=pool)
                for name, pool in (("DATABASE_URL", self.pooled), ("DIRECT_URL", False))}

    def check(self, ctx: RunContext) -> Change | None:
        api, branch = self.found(ctx)
        store = ctx.env.secret_store()
        ready = branch is not None and self.role in api.roles(branch.id) \
            and self.database_name in api.databases(branch.id)
        if ready and all(reveal(store.get(k) or "") == v for k, v in self._wanted(api, branch).items()):
            return None
        return Change(f"store DATABASE_URL and DIRECT_URL of {self.role}@{self.database_name} on Neon branch "
                      f"{self.branch} in {store.label} (without the password: {DATABASE_PASSWORD} fills it in)")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        api = neon.client(ctx.env)
        wanted = self._wanted(api, api.require_branch(self.branch))
        ctx.env.secret_store().update({name: Secret(url) for name, url in wanted.items()})
        return {"stored": sorted(wanted), "pooled": self.pooled}
