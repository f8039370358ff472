"""inv provision: the provisioning checklist as idempotent steps, from nothing to a running app.

    1. buckets (app, backups), the database role (generated password) and the database; on Neon
       the branch, role and database through its API, and the branch's URLs (ops/neon_provision.py)
    2. each bucket's lifecycle rule (abort incomplete multipart uploads) where the provider
       has them, set by its bucket step; the app's storage key through the key provider
       (`keys`), probed, kept in the secret store
    3. app secrets: AUTH_SECRET, and the admin password (shown once, kept only as a scrypt
       hash); then the rendered env file pushed to every host
    4. migrate (the migrate runbook's steps; a database without tables has nothing to back up)
    5. the seed command (`app.seed`), once, on the first host
    6. a rolling restart gated on health and ready
    7. with a key provider: once every app serves with the key made in 2, the inventory's key (the
       bootstrap key that made it) is revoked, as a rotation revokes the old key: one key is left

Storage comes first: it is where the run's audit journal goes. The admin password is made
with the other secrets, before the env file is pushed, so one push carries them all.
Parts an environment does not configure (no hosts, no `keys`, no migrations, no seed) are
left out and named as such; they never fail the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from invoke import task

from ops import neon, neon_provision, pg_url
from ops.cli import OpsTask, TaskCall, execute
from ops.engine import Runbook
from ops.errors import OpsError
from ops.hosts import is_loopback
from ops.inventory import as_secret
from ops.journal import new_run_id
from ops.key_rotation import retire_bootstrap_steps
from ops.migrate_steps import migrate_steps
from ops.platform_steps import push_env_steps, restart_step
from ops.provision_steps import (
    AdminPasswordStep,
    AuthSecretStep,
    BucketStep,
    DatabaseStep,
    MigrationOnNewDatabase,
    RoleStep,
    SeedStep,
    StorageKeyStep,
    lifecycle_unsupported,
)

if TYPE_CHECKING:
    from ops.engine import Step
    from ops.inventory import Environment
    from ops.output import Output



def database_names(env: Environment) -> tuple[str, str]:
    """(role, database) the app uses: `database.role`/`database.name`, else the URL's user and database."""
    role, name = env.raw("database.role", None), env.raw("database.name", None)
    if role and name:
        return role, name
    if neon.is_neon(env) and not env.has("database.url"):
        raise env.missing("database.role" if not role else "database.name")
    target = pg_url.parse_url(env.database_url(direct=True))
    return role or target.user, name or target.dbname


def _first_host_app(env: Environment) -> tuple[str | None, dict[str, Any]]:
    hosts = env.host_configs()
    name = hosts[0].name if hosts else None
    return name, env.app_settings(name)


def _all_hosts_have(env: Environment, key: str) -> bool:
    hosts = env.host_configs()
    return bool(hosts) and all(env.app_settings(host.name).get(key) for host in hosts)


def has_migrations(env: Environment) -> bool:
    """Whether there is somewhere to read migrations from (as ops.migrations.load_migration_source reads)."""
    _host, app = _first_host_app(env)
    return bool(env.raw("app.repository", None) or app.get("dir"))


def uses_key_provider(env: Environment) -> bool:
    return (env.has("storage") and env.storage_config("storage").provider != "local"
            and str(env.raw("keys.provider", "static")) != "static")


def bucket_steps(env: Environment) -> list[Step]:
    """Each bucket, with its lifecycle rule where the provider has lifecycle rules."""
    return [BucketStep(section, env.storage_config(section).bucket,
                       lifecycle=lifecycle_unsupported(env, section) is None)
            for section in ("storage", "backups") if env.has(section)]


def app_steps(env: Environment, database: str, *, backup_id: str | None) -> list[Step]:
    """Secrets and env files (hosts), migrations, seed, restart: what this environment configures."""
    steps: list[Step] = []
    pushes = _all_hosts_have(env, "env_file")
    if pushes:
        steps += [AuthSecretStep(), AdminPasswordStep(), *push_env_steps(env)]
    if has_migrations(env):
        steps += [MigrationOnNewDatabase(step, database)
                  for step in migrate_steps(env, backup=None, backup_id=backup_id)]
    host, app = _first_host_app(env)
    if host and app.get("seed") and app.get("dir"):
        steps.append(SeedStep(host, str(app["seed"]), str(app["dir"])))
    if pushes and _all_hosts_have(env, "restart"):
        steps.append(restart_step(env))
    return steps


