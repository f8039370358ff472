"""inv preflight: the production readiness checklist, each item pass/warn/fail with its fix.

Read-only (but for the drift check's scratch database, dropped again). Every check runs
even when another fails; exit 3 when any fails. The checks (seed notes, issue 6 §5):
required app variables in each host's env file, an auth secret of at least 32 characters,
TLS (`sslmode=require`) on non-local database URLs, `pgbouncer=true` on a pooled URL plus a
direct URL for admin work, no pending or failed migrations, no schema drift (a warning:
ops/migrations/drift.py), a verified backup younger than the RPO target, this quarter's DR
drill, point-in-time recovery working within `targets.rpo_seconds` (a warning when a protected
self-hosted environment has none), storage keys younger than 90 days, a lifecycle rule for
incomplete multipart uploads, the app's health and ready URLs, HSTS and CSP on the public URL.
"""

from __future__ import annotations

import urllib.error
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from invoke import task

from ops import backup_lock, neon, pg_url, pitr_host, pitr_status, web
from ops.checks import Warn, checklist
from ops.cli import OpsTask, TaskCall
from ops.clock import iso_z_or_none
from ops.drills import drill_due
from ops.envfile import parse_env_file
from ops.errors import CheckFailed, InventoryError, OpsError
from ops.health_probes import app_url_probes, neon_branch_probe
from ops.hosts import connect, is_loopback
from ops.keys import key_status
from ops.migrations.drift import environment_drift
from ops.output import human_size
from ops.platform_steps import app_probes
from ops.platforms import platform_name
from ops.secrets import reveal
from ops.status_facts import last_backup, migration_state
from ops.storage import open_storage
from ops.triage import env_file_path

if TYPE_CHECKING:
    from ops.checks import Probe
    from ops.hosts import HostConfig
    from ops.inventory import Environment

AUTH_SECRET_NAMES = ("NEXTAUTH_SECRET", "BETTER_AUTH_SECRET", "AUTH_SECRET")
MIN_AUTH_SECRET_LENGTH = 32
TLS_MODES = {"require", "verify-ca", "verify-full"}
POOLER_PORTS = {6432}
POOLER_HOST_MARKS = ("pooler", "pgbouncer", "pool.")
DEFAULT_RPO_HOURS = 24
HSTS_MIN_SECONDS = 180 * 24 * 3600  # the usual minimum for HSTS preload lists is a year; half of it is a floor


# --- pure rules (table-tested) -----------------------------------------------------------------


