"""The database server as a host opsbook works on for point-in-time recovery: its data directory,
its OS user, where the engine's files go, its restart; and the environment's engine, chosen by its
backup storage (ops/pitr_engine.py). The server's machine is this one (`pitr.data_dir` alone, or the
sandbox's own cluster: `LocalMachine`) or a host reached over SSH (`pitr.host`: ops/pitr_ssh.py's
`SshMachine`); both answer the same calls, which the runbooks make through `machine_of`.

Managed databases cannot run an archive command: `managed_provider` names the provider, whose own
point-in-time recovery is what to use there.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ops import pg_url, pitr_barman, pitr_engine, pitr_pgbackrest
from ops.errors import CheckFailed, InventoryError, StepFailed
from ops.hosts import HostConfig
from ops.lazy_dataclasses import dataclass
from ops.pitr_engine import Engine, ServerSide
from ops.pitr_ssh import SshMachine
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
    """The server's side of PITR, on this machine or on `ssh`."""

    restart: str | None
    archive_timeout: int
    log_file: Path | None = None  # where pg_ctl restart sends the server's log (the sandbox's own)
    bin_dir: Path | None = None  # pitr.bin_dir: the server programs (else found by the data directory's version)
    ssh: HostConfig | None = None  # pitr.host: the database host over SSH

    @property
    def where(self) -> str:
        return f"host {self.ssh.name} ({self.ssh.target})" if self.ssh else "this machine"


default_os_user = pitr_engine.default_os_user


def database_host(env: Environment) -> DatabaseHost:
    """The `pitr` section; CheckFailed naming the provider's own PITR for a managed database."""
    managed = managed_provider(env)
    if managed is not None:
        raise CheckFailed(f"{env.name}'s database is managed by {managed[0]}: opsbook cannot configure WAL archiving "
                          "there", hint=f"use {managed[1]}; `inv restore --from {env.name}` still restores dumps")
    ssh = ssh_host(env)
    log_file = None
    if env.sandbox and not env.has("pitr.data_dir"):  # the sandbox's own cluster, restarted with its own log
        sandbox = Sandbox(env.inventory.state_dir / "sandbox")
        data_dir, log_file = sandbox.data_dir, sandbox.log_file
    elif env.has("pitr.data_dir"):
        data_dir = Path(str(env.value("pitr.data_dir")))
    else:
        raise env.missing("pitr.data_dir")
    config_dir = env.raw("pitr.config_dir", None) or str(data_dir.parent / f"opsbook-pitr-{env.name}")
    os_user = env.raw("pitr.os_user", None) or (default_os_user() if ssh is None else
                                                 "postgres" if ssh.user == "root" else ssh.user)
    bin_dir = Path(str(env.value("pitr.bin_dir"))) if env.has("pitr.bin_dir") else None
    return DatabaseHost(data_dir=data_dir, os_user=os_user, config_dir=Path(config_dir),
                        restart=env.raw("pitr.restart", None),
                        archive_timeout=int(env.raw("pitr.archive_timeout", DEFAULT_ARCHIVE_TIMEOUT)),
                        window_days=int(env.raw("pitr.window_days", DEFAULT_WINDOW_DAYS)), log_file=log_file,
                        bin_dir=bin_dir, ssh=ssh)


def ssh_host(env: Environment) -> HostConfig | None:
    """`pitr.host`: the name of one of the environment's hosts, or an address written as a host is; None: here.
    A folder backup storage (pgBackRest's repository) must be on this machine, where opsbook reads it."""
    declared = env.raw("pitr.host", None)
    if declared is None:
        return None
    if env.storage_config("backups").provider == "local":
        raise CheckFailed(f"{env.name}'s backups are a folder on this machine: a database host reached over SSH "
                          "cannot archive into it", hint="use an S3 or R2 backup bucket (barman-cloud) with pitr.host")
    if not isinstance(declared, str):
        return env.host_configs([{"name": "database", **declared}])[0]
    found = [host for host in env.host_configs() if host.name == declared]
    if not found:
        names = ", ".join(host.name for host in env.host_configs()) or "none"
        raise InventoryError(f"envs.{env.name}.pitr.host: {declared!r} is not one of {env.name}'s hosts ({names})",
                             where=env.inventory.location(f"envs.{env.name}.pitr.host"),
                             hint=f"name a host of envs.{env.name}.hosts, or give the database host's address "
                                  "(pitr.host: {address, user, port, key_file})")
    return found[0]


ENGINE_CLASSES: dict[str, type[Engine]] = {pitr_barman.ENGINE: pitr_barman.BarmanCloud,
                                           pitr_pgbackrest.ENGINE: pitr_pgbackrest.PgBackRest}


