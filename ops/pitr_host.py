"""The database server as a host opsbook works on for point-in-time recovery: its data directory,
its OS user, where the engine's files go, its restart; and the environment's engine, chosen by its
backup storage (ops/pitr_engine.py). This machine only for now (the inventory's `pitr.data_dir`, or
the sandbox's own cluster); a database host reached over SSH would implement the same calls.

Managed databases cannot run an archive command: `managed_provider` names the provider, whose own
point-in-time recovery is what to use there.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from ops import pg_url, pitr_barman, pitr_engine, pitr_pgbackrest
from ops.errors import CheckFailed, StepFailed
from ops.lazy_dataclasses import dataclass
from ops.pitr_engine import Engine, ServerSide
from ops.sandbox import Sandbox, find_server_bindir
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.inventory import Environment

DEFAULT_ARCHIVE_TIMEOUT = 60
DEFAULT_WINDOW_DAYS = 7
RESTART_TIMEOUT_SECONDS = 120

# host name suffix (or database.provider) -> what the provider calls its own point-in-time recovery
MANAGED = {
    "neon": ("neon.tech", "Neon's point-in-time restore (branch restore to a timestamp, in the console or API)"),
    "rds": ("rds.amazonaws.com", "Amazon RDS point-in-time recovery (restore-db-instance-to-point-in-time)"),
    "supabase": ("supabase.co", "Supabase's Point-in-Time Recovery add-on (project settings → backups)"),
    "cloudsql": ("cloudsql", "Cloud SQL point-in-time recovery (gcloud sql instances clone --point-in-time)"),
    "azure": ("postgres.database.azure.com", "Azure Database for PostgreSQL point-in-time restore"),
    "digitalocean": ("db.ondigitalocean.com", "DigitalOcean Managed Databases' point-in-time restore (fork)"),
}


def managed_provider(env: Environment) -> tuple[str, str] | None:
    """(provider, its own PITR) when the environment's database is a managed service."""
    declared = env.raw("database.provider", None)
    if declared in MANAGED:
        return declared, MANAGED[declared][1]
    host = pg_url.parse_url(env.admin_url()).host
    for name, (suffix, feature) in MANAGED.items():
        if host.endswith(suffix) or f".{suffix}." in host:
            return name, feature
    return None


@dataclass(frozen=True)
class DatabaseHost(ServerSide):
    """The server's side of PITR on this machine."""

    restart: str | None
    archive_timeout: int
    log_file: Path | None = None  # where pg_ctl restart sends the server's log (the sandbox's own)


default_os_user = pitr_engine.default_os_user


def database_host(env: Environment) -> DatabaseHost:
    """The `pitr` section; CheckFailed naming the provider's own PITR for a managed database."""
    managed = managed_provider(env)
    if managed is not None:
        raise CheckFailed(f"{env.name}'s database is managed by {managed[0]}: opsbook cannot configure WAL archiving "
                          "there", hint=f"use {managed[1]}; `inv restore --from {env.name}` still restores dumps")
    log_file = None
    if env.sandbox and not env.has("pitr.data_dir"):  # the sandbox's own cluster, restarted with its own log
        sandbox = Sandbox(env.inventory.state_dir / "sandbox")
        data_dir, log_file = sandbox.data_dir, sandbox.log_file
    elif env.has("pitr.data_dir"):
        data_dir = Path(str(env.value("pitr.data_dir")))
    else:
        raise env.missing("pitr.data_dir")
    config_dir = env.raw("pitr.config_dir", None) or str(data_dir.parent / f"opsbook-pitr-{env.name}")
    return DatabaseHost(data_dir=data_dir, os_user=env.raw("pitr.os_user", None) or default_os_user(),
                        config_dir=Path(config_dir), restart=env.raw("pitr.restart", None),
                        archive_timeout=int(env.raw("pitr.archive_timeout", DEFAULT_ARCHIVE_TIMEOUT)),
                        window_days=int(env.raw("pitr.window_days", DEFAULT_WINDOW_DAYS)), log_file=log_file)


ENGINE_CLASSES: dict[str, type[Engine]] = {pitr_barman.ENGINE: pitr_barman.BarmanCloud,
                                           pitr_pgbackrest.ENGINE: pitr_pgbackrest.PgBackRest}


def engine_of(env: Environment) -> Engine:
    """The engine of the environment's backup storage (an S3/R2 bucket: barman-cloud; a folder: pgBackRest)."""
    config = env.storage_config("backups")
    return ENGINE_CLASSES[pitr_engine.engine_name(config)](config, str(env.raw("pitr.server_name", env.name)))


def check_data_dir(host: DatabaseHost) -> None:
    if not (host.data_dir / "PG_VERSION").is_file():
        raise CheckFailed(f"{host.data_dir} is not a PostgreSQL data directory on this machine (no PG_VERSION)",
                          hint="set pitr.data_dir to the server's data_directory (`SHOW data_directory;`); "
                               "database hosts reached over SSH are not supported yet")


def read_private(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def write_private(path: Path, text: str, mode: int, user: str) -> None:
    """`text` into `path`, `mode`, owned by `user` (the server's): written under a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _own(path.parent, user, 0o700)
    partial = path.with_name(path.name + ".tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    _own(partial, user, mode)
    partial.replace(path)


def owned_by(path: Path, user: str) -> bool:
    """`path` is a folder `user` owns (anyone's when we are not root: we write it ourselves)."""
    try:
        return path.is_dir() and (os.geteuid() != 0 or path.stat().st_uid == pwd.getpwnam(user).pw_uid)
    except (OSError, KeyError):
        return False


def make_folder(path: Path, user: str) -> None:
    """`path` (its parents too, as they come) as a 0750 folder of `user`, the server's OS user."""
    path.mkdir(parents=True, exist_ok=True)
    _own(path, user, 0o750)


def _own(path: Path, user: str, mode: int) -> None:
    path.chmod(mode)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def restart_command(host: DatabaseHost, bin_dir: Path) -> list[str]:
    """The configured restart, else pg_ctl's (which keeps the server's command-line options)."""
    if host.restart:
        return ["sh", "-c", host.restart]
    # -l: without a log file the server would keep our output pipes open
    return pitr_engine.as_user([str(bin_dir / "pg_ctl"), "restart", "-D", str(host.data_dir), "-m", "fast", "-w",
                                "-t", str(RESTART_TIMEOUT_SECONDS), "-l",
                                str(host.log_file or host.config_dir / "postgres.log")],
                               host.os_user)


def server_bin_dir(env: Environment, host: DatabaseHost) -> Path:
    """The server programs of the data directory's major version (pitr.bin_dir, else Debian's or pg_config's)."""
    if env.has("pitr.bin_dir"):
        return Path(str(env.value("pitr.bin_dir")))
    major = int((host.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
    return find_server_bindir(major)


def restart(host: DatabaseHost, bin_dir: Path) -> None:
    command = restart_command(host, bin_dir)
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=RESTART_TIMEOUT_SECONDS * 2,
                            stdin=subprocess.DEVNULL, cwd="/")
    if result.returncode != 0:
        raise StepFailed(f"restarting PostgreSQL ({host.data_dir}) failed: "
                         f"{redact(' '.join((result.stderr + result.stdout).split()))[-800:]}",
                         hint="read the server's log; the settings written by ALTER SYSTEM are in "
                              "postgresql.auto.conf (ALTER SYSTEM RESET undoes them)")
