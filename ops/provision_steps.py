"""The steps of `inv provision`: buckets, lifecycle rules, role, database, storage key, app secrets, seed.

Each step's check() reads the facts (the server, the bucket, the secret store, the
host) and returns None when they already hold, so a second run plans nothing and a
dry run on a fresh environment plans everything without touching anything. Generated
secrets go to the environment's 0600 secret store (ops/secret_store.py), written
before the thing that uses them exists, so an interrupted run never loses one.
"""

from __future__ import annotations

import secrets as random_tokens
from typing import TYPE_CHECKING, Any

from ops import keys, pg, pg_url
from ops.assets import describe_rule, desired_rules, merged_rules, rules_to_set
from ops.engine import Change, RunContext, Step, WrappedStep
from ops.envfile import parse_env_file, render_env_file
from ops.errors import OpsError, StepFailed
from ops.inventory import Environment
from ops.migrations import shell_path
from ops.rollout import host_named
from ops.secrets import Secret, mask_identifier, redact

if TYPE_CHECKING:
    from ops.secret_store import Store

DATABASE_PASSWORD = "DATABASE_PASSWORD"
AUTH_SECRET = "AUTH_SECRET"
ADMIN_PASSWORD_HASH = "ADMIN_PASSWORD_HASH"
SEEDED = "APP_SEEDED"  # the seed ran once: which run did it (the command's own effects are opaque)
AUTH_SECRET_BYTES = 48  # 64 characters once encoded; auth libraries ask for at least 32
ABORT_UPLOADS_AFTER_DAYS = 7  # the same rule (same ID and days) as `inv backup.assets --lifecycle`
SEED_TIMEOUT_SECONDS = 3600
LOG_LINES = 20


def secret_store(env: Environment) -> Store:
    """The store the environment's `secrets.store` names (ops/secret_stores.py)."""
    return env.secret_store()


# --- the database password the role was given ----------------------------------------------


# --- buckets ---------------------------------------------------------------------------------


def bucket_label(section: str) -> str:
    return "app" if section == "storage" else "backup"


class BucketStep(Step):
    """The bucket, with the lifecycle rule that aborts multipart uploads left incomplete (a killed upload
    otherwise stays billed forever) where the provider has lifecycle rules."""

    def __init__(self, section: str, bucket: str, *, lifecycle: bool = True,
                 abort_days: int = ABORT_UPLOADS_AFTER_DAYS):
        self.section = section
        self.lifecycle = lifecycle
        self.abort_days = abort_days
        self.name = f"{section}-bucket"
        self.title = f"create the {bucket_label(section)} bucket {bucket}"

    def _desired(self, ctx: RunContext) -> list[dict[str, Any]]:
        if not self.lifecycle:
            return []
        return desired_rules(ctx.storage(self.section), abort_days=self.abort_days, archive_days=None)

    def check(self, ctx: RunContext) -> Change | None:
        storage = ctx.storage(self.section)
        exists = storage.bucket_exists()
        desired = self._desired(ctx)
        # A bucket not created yet has no rules (and cannot be asked for them).
        missing = rules_to_set(storage.lifecycle_rules(), desired) if exists and desired else desired
        if exists and not missing:
            return None
        actions = ([] if exists else [f"create bucket {storage.config.bucket}"])
        actions += [f"set {len(missing)} lifecycle rule(s) on {storage.config.bucket}"] if missing else []
        details = [storage.describe(), *(f"lifecycle: {describe_rule(rule)}" for rule in missing)]
        return Change(" and ".join(actions), details, data={"create": not exists, "rules": bool(missing)})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        storage = ctx.storage(self.section)
        if change.data.get("create"):
            storage.create_bucket()
        desired = self._desired(ctx)
        if change.data.get("rules"):
            storage.set_lifecycle_rules(merged_rules(storage.lifecycle_rules(), desired))
        return {"bucket": storage.config.bucket, "lifecycle_rules": [rule["ID"] for rule in desired]}


def lifecycle_unsupported(env: Environment, section: str) -> str | None:
    """Why this bucket gets no lifecycle rules (the local provider is a folder), or None."""
    config = env.storage_config(section)
    if config.provider != "local":
        return None
    return (f"lifecycle rules of the {bucket_label(section)} bucket {config.bucket}: not supported by the local "
            "provider (a folder); nothing is set there")


# --- database --------------------------------------------------------------------------------


