"""inv health's probes: can we reach the database, the buckets, the hosts and the app? (preflight reuses them)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ops import neon, pg, pg_url
from ops.errors import CheckFailed
from ops.hosts import connect, fetch_from_here, is_on_host
from ops.storage import open_storage

if TYPE_CHECKING:
    from ops.checks import Probe
    from ops.hosts import HostConfig
    from ops.inventory import Environment


def database_probe(env: Environment, direct: bool) -> Probe:
    def probe() -> str:
        url = env.database_url(direct=direct)
        with pg.connect(url, application_name="opsbook health", connect_timeout=5) as connection:
            major, minor = pg.server_version(connection)
        return f"{pg_url.parse_url(url).describe()}, PostgreSQL {major}.{minor}"

    return probe


def neon_branch_probe(env: Environment) -> Probe:
    """The environment's Neon branch exists and has a compute endpoint (the pooled and direct ones are probed
    by connecting, as any database)."""
    def probe() -> str:
        api = neon.client(env)
        branch = api.require_branch(neon.branch_name(env))
        endpoints = api.endpoints(branch.id)
        if not endpoints:
            raise CheckFailed(f"Neon branch {branch.name} has no compute endpoint",
                              hint="add a read-write compute to the branch in the Neon console")
        shown = ", ".join(f"{e.get('type', '?')} {e.get('current_state', '?')}" for e in endpoints)
        return f"project {api.project_id}: branch {branch.name} ({branch.id}), endpoints: {shown}"

    return probe


def storage_probe(env: Environment, section: str) -> Probe:
    def probe() -> str:
        storage = open_storage(env.storage_config(section))
        if not storage.bucket_exists():
            raise CheckFailed(f"bucket {storage.config.bucket} does not exist ({storage.describe()})",
                              hint=f"create it (`inv provision --env {env.name}`) or fix {section}.bucket")
        listed = sum(1 for _ in zip(range(10), storage.list(), strict=False))
        return f"{storage.describe()}, listing works ({listed}{'+' if listed == 10 else ''} objects seen)"

    return probe


def host_probe(host: HostConfig) -> Probe:
    def probe() -> str:
        with connect(host) as connection:
            result = connection.run("uname -n", check=True, timeout=10)
        return f"{host.user}@{host.address}:{host.port} ({result.stdout.strip()})"

    return probe


def url_probe(env: Environment, host: HostConfig, url: str) -> Probe:
    def probe() -> str:
        status, body = fetch(host, url)
        if status != 200:
            reason = f"HTTP {status}" if status else "no answer"
            raise CheckFailed(f"{url} on {host.name}: {reason} {body[:200].strip()}".strip(),
                              hint=f"look at the app's logs on {host.name}; `inv deploy.restart --env {env.name}`"
                                   " restarts it")
        return f"{url} answered 200"

    return probe


def fetch(host: HostConfig, url: str) -> tuple[int, str]:
    """URLs on the host's loopback are fetched on the host itself, others from here."""
    if not is_on_host(url):
        return fetch_from_here(url)
    with connect(host) as connection:
        return connection.fetch_url(url)


def probes(env: Environment) -> list[tuple[str, Probe]]:
    checks: list[tuple[str, Probe]] = [("database", database_probe(env, direct=False))]
    if env.has("database.direct_url") or neon.is_neon(env):  # Neon: the direct endpoint beside the pooler
        checks.append(("database (direct)", database_probe(env, direct=True)))
    if neon.is_neon(env):
        checks.append(("neon branch", neon_branch_probe(env)))
    for section in ("storage", "backups"):
        if env.has(section):
            checks.append((f"{section} bucket", storage_probe(env, section)))
    for host in env.host_configs():
        checks += [(f"host {host.name}", host_probe(host)), *app_url_probes(env, host)]
    return checks


def app_url_probes(env: Environment, host: HostConfig) -> list[tuple[str, Probe]]:
    """The app's health and ready URLs on `host`, those the inventory names."""
    app = env.app_settings(host.name)
    return [(f"app {kind.split('_')[0]} on {host.name}", url_probe(env, host, app[kind]))
            for kind in ("health_url", "ready_url") if app.get(kind)]