def not_configured(env: Environment) -> list[str]:
    """What this environment leaves out of the checklist, and why (said, never failed)."""
    notes = [reason for section in ("storage", "backups") if env.has(section)
             if (reason := lifecycle_unsupported(env, section))]
    if env.has("storage") and env.storage_config("storage").provider != "local" and not uses_key_provider(env):
        notes.append("storage keys: no key provider (`keys.provider` cloudflare or aws-iam); the inventory's "
                     "storage key is the one the app gets")
    elif uses_key_provider(env) and not switches_every_app(env):
        notes.append("revoking the inventory's storage key: not every host has app.env_file and app.restart, so "
                     "the apps may still use it; revoke it yourself once they use the secret store's key")
    if not env.host_configs():
        notes.append("app hosts: none, so no env file, AUTH_SECRET, admin password, seed or restart")
    elif not _all_hosts_have(env, "env_file"):
        notes.append("env file: not every host has app.env_file, so no env file, AUTH_SECRET or admin password")
    elif not _all_hosts_have(env, "restart"):
        notes.append("restart: not every host has app.restart; restart the apps yourself after provisioning")
    if not has_migrations(env):
        notes.append("migrations: no app.repository or app.dir to read them from")
    return notes


def database_url_advice(env: Environment) -> list[str]:
    """Warnings about the app's database URLs: TLS off the sandbox, pgbouncer=true behind a pooler."""
    if env.sandbox or not env.has("database.url"):
        return []
    try:
        urls = {path: urlsplit(as_secret(env.value(f"database.{path}")).reveal())
                for path in ("url", "direct_url") if env.has(f"database.{path}")}
    except OpsError:
        return []  # an unset ${env:…}: the run itself says so, with its hint
    advice = [f"database.{path} has no sslmode: add ?sslmode=require (the app's env file gets it anyway; opsbook's "
              "own connections to this server do not insist on TLS)"
              for path, parts in urls.items()
              if "sslmode" not in parse_qs(parts.query) and not is_loopback(parts.hostname)]
    pooled = "direct_url" in urls and urls["direct_url"].geturl() != urls["url"].geturl()
    if pooled and parse_qs(urls["url"].query).get("pgbouncer") != ["true"]:
        advice.append("database.url is the pooled URL (database.direct_url is set) but has no pgbouncer=true: "
                      "Prisma needs it behind PgBouncer in transaction mode")
    return advice


def switches_every_app(env: Environment) -> bool:
    """Whether provision itself puts a new key in every app (pushed env files, restarted): no hosts, or
    every host has app.env_file and app.restart. Only then may it revoke the key the apps had."""
    return not env.host_configs() or (_all_hosts_have(env, "env_file") and _all_hosts_have(env, "restart"))


def build(env: Environment, **arguments: Any) -> Runbook:
    role, database = database_names(env)
    steps = bucket_steps(env)
    steps += neon_provision.provision_steps(env, role, database) if neon.is_neon(env) \
        else [RoleStep(role), DatabaseStep(database, role)]
    key_step = StorageKeyStep(str(env.raw("keys.provider")), retire=switches_every_app(env)) \
        if uses_key_provider(env) else None
    if key_step:  # after the buckets: the new key is probed on the app bucket
        steps.append(key_step)
    steps += app_steps(env, database, backup_id=arguments.get("backup_id"))
    if key_step and key_step.retire:  # last: the inventory's key goes once every app serves with the new one
        steps += retire_bootstrap_steps(key_step.name)
    return Runbook("provision", f"Provision {env.name}", steps, arguments=arguments)


def _say_left_out(env: Environment, output: Output) -> None:
    for note in not_configured(env):
        output.info(f"left out here: {note}")
    for advice in database_url_advice(env):
        output.warn(advice)


@task(klass=OpsTask)
def provision(call: TaskCall, env=None, dry_run=False, confirm=None, json=False):
    """Provision an environment: buckets, role, database, keys, app secrets and env files, migrate, seed, restart."""
    arguments: dict[str, Any] = {}
    if call.environment.protected:  # a pre-migration backup (of a database that has tables) keeps its id on resume
        arguments["backup_id"] = new_run_id()
    _say_left_out(call.environment, call.output)
    execute(build(call.environment, **arguments), call.environment, call.output, dry_run=dry_run, confirm=confirm)
