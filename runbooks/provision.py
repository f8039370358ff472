"""inv provision: bring an environment's database and buckets into existence, idempotently.

Storage comes first: it is where the run's audit journal and later the backups go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from invoke import task

from ops.cli import environment, execute, helps, make_output, opstask
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import StepFailed

if TYPE_CHECKING:
    from ops.inventory import Environment

PASSWORD_KEY = "DATABASE_PASSWORD"


class BucketStep(Step):
    def __init__(self, section: str, bucket: str):
        self.section = section
        self.name = f"{section}-bucket"
        self.title = f"create the {'app' if section == 'storage' else 'backup'} bucket {bucket}"

    def check(self, ctx: RunContext) -> Change | None:
        storage = ctx.storage(self.section)
        if storage.bucket_exists():
            return None
        return Change(f"create bucket {storage.config.bucket}", [storage.describe()])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        ctx.storage(self.section).create_bucket()
        return {"bucket": ctx.storage(self.section).config.bucket}


class RoleStep(Step):
    def __init__(self, role: str):
        self.role = role
        self.name = "database-role"
        self.title = f"create the database role {role} with a generated password"

    def check(self, ctx: RunContext) -> Change | None:
        row = ctx.database(admin=True).execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.role,)).fetchone()
        if row:
            return None
        return Change(f"create role {self.role} (LOGIN; password generated into {store(ctx).path.name})")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        from psycopg import sql

        # The password is stored before the role exists: an interrupted run never loses it.
        password = store(ctx).get_or_generate(PASSWORD_KEY)
        statement = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(self.role), sql.Literal(password.reveal()))
        ctx.database(admin=True).execute(statement)
        return {"role": self.role}

    def undo(self, ctx: RunContext, change: Change) -> None:
        from psycopg import sql

        ctx.database(admin=True).execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(self.role)))


class DatabaseStep(Step):
    def __init__(self, database: str, owner: str):
        self.database_name = database
        self.owner = owner
        self.name = "database"
        self.title = f"create the database {database} owned by {owner}"

    def check(self, ctx: RunContext) -> Change | None:
        from ops import pg

        if pg.database_exists(ctx.database(admin=True), self.database_name):
            return None
        return Change(f"create database {self.database_name} (owner {self.owner})")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        from ops import pg

        pg.create_database(ctx.database(admin=True), self.database_name, owner=self.owner)
        return {"database": self.database_name}

    def verify(self, ctx: RunContext) -> None:
        from ops import pg

        connection = ctx.database(admin=True)
        owner = connection.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                                   (self.database_name,)).fetchone()
        if not owner or owner[0] != self.owner:
            raise StepFailed(f"database {self.database_name} is not owned by {self.owner} "
                             f"({owner[0] if owner else 'missing'}) on {pg.parse_url(ctx.env.admin_url()).describe()}")

    def undo(self, ctx: RunContext, change: Change) -> None:
        from ops import pg

        pg.drop_database(ctx.database(admin=True), self.database_name)


def store(ctx: RunContext):
    from ops.secret_store import SecretStore

    return SecretStore(ctx.env.inventory.state_dir, ctx.env.name)


def build(env: Environment, **arguments: Any) -> Runbook:
    from ops import pg

    target = pg.parse_url(env.database_url(direct=True))
    role = env.raw("database.role", None) or target.user
    database = env.raw("database.name", None) or target.dbname
    steps: list[Step] = [BucketStep(section, env.storage_config(section).bucket)
                         for section in ("storage", "backups") if env.has(section)]
    steps += [RoleStep(role), DatabaseStep(database, role)]
    return Runbook("provision", f"Provision {env.name}", steps, arguments=arguments)


@task(help=helps("env", "dry_run", "confirm", "json"))
@opstask
def provision(c, env=None, dry_run=False, confirm=None, json=False):
    """Create the environment's buckets, database role (generated password) and database; idempotent."""
    output = make_output(json)
    environment_ = environment(env, output=output)
    execute(build(environment_), environment_, output, dry_run=dry_run, confirm=confirm)