def required_variables(env: Environment) -> list[str]:
    """The variables every host's env file must have (contract A's names) plus the inventory's app.env keys."""
    names = ["DATABASE_URL"]
    if env.has("database.direct_url"):
        names.append("DIRECT_URL")
    if env.has("storage") and env.raw("storage.provider", "s3") != "local":
        names += ["S3_BUCKET", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"]
        if env.has("storage.endpoint"):
            names.append("S3_ENDPOINT")
    names += [key for key in (env.raw("app.env", None) or {}) if key not in names]
    return names


def missing_variables(values: dict[str, str], required: list[str]) -> list[str]:
    missing = [name for name in required if not values.get(name)]
    if not any(values.get(name) for name in AUTH_SECRET_NAMES):
        missing.append(" or ".join(AUTH_SECRET_NAMES))
    return missing


def auth_secret_problem(values: dict[str, str]) -> str | None:
    present = {name: values[name] for name in AUTH_SECRET_NAMES if values.get(name)}
    if not present:
        return f"no auth secret ({', '.join(AUTH_SECRET_NAMES)})"
    short = [f"{name} has {len(value)}" for name, value in present.items() if len(value) < MIN_AUTH_SECRET_LENGTH]
    return f"{'; '.join(short)} characters (at least {MIN_AUTH_SECRET_LENGTH} needed)" if short else None


def is_local_database(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname)


def tls_problem(url: str) -> str | None:
    """Why `url` does not insist on TLS, or None (local URLs need none)."""
    if is_local_database(url):
        return None
    mode = dict(parse_qsl(urlsplit(url).query)).get("sslmode")
    if mode in TLS_MODES:
        return None
    return f"sslmode={mode}: TLS is optional" if mode else "no sslmode: libpq falls back to plain text silently"


def looks_pooled(url: str, direct_url: str | None) -> bool:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    params = dict(parse_qsl(parts.query))
    return (parts.port in POOLER_PORTS or any(mark in host for mark in POOLER_HOST_MARKS)
            or "pgbouncer" in params or bool(direct_url and direct_url != url))


def pooler_problems(url: str, direct_url: str | None) -> list[str]:
    """A pooled URL needs pgbouncer=true (Prisma: no prepared statements) and a direct URL beside it."""
    if not looks_pooled(url, direct_url):
        return []
    problems = []
    if dict(parse_qsl(urlsplit(url).query)).get("pgbouncer") != "true":
        problems.append("the pooled database.url lacks pgbouncer=true")
    if not direct_url or direct_url == url:
        problems.append("no database.direct_url for migrations and admin work (a pooler breaks advisory locks)")
    return problems


def header_problems(headers: dict[str, str]) -> tuple[list[str], list[str]]:
    """(failures, warnings) about HSTS and CSP in response headers (names case-insensitive)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    failures, warnings = [], []
    hsts = lowered.get("strict-transport-security")
    if hsts is None:
        failures.append("no Strict-Transport-Security header")
    else:
        age = dict(part.strip().partition("=")[::2] for part in hsts.lower().split(";")).get("max-age", "0")
        if not age.strip('"').isdigit() or int(age.strip('"')) < HSTS_MIN_SECONDS:
            warnings.append(f"HSTS max-age={age} is under {HSTS_MIN_SECONDS} s (180 days)")
    if "content-security-policy" not in lowered:
        if "content-security-policy-report-only" in lowered:
            warnings.append("CSP is report-only")
        else:
            failures.append("no Content-Security-Policy header")
    return failures, warnings


# --- probes ------------------------------------------------------------------------------------


class EnvFiles:
    """Each host's env file, read once per preflight over SSH."""

    def __init__(self, env: Environment):
        self.env = env
        self._read: dict[str, dict[str, str] | OpsError] = {}

    def values(self, host: HostConfig) -> dict[str, str]:
        if host.name not in self._read:
            try:
                self._read[host.name] = self._load(host)
            except OpsError as error:
                self._read[host.name] = error
        result = self._read[host.name]
        if isinstance(result, OpsError):
            raise result
        return result

    def _load(self, host: HostConfig) -> dict[str, str]:
        path = env_file_path(self.env.app_settings(host.name))
        if not path:
            raise CheckFailed(f"no env file configured for host {host.name}", hint="set app.env_file (or app.dir)")
        with connect(host) as connection:
            text = connection.read_text(path)
        if text is None:
            raise CheckFailed(f"{path} does not exist on host {host.name}",
                              hint=f"`inv deploy.push-env --env {self.env.name}` writes it")
        return parse_env_file(text)


def env_file_probe(env: Environment, files: EnvFiles, host: HostConfig) -> Probe:
    def probe() -> str:
        missing = missing_variables(files.values(host), required_variables(env))
        if missing:
            raise CheckFailed(f"host {host.name}: missing {', '.join(missing)}",
                              hint=f"add them to the inventory or the secret store, then "
                                   f"`inv deploy.push-env --env {env.name}`")
        return f"all {len(required_variables(env)) + 1} required variables present"

    return probe


def auth_secret_probe(env: Environment, files: EnvFiles, host: HostConfig) -> Probe:
    def probe() -> str:
        problem = auth_secret_problem(files.values(host))
        if problem:
            raise CheckFailed(f"host {host.name}: {problem}",
                              hint=f"`inv secrets.rotate --env {env.name} --name AUTH_SECRET` generates a long one")
        return f"at least {MIN_AUTH_SECRET_LENGTH} characters"

    return probe


def _database_urls(env: Environment) -> list[tuple[str, str]]:
    urls = [("database.url", reveal(env.value("database.url")))]
    if env.has("database.direct_url"):
        urls.append(("database.direct_url", reveal(env.value("database.direct_url"))))
    return urls


def tls_probe(env: Environment) -> Probe:
    def probe() -> str:
        problems = [f"{path} ({pg_url.parse_url(url).describe()}): {problem}"
                    for path, url in _database_urls(env) if (problem := tls_problem(url))]
        if problems:
            raise CheckFailed("; ".join(problems), hint="add ?sslmode=require (or verify-full) to the URL")
        if all(is_local_database(url) for _path, url in _database_urls(env)):
            return "local database: TLS not needed"
        return "sslmode requires TLS on every URL"

    return probe


def pooler_probe(env: Environment) -> Probe:
    def probe() -> str:
        url = reveal(env.value("database.url"))
        direct = reveal(env.value("database.direct_url")) if env.has("database.direct_url") else None
        if direct is None and (derived := pg_url.direct_from_pooled(url)) is not None:
            direct = derived.reveal()  # Neon's pooler: the direct endpoint is derived for admin work
        problems = pooler_problems(url, direct)
        if problems:
            raise CheckFailed("; ".join(problems), hint="append &pgbouncer=true to the pooled URL and set "
                                                        "database.direct_url to the server itself")
        return "pooled URL with pgbouncer=true and a direct URL" if looks_pooled(url, direct) else "no pooler"

    return probe


def migrations_probe(env: Environment) -> Probe:
    def probe() -> str:
        try:
            state = migration_state(env)
        except InventoryError as error:  # nowhere to read migrations from: a warning, not a broken inventory
            raise Warn(error.message) from None
        if state is None:
            raise Warn("no migrations to compare with: set app.repository or hosts with app.dir")
        if state.failed or state.pending:
            raise CheckFailed(state.verdict, hint=f"`inv migrate --env {env.name}` (a failed one needs resolving "
                                                  "first: `inv migrate.status` shows it)")
        if not state.up_to_date:
            raise Warn(state.verdict)
        return state.verdict

    return probe


def drift_probe(env: Environment) -> Probe:
    """What `inv migrate.drift` finds, as a warning: a hand-made change is not always wrong, but it is unrecorded."""
    def probe() -> str:
        try:
            state = migration_state(env)
            if state is None or not state.up_to_date:
                raise Warn("not compared until the migrations are up to date (see migrations)")
            source, differences = environment_drift(env, f"opsbook preflight {env.name}")
        except (InventoryError, CheckFailed) as error:  # no migrations known, or no role to create the scratch db
            raise Warn(error.message) from None
        if differences:
            listed = "; ".join(map(str, differences[:5])) + ("; …" if len(differences) > 5 else "")
            raise Warn(f"{len(differences)} difference(s) from what the migrations build: {listed} "
                       f"(`inv migrate.drift --env {env.name}` lists them)")
        return f"the schema is what the {len(source.migrations)} migration(s) build"

    return probe


def backup_probe(env: Environment) -> Probe:
    def probe() -> str:
        rpo_hours = float(env.raw("targets.rpo_hours", DEFAULT_RPO_HOURS))
        backup = last_backup(env, open_storage(env.storage_config("backups")))
        fix = f"`inv backup --env {env.name}`, then `inv backup.verify --env {env.name}`"
        if backup is None:
            raise CheckFailed("no complete backup", hint=fix)
        age_hours = backup["age_seconds"] / 3600
        said = f"last backup {backup['id']} ({human_size(backup['size_bytes'])}) is {age_hours:.1f} h old"
        if age_hours > rpo_hours:
            raise CheckFailed(f"{said}: older than the RPO target of {rpo_hours:g} h",
                              hint=f"{fix}; check the nightly schedule (cron/timer) runs")
        verified = backup["newest_verified"]
        if verified is None:
            raise CheckFailed(f"{said}; no backup was ever verified", hint=f"`inv backup.verify --env {env.name}`")
        if verified["id"] != backup["id"]:
            raise Warn(f"{said}, not verified yet (newest verified: {verified['id']})")
        return f"{said}, verified ({verified['kind']}) at {verified['at']}; RPO {rpo_hours:g} h"

    return probe


def pitr_probe(env: Environment) -> Probe:
    """Point-in-time recovery (ops/pitr_status.py): fails unless it works within targets.rpo_seconds; warns
    when a protected, self-hosted environment does not have it."""
    def probe() -> str:
        if not env.has("pitr"):
            raise Warn("point-in-time recovery is off: a crash loses everything since the last dump; set "
                       f"pitr.data_dir, then `inv pitr.setup --env {env.name}` and `inv pitr.base --env {env.name}`")
        report = pitr_status.collect(env, open_storage(env.storage_config("backups")))
        if report.verdict != "ok":
            raise CheckFailed(f"point-in-time recovery is {report.verdict}: {report.reasons[0]}",
                              hint=f"`inv pitr.status --env {env.name}` for the details")
        return (f"archive lag {report.archive_lag_seconds or 0:.0f} s (RPO {report.rpo_seconds:.0f} s); recoverable "
                f"{iso_z_or_none(report.earliest)} .. {iso_z_or_none(report.latest)}")

    return probe


def drill_probe(env: Environment) -> Probe:
    def probe() -> str:
        due = drill_due(env)
        if due.done_this_quarter:
            return f"{due.quarter} drill done ({(due.last_passed or due.last or {}).get('id')})"
        last = due.last
        said = f"last drill {last.get('id')}: {'passed' if last.get('passed') else 'FAILED'}" if last else "never"
        raise CheckFailed(f"no passed drill in {due.quarter} ({said}); due by {due.due_by:%Y-%m-%d}",
                          hint=f"`inv drill --env {env.name} --target {env.raw('drill.target', '<scratch env>')}`")

    return probe


def key_age_probe(env: Environment) -> Probe:
    def probe() -> str:
        if not env.has("storage") or env.raw("storage.provider", "s3") == "local":
            return "not applicable: no storage keys (local folder)"
        try:
            status = key_status(env)
        except InventoryError as error:  # a check result, not the end of the checklist
            raise CheckFailed(error.message, hint=error.hint) from None
        if status.age_days is None:
            raise Warn(f"key {status.key_id_masked}: its age is unknown to the {env.raw('keys.provider', 'static')} "
                       "provider")
        said = f"key {status.key_id_masked} is {status.age_days:.0f} days old"
        if status.overdue:
            raise CheckFailed(f"{said}: rotation was due {_day(status.due_at)}",
                              hint=f"`inv keys.rotate --env {env.name}`")
        return f"{said}; rotate by {_day(status.due_at)}"

    return probe


def _day(moment: Any) -> str:
    return f"{moment:%Y-%m-%d}" if hasattr(moment, "strftime") else str(moment)[:10]


def lifecycle_probe(env: Environment, section: str) -> Probe:
    def probe() -> str:
        storage = open_storage(env.storage_config(section))
        if storage.config.provider == "local":
            return "not applicable: a local folder has no lifecycle rules"
        rules = [rule for rule in storage.lifecycle_rules() if rule.get("Status") == "Enabled"
                 and (rule.get("AbortIncompleteMultipartUpload") or {}).get("DaysAfterInitiation")]
        if not rules:
            raise CheckFailed(f"{storage.describe()}: no enabled rule aborts incomplete multipart uploads "
                              "(a dead upload is billed forever)",
                              hint=f"`inv backup.assets --env {env.name} --lifecycle` sets it")
        days = min(rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] for rule in rules)
        return f"incomplete uploads aborted after {days} days"

    return probe