class RoleStep(Step):
    def __init__(self, role: str):
        self.role = role
        self.name = "database-role"
        self.title = f"create the database role {role} with a generated password"

    def check(self, ctx: RunContext) -> Change | None:
        row = ctx.database(admin=True).execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.role,)).fetchone()
        if row:
            self._warn_without_password(ctx)
            return None
        return Change(f"create role {self.role} (LOGIN; password generated into {secret_store(ctx.env).label})")

    def _warn_without_password(self, ctx: RunContext) -> None:
        """A role made elsewhere keeps its password: opsbook never changes one it did not set."""
        if not secret_store(ctx.env).get(DATABASE_PASSWORD):
            ctx.once(f"provision:role-warning:{self.role}", lambda: self._warning(ctx))

    def _warning(self, ctx: RunContext) -> None:
        if "password" not in pg_url.connection_params(ctx.env.database_url(direct=False)):
            ctx.output.warn(f"role {self.role} already exists and neither the secret store nor database.url has "
                            "its password: the app's DATABASE_URL will have none; put it in database.url "
                            f"(as ${{env:…}}) or in {secret_store(ctx.env).location} as {DATABASE_PASSWORD}")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        # The password is stored before the role exists: an interrupted run never loses it.
        password = secret_store(ctx.env).get_or_generate(DATABASE_PASSWORD)
        pg.create_login_role(ctx.database(admin=True), self.role, password)
        return {"role": self.role}

    def undo(self, ctx: RunContext, change: Change) -> None:
        ctx.database(admin=True).execute(pg.identifiers("DROP ROLE IF EXISTS {}", self.role))


class DatabaseStep(Step):
    def __init__(self, database: str, owner: str):
        self.database_name = database
        self.owner = owner
        self.name = "database"
        self.title = f"create the database {database} owned by {owner}"

    def check(self, ctx: RunContext) -> Change | None:
        if pg.database_exists(ctx.database(admin=True), self.database_name):
            return None
        return Change(f"create database {self.database_name} (owner {self.owner})")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        pg.create_database(ctx.database(admin=True), self.database_name, owner=self.owner)
        return {"database": self.database_name}

    def verify(self, ctx: RunContext) -> None:
        connection = ctx.database(admin=True)
        owner = connection.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                                   (self.database_name,)).fetchone()
        if not owner or owner[0] != self.owner:
            where = pg_url.parse_url(ctx.env.admin_url()).describe()
            raise StepFailed(f"database {self.database_name} is not owned by {self.owner} "
                             f"({owner[0] if owner else 'missing'}) on {where}")

    def undo(self, ctx: RunContext, change: Change) -> None:
        ctx.forget(f"database:{self.database_name}:True")  # its connection dies with the database
        pg.drop_database(ctx.database(admin=True), self.database_name)


def database_state(ctx: RunContext, database: str) -> str:
    """"missing", "empty" (no table in any schema) or "used": what a migration step may assume."""
    if not ctx.env.has("database.url"):  # a Neon branch's URL, stored once provision has made it
        return "missing"
    if not pg.database_exists(ctx.database(admin=True), database):
        return "missing"
    row = ctx.database(database, admin=True).execute(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname !~ '^pg_(toast|temp)')").fetchone()
    return "used" if row and row[0] else "empty"


class MigrationOnNewDatabase(WrappedStep):
    """One of migrate's steps, in a runbook that may be creating the database in this very run.

    Without tables there is nothing to gate, lint or back up (no app runs on it yet); the
    deploy step is planned from the migration folders alone while the database does not exist.
    """

    def __init__(self, inner: Step, database: str):
        super().__init__(inner)
        self.database = database
        self.deploys = inner.name == "deploy"

    def check(self, ctx: RunContext) -> Change | None:
        state = database_state(ctx, self.database)
        if state == "used" or (state == "empty" and self.deploys):
            return self.inner.check(ctx)
        if not self.deploys:
            return None
        source = self.inner.facts.source(ctx)  # type: ignore[attr-defined]
        if not source.migrations:
            return None
        return Change(f"apply {len(source.migrations)} migration(s) to the new database {self.database}",
                      [migration.name for migration in source.migrations] + [f"from {source.where}"])


# --- storage key -----------------------------------------------------------------------------


STORED_KEY_NAMES = (keys.KEY_ID, keys.SECRET, keys.PREVIOUS_KEY_ID, keys.PREVIOUS_SECRET)