def engine_of(env: Environment) -> Engine:
    """The engine of the environment's backup storage (an S3/R2 bucket: barman-cloud; a folder: pgBackRest)."""
    config = env.storage_config("backups")
    engine = ENGINE_CLASSES[pitr_engine.engine_name(config)](config, str(env.raw("pitr.server_name", env.name)))
    if engine.encrypts:  # generated by pitr.setup (ops/pitr_cipher.py); none: an archive made before, not encrypted
        engine.passphrase = env.secret_store().get(pitr_engine.PASSPHRASE_KEY)
    return engine


def machine_of(host: DatabaseHost) -> LocalMachine | SshMachine:
    """Where the server's side of PITR runs: this machine, or the database host over SSH."""
    return SshMachine(host.ssh) if host.ssh else LocalMachine()


def check_data_dir(host: DatabaseHost, machine: LocalMachine | SshMachine) -> int:
    """The data directory's major version; CheckFailed when `host.data_dir` holds no cluster there."""
    major = machine.data_directory(host.data_dir)
    if major is None:
        raise CheckFailed(f"{host.data_dir} is not a PostgreSQL data directory on {host.where} (no PG_VERSION)",
                          hint="set pitr.data_dir to the server's data_directory (`SHOW data_directory;`)"
                               + ("" if host.ssh else ", or pitr.host to the database host it is on"))
    return major


def restart(host: DatabaseHost, machine: LocalMachine | SshMachine) -> None:
    """The configured restart (pitr.restart), else pg_ctl's, which keeps the server's command-line options."""
    major = check_data_dir(host, machine)
    machine.restart(host.data_dir, major, host.log_file or host.config_dir / "postgres.log", RESTART_TIMEOUT_SECONDS,
                    host.bin_dir, host.os_user, host.restart)


def run_engine(host: DatabaseHost, machine: LocalMachine | SshMachine, command: list[str], engine: Engine, *,
               as_server: bool = True, extra: Mapping[str, str] | None = None, what: str) -> str:
    """An engine command on the server's machine (as the server's OS user unless not `as_server`); its stdout."""
    return machine.run(command, engine, user=host.os_user if as_server else None, extra=extra, what=what)


class LocalMachine:
    """The server's side on this machine: files written by Python, commands run as children."""

    where = "this machine"

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield  # nothing to open: SshMachine's keeps one connection for the block

    def data_directory(self, data_dir: Path) -> int | None:
        try:
            return int((data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError):
            return None

    def resolve(self, path: Path) -> str:
        return str(path.resolve())

    def matches(self, path: Path, text: str) -> bool:
        try:
            return path.read_text() == text
        except OSError:
            return False

    def owned_by(self, path: Path, user: str) -> bool:
        """`path` is a folder `user` owns (anyone's when we are not root: we write it ourselves)."""
        try:
            return path.is_dir() and (os.geteuid() != 0 or path.stat().st_uid == pwd.getpwnam(user).pw_uid)
        except (OSError, KeyError):
            return False

    def make_folder(self, path: Path, user: str) -> None:
        """`path` (its parents too, as they come) as a 0750 folder of `user`, the server's OS user."""
        path.mkdir(parents=True, exist_ok=True)
        _own(path, user, 0o750)

    def empty_folder(self, path: Path, user: str) -> list[str]:
        """What `path` held (names), removed; `path` left an empty 0700 folder of `user`."""
        left = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        _own(path, user, 0o700)
        return left

    def write_private(self, path: Path, text: str, mode: int, user: str) -> None:
        """`text` into `path`, `mode`, owned by `user`: written under a temporary name, then renamed."""
        path.parent.mkdir(parents=True, exist_ok=True)
        _own(path.parent, user, 0o700)
        partial = path.with_name(path.name + ".tmp")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        _own(partial, user, mode)
        partial.replace(path)

    def check_installed(self, engine: Engine) -> None:
        engine.check_installed()

    def restart(self, data_dir: Path, major: int, log_file: Path, timeout: int, bin_dir: Path | None,
                os_user: str, command: str | None) -> None:
        line = (["sh", "-c", command] if command else
                pitr_engine.as_user([str((bin_dir or find_server_bindir(major)) / "pg_ctl"), "restart", "-D",
                                     str(data_dir), "-m", "fast", "-w", "-t", str(timeout), "-l", str(log_file)],
                                    os_user))  # -l: without a log file the server would keep our output pipes open
        result = subprocess.run(line, capture_output=True, text=True, check=False, timeout=timeout * 2,
                                stdin=subprocess.DEVNULL, cwd="/")
        if result.returncode != 0:
            raise StepFailed(f"restarting PostgreSQL ({data_dir}) failed: "
                             f"{redact(' '.join((result.stderr + result.stdout).split()))[-800:]}",
                             hint="read the server's log; the settings written by ALTER SYSTEM are in "
                                  "postgresql.auto.conf (ALTER SYSTEM RESET undoes them)")

    def run(self, command: list[str], engine: Engine, *, user: str | None, extra: Mapping[str, str] | None,
            what: str) -> str:
        return pitr_engine.run(command, engine, user=user, extra=extra, what=what)


def _own(path: Path, user: str, mode: int) -> None:
    path.chmod(mode)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