def headers_probe(url: str) -> Probe:
    def probe() -> str:
        headers = fetch_headers(url)
        failures, warnings = header_problems(headers)
        if failures:
            raise CheckFailed(f"{url}: {'; '.join(failures)}",
                              hint="set them in the app (next.config headers()) or at the CDN/proxy")
        if warnings:
            raise Warn(f"{url}: {'; '.join(warnings)}")
        return f"{url}: HSTS and CSP present"

    return probe


def fetch_headers(url: str) -> dict[str, str]:
    request = web.request(url, headers={"User-Agent": "opsbook-preflight"})
    try:
        with web.urlopen(request, timeout=10) as response:
            return dict(response.headers.items())
    except urllib.error.HTTPError as error:
        return dict(error.headers.items())  # an error page still carries (or lacks) the headers
    except (urllib.error.URLError, OSError) as error:
        raise CheckFailed(f"{url} cannot be reached: {getattr(error, 'reason', error)}",
                          hint="check app.public_url, DNS and TLS") from None


def probes(env: Environment) -> list[tuple[str, Probe]]:
    files = EnvFiles(env)
    checks: list[tuple[str, Probe]] = []
    hosts = env.host_configs()
    for host in hosts:
        checks += [(f"env file on {host.name}", env_file_probe(env, files, host)),
                   (f"auth secret on {host.name}", auth_secret_probe(env, files, host))]
    checks += [("database TLS", tls_probe(env)), ("database pooler", pooler_probe(env)),
               ("migrations", migrations_probe(env)), ("schema drift", drift_probe(env))]
    if neon.is_neon(env):
        checks.append(("neon branch", neon_branch_probe(env)))
    if env.has("backups"):
        checks.append(("last backup", backup_probe(env)))
        if env.protected or backup_lock.lock_days(env) is not None:
            checks.append(("backup lock", backup_lock.lock_probe(env)))
    if env.has("pitr") or (env.protected and not env.sandbox and pitr_host.managed_provider(env) is None):
        checks.append(("point-in-time recovery", pitr_probe(env)))
    checks += [("DR drill", drill_probe(env)), ("storage key age", key_age_probe(env))]
    checks += [(f"lifecycle rule ({section})", lifecycle_probe(env, section))
               for section in ("storage", "backups") if env.has(section)]
    for host in hosts:
        checks += app_url_probes(env, host)
    if platform_name(env) != "ssh":
        checks += app_probes(env)
    public_url = env.raw("app.public_url", None)
    if public_url:
        checks.append(("security headers", headers_probe(str(public_url))))
    return checks


@task(klass=OpsTask, multi_env=True)
def preflight(call: TaskCall, env=None, json=False):
    """The production readiness checklist: pass/warn/fail with the fix for each; exit 3 if any fails."""
    checklist(call.environment, call.output, "preflight", probes(call.environment))