class StorageKeyStep(Step):
    """The app's own storage key, made through the key provider, probed, then kept in the secret store.

    From then on the secret store's pair is the environment's key (contract: it wins over the
    inventory's), for the apps and for opsbook alike; `inv keys.rotate` replaces it later. With
    `retire`, the inventory's key (the bootstrap key that signed the creation) is kept as the
    previous key, as a rotation keeps the old one, for the steps that revoke it once every app
    serves with the new key: the environment ends with one active key.
    """

    name = "storage-key"

    def __init__(self, provider: str, *, retire: bool = False):
        self.provider = provider
        self.retire = retire
        self.title = f"create the app's storage key through {provider}, probe it, keep it in the secret store"

    def check(self, ctx: RunContext) -> Change | None:
        if ctx.env.stored_storage_keys():
            return None
        details = keys.provider_for(ctx.env).preflight()
        if self.retire:
            details.append("the inventory's key stays until every app serves with the new one, then it is revoked")
        return Change(f"create a new {self.provider} key labelled {keys.new_label(ctx.env)!r}, probe it (head bucket, "
                      "put/get/delete an object), store it as STORAGE_ACCESS_KEY_ID/STORAGE_SECRET_ACCESS_KEY",
                      details)

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        provider = keys.provider_for(ctx.env, log=ctx.log)
        bootstrap_id, bootstrap_secret = keys.current_credentials(ctx.env)  # the inventory's: it signs the creation
        key = provider.create_key(keys.new_label(ctx.env))
        # Stored at once, in one write: a run killed now leaves a key opsbook knows (and a re-run uses)
        # rather than a stray one, and the bootstrap key is still known to be revoked later.
        previous = {keys.PREVIOUS_KEY_ID: Secret(bootstrap_id), keys.PREVIOUS_SECRET: bootstrap_secret or Secret("")}
        secret_store(ctx.env).update({keys.KEY_ID: Secret(key.key_id), keys.SECRET: key.secret_access_key,
                                      **(previous if self.retire else {})})
        try:
            keys.probe_key(ctx.env, key.key_id, key.secret_access_key)
        except Exception:
            keys.clear(ctx.env, *STORED_KEY_NAMES)
            self._revoke(ctx, provider, key.key_id)
            raise
        ctx.forget("storage:storage")
        ctx.forget("storage:backups")
        return {"provider": provider.name, "key_id": mask_identifier(key.key_id)}

    @staticmethod
    def _revoke(ctx: RunContext, provider: Any, key_id: str) -> None:
        try:
            provider.delete_key(key_id)
        except OpsError as error:  # the probe's failure is the one to report; this one is said aside
            ctx.output.warn(f"could not delete the unusable key {mask_identifier(key_id)}: {redact(error.message)}; "
                            f"delete it at {provider.name}")

    def verify(self, ctx: RunContext) -> None:
        if not ctx.env.stored_storage_keys():
            raise StepFailed("the new storage key is not in the secret store")

    def undo(self, ctx: RunContext, change: Change) -> str | None:
        key_id = secret_store(ctx.env).get(keys.KEY_ID)
        if key_id and (ctx.state.get("revoke-old-key") or {}).get("revoked"):
            return (f"this run revoked the inventory's key: the new key {mask_identifier(key_id.reveal())} is the "
                    "environment's only one")
        keys.clear(ctx.env, *STORED_KEY_NAMES)
        if key_id:
            keys.provider_for(ctx.env).delete_key(key_id.reveal())
        return None


# --- app secrets -----------------------------------------------------------------------------


class AuthSecretStep(Step):
    name = "auth-secret"
    title = "generate AUTH_SECRET (NEXTAUTH_SECRET / BETTER_AUTH_SECRET), 64 random characters, into the secret store"

    def check(self, ctx: RunContext) -> Change | None:
        if secret_store(ctx.env).get(AUTH_SECRET):
            return None
        return Change(f"generate AUTH_SECRET into {secret_store(ctx.env).label} (never shown)")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        secret_store(ctx.env).set(AUTH_SECRET, Secret(random_tokens.token_urlsafe(AUTH_SECRET_BYTES)))
        return {"stored": AUTH_SECRET}


class AdminPasswordStep(Step):
    """A generated admin password: shown once on stderr, kept only as its salted scrypt hash."""

    name = "admin-password"
    title = "generate the admin password: shown once, stored only as its scrypt hash (ADMIN_PASSWORD_HASH)"

    def check(self, ctx: RunContext) -> Change | None:
        if secret_store(ctx.env).get(ADMIN_PASSWORD_HASH):
            return None
        return Change("generate the admin password (shown once on stderr when applied), store its salted "
                      f"scrypt hash as ADMIN_PASSWORD_HASH in {secret_store(ctx.env).label}")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        keys.issue_admin_password(ctx.env, ctx.output, f"Admin password for {ctx.env.name}")
        return {"stored": ADMIN_PASSWORD_HASH}


# --- seed ------------------------------------------------------------------------------------


class SeedStep(Step):
    """The app's seed command (`app.seed`), once, on the first host, with the app's environment."""

    name = "seed"

    def __init__(self, host_name: str, command: str, directory: str):
        self.host_name = host_name
        self.command = command
        self.directory = directory
        self.title = f"seed the database once: `{command}` in {directory} on {host_name}"

    def check(self, ctx: RunContext) -> Change | None:
        if secret_store(ctx.env).get(SEEDED):
            return None
        return Change(f"run the seed command on {self.host_name} (then recorded as done in "
                      f"{secret_store(ctx.env).label}: it never runs again for this environment)")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        # The app's own environment, as its env file has it: what the seed would see on the host.
        environment = {key: Secret(value) for key, value in
                       parse_env_file(render_env_file(ctx.env, self.host_name)).items()}
        connection = ctx.host(host_named(ctx.env, self.host_name))
        result = connection.run(f"cd {shell_path(self.directory)} && {self.command}", check=False,
                                timeout=SEED_TIMEOUT_SECONDS, environment=environment)
        for line in (result.stdout + result.stderr).strip().splitlines()[-LOG_LINES:]:
            ctx.log(line)
        if not result.ok:
            raise StepFailed(f"`{self.command}` exited with code {result.exit_code} on {self.host_name} "
                             f"in {self.directory}", where=self.host_name,
                             hint="read its output above; fix the seed, then run provision again (it runs the "
                                  "seed until it succeeds once)")
        secret_store(ctx.env).set(SEEDED, Secret(f"seeded by run {ctx.run_id}"))
        return {"host": self.host_name, "command": redact(self.command)}
