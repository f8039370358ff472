"""The embedded local environment: a private PostgreSQL cluster and folder buckets with a demo app.

`inv sandbox.up` makes it (idempotently); every task on an env with `sandbox: true`
calls `ensure_running()`. Layout under `home` (by default `.ops/sandbox`):

    pgdata/            the cluster (owned by the `postgres` user when we run as root)
    run/               its unix socket
    postgres.log       the server log
    credentials.json   the superuser password (mode 0600)
    sandbox.json       the port chosen at first start (re-chosen if taken later)
    storage/<bucket>/  the app and backup buckets (local storage provider)

What a sandbox env gets from it (`overrides`): the demo database `app` and the buckets, and,
unless the env sets its own, `drill.target: NAME-drill`, a `notify` file channel at
`<state>/notices/NAME.md` and `database.log_command` reading postgres.log. `NAME-drill` (made
up by the inventory, see ops/inventory.py) is the drill target: the second database
`app_drill` of the same cluster, backups under `NAME-drill/`, no hosts.

The cluster is throwaway, so it runs with fsync=off and friends: fast, and a crash
can lose it, which `sandbox.up` then rebuilds from the demo app.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ops.demo import seed
from ops.errors import OpsError, StepFailed
from ops.inventory import SANDBOX_DRILL_SUFFIX, Environment
from ops.lazy_dataclasses import dataclass
from ops.migrations import apply_pending, migration_status
from ops.output import Output
from ops.pg import connect, create_database, database_exists, table_row_counts
from ops.secrets import Secret, redact
from ops.storage import StorageConfig, open_storage

SERVER_USER = "postgres"  # the superuser inside the cluster, and the OS user when we are root
APP_DATABASE = "app"
DRILL_DATABASE = "app_drill"  # the drill target's: restored into by `inv drill --env local`
APP_BUCKET = "sandbox-app"
BACKUP_BUCKET = "sandbox-backups"
HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 30
IMAGE_WRITERS = 8
# Unix socket paths are limited to about 107 bytes; beyond that we listen on TCP only.
MAX_SOCKET_DIR_LENGTH = 90
# Throwaway data: durability settings off (fsync=off is fine here, never elsewhere).
SERVER_SETTINGS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=50 -c shared_buffers=32MB")
INSTALL_HINT = ("install the PostgreSQL server: `apt-get install postgresql` (Debian/Ubuntu) or "
                "`brew install postgresql@16` (macOS); the sandbox runs its own private cluster")

LogFunction = Callable[[str], None]


def _to_stderr(line: str) -> None:
    Output().line(line)  # human lines go to stderr; stdout is for --json


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox environment's state: where it lives, what runs, how to reach it."""

    home: Path
    running: bool
    port: int | None
    database_url: Secret  # superuser URL of the demo app database
    direct_url: Secret  # the same: there is no pooler in the sandbox
    data_dir: Path
    storage_path: Path
    app_bucket: str
    backup_bucket: str
    app_dir: Path  # the demo app, with prisma/migrations


# ---------------------------------------------------------------- server binaries

def _major_of(bin_dir: Path) -> int:
    name = bin_dir.parent.name  # /usr/lib/postgresql/<major>/bin
    return int(name) if name.isdigit() else 0


def find_server_bindir(major: int | None = None) -> Path:
    """Directory holding initdb and pg_ctl: Debian's newest (or `major`), else pg_config's."""
    debian = sorted((path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")), key=_major_of)
    if major is not None:
        debian = [bin_dir for bin_dir in debian if _major_of(bin_dir) == major] or debian
    if debian:
        return debian[-1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        output = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bin_dir = Path(output.stdout.strip())
        if (bin_dir / "initdb").exists():
            return bin_dir
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise OpsError("PostgreSQL server programs (initdb, pg_ctl) were not found", hint=INSTALL_HINT)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _as_server_user(command: list[str]) -> list[str]:
    # initdb and pg_ctl refuse to run as root: hand them to the postgres user.
    if not _running_as_root():
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", SERVER_USER, "--", *command]
    return ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups", *command]


def _give_to_server_user(path: Path) -> None:
    if _running_as_root():
        shutil.chown(path, SERVER_USER, SERVER_USER)


# ---------------------------------------------------------------- the sandbox

class Sandbox:
    def __init__(self, home: Path):
        self.home = Path(home).absolute()
        self.data_dir = self.home / "pgdata"
        self.socket_dir = self.home / "run"
        self.log_file = self.home / "postgres.log"
        self.credentials_file = self.home / "credentials.json"
        self.state_file = self.home / "sandbox.json"
        self.storage_path = self.home / "storage"
        self._active_port: int | None = None  # known once _start ran: saves a pg_ctl status per URL

    # ------------------------------------------------------------ public API

    def up(self, *, log: LogFunction = _to_stderr) -> SandboxInfo:
        """Make everything that is missing; each step says what it did or that it was already done."""
        self._initialise(log)
        self._start(log)
        self._create_app_database(log)
        self._migrate(log)
        self._seed_rows(log)
        self._create_buckets(log)
        self._seed_images(log)
        return self.info()

    def ensure_running(self, *, log: LogFunction = _to_stderr) -> SandboxInfo:
        """What every task on the sandbox env calls: quiet unless it has to start (or build) it."""
        if not self.is_initialised():
            log(f"sandbox: not set up yet in {self.home}, setting it up")
            return self.up(log=log)
        if not self.is_running():
            self._start(log)
        return self.info()

    def down(self) -> None:
        """Stop the cluster (fast shutdown); the data stays for the next `up`."""
        if self.is_initialised() and self.is_running():
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(START_TIMEOUT_SECONDS))
        self._active_port = None

    def destroy(self) -> None:
        """Stop it and delete everything under home."""
        self.down()
        shutil.rmtree(self.home, ignore_errors=True)

    def info(self) -> SandboxInfo:
        initialised = self.is_initialised()
        running = initialised and self.is_running()
        port = self._port(running)
        url = self._url(APP_DATABASE, port) if initialised and port else Secret("")
        return SandboxInfo(
            home=self.home, running=running, port=port, database_url=url, direct_url=url,
            data_dir=self.data_dir, storage_path=self.storage_path, app_bucket=APP_BUCKET,
            backup_bucket=BACKUP_BUCKET, app_dir=_demo_app_dir(),
        )

    def overrides(self, env: Environment, info: SandboxInfo) -> dict[str, Any]:
        """What the sandbox env `env` gets from the running sandbox `info` (see the module's docstring)."""
        drill_of = env.raw("drill_target_of", None)
        database = DRILL_DATABASE if drill_of else APP_DATABASE
        if drill_of:
            self.ensure_database(database, info.port)
        url = self._url(database, info.port)
        storage = {"provider": "local", "path": str(info.storage_path)}
        overrides: dict[str, Any] = {
            "database": {"url": url, "direct_url": url},
            "storage": {**storage, "bucket": info.app_bucket},
            "backups": {**storage, "bucket": info.backup_bucket, "prefix": f"{env.name}/" if drill_of else "local/"},
            "app": {"dir": str(info.app_dir), "migrations": {"engine": "native", "dir": "prisma/migrations"}},
        }
        if not env.has("database.log_command"):
            overrides["database"]["log_command"] = f"tail -n 500 {shlex.quote(str(self.log_file))}"
        if not env.has("notify"):
            notices = env.inventory.state_dir / "notices" / f"{env.name}.md"
            overrides["notify"] = [{"kind": "file", "path": str(notices)}]
        if not drill_of:
            drill: dict[str, Any] = {} if env.has("drill.target") else {"target": env.name + SANDBOX_DRILL_SUFFIX}
            if not env.has("drill.images_query") and not env.has("drill.images_prefix"):
                drill["images_prefix"] = "images/"
            overrides["drill"] = drill
        return overrides

    def ensure_database(self, name: str, port: int | None = None) -> None:
        """An empty database `name` in the cluster, unless there is one (a restore may replace it)."""
        with connect(self._url("postgres", port), application_name="opsbook sandbox", autocommit=True) as conn:
            if not database_exists(conn, name):
                create_database(conn, name)

    def status(self) -> dict[str, Any]:
        """Where it is and what it holds; database details only when it runs."""
        info = self.info()
        result: dict[str, Any] = {
            "home": str(self.home), "initialised": self.is_initialised(), "running": info.running,
            "port": info.port, "data_dir": str(self.data_dir), "log_file": str(self.log_file),
            "storage_path": str(self.storage_path), "app_bucket": APP_BUCKET, "backup_bucket": BACKUP_BUCKET,
            "demo_images": self._count_images(),
        }
        if info.running:
            result |= self._database_status()
        return result

    def is_initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file() and self.credentials_file.is_file()

    def is_running(self) -> bool:
        # pg_ctl status: 0 running, 3 not running (a stale postmaster.pid counts as not running).
        result = self._run_server_tool(["pg_ctl", "status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0

    # ------------------------------------------------------------ steps of up()

    def _initialise(self, log: LogFunction) -> None:
        if self.is_initialised():
            log(f"sandbox: cluster already initialised in {self.data_dir}")
            return
        self._prepare_directories()
        password = self._write_credentials()
        password_file = self.home / ".initdb-password"
        password_file.write_text(password.reveal() + "\n")
        password_file.chmod(0o600)
        _give_to_server_user(password_file)
        try:
            self._run_server_tool([
                "initdb", "-D", str(self.data_dir), "-U", SERVER_USER, "-A", "scram-sha-256",
                f"--pwfile={password_file}", "-E", "UTF8", "--no-locale", "-N",
            ])
        finally:
            password_file.unlink(missing_ok=True)
        log(f"sandbox: initialised a PostgreSQL {self._data_major()} cluster in {self.data_dir}")

    def _prepare_directories(self) -> None:
        if self.data_dir.exists():  # a half-made cluster from an interrupted init: start over
            shutil.rmtree(self.data_dir)
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o755)  # the server user must be able to reach its directories
        for directory, mode in ((self.data_dir, 0o700), (self.socket_dir, 0o755)):
            directory.mkdir(exist_ok=True)
            directory.chmod(mode)
            _give_to_server_user(directory)
        self.storage_path.mkdir(exist_ok=True)
        self._check_reachable()

    def _check_reachable(self) -> None:
        if not _running_as_root():
            return
        probe = subprocess.run(_as_server_user(["test", "-w", str(self.data_dir)]), check=False)
        if probe.returncode != 0:
            raise OpsError(
                f"the {SERVER_USER} user cannot reach {self.data_dir}: a parent directory is not traversable",
                hint=f"allow it (chmod o+x on each parent of {self.home}) or put the state dir elsewhere",
            )

    def _write_credentials(self) -> Secret:
        password = Secret(secrets.token_urlsafe(24))
        descriptor = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"user": SERVER_USER, "password": password.reveal()}, handle)
        self.credentials_file.chmod(0o600)
        return password

    def _start(self, log: LogFunction) -> None:
        if self.is_running():
            self._active_port = self._port(True)
            log(f"sandbox: PostgreSQL already running on {HOST}:{self._active_port}")
            return
        port = self._choose_port()
        if not self.log_file.exists():
            self.log_file.touch(mode=0o640)
            _give_to_server_user(self.log_file)
        options = f"-c listen_addresses={HOST} -p {port} {self._socket_option()} {SERVER_SETTINGS}"
        try:
            self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_SECONDS), "-l", str(self.log_file),
                         "-o", options)
        except StepFailed as error:
            raise StepFailed(f"{error.message}\n{self._log_tail()}",
                             hint=f"read {self.log_file}; `inv sandbox.up` again once fixed") from None
        self._wait_until_accepting(port)
        self._active_port = port
        log(f"sandbox: started PostgreSQL on {HOST}:{port} (data in {self.data_dir})")

    def _socket_option(self) -> str:
        if len(str(self.socket_dir)) > MAX_SOCKET_DIR_LENGTH:
            return "-k ''"
        return f"-k {shlex.quote(str(self.socket_dir))}"

    def _create_app_database(self, log: LogFunction) -> None:
        with connect(self._url("postgres"), application_name="opsbook sandbox", autocommit=True) as conn:
            if database_exists(conn, APP_DATABASE):
                log(f"sandbox: database {APP_DATABASE!r} already exists")
                return
            create_database(conn, APP_DATABASE)
        log(f"sandbox: created database {APP_DATABASE!r}")

    def _migrate(self, log: LogFunction) -> None:
        applied = apply_pending(self._url(APP_DATABASE), _demo_migrations_dir())
        if applied:
            log(f"sandbox: applied {len(applied)} migrations: {', '.join(applied)}")
        else:
            log("sandbox: migrations already applied")

    def _seed_rows(self, log: LogFunction) -> None:
        with connect(self._url(APP_DATABASE), application_name="opsbook sandbox") as conn:
            if seed.has_demo_data(conn):
                log("sandbox: demo rows already present")
                return
            counts = seed.insert_demo_data(conn)
        log("sandbox: inserted demo rows: " + ", ".join(f"{table} {count}" for table, count in counts.items()))

    def _create_buckets(self, log: LogFunction) -> None:
        created = [name for name in (APP_BUCKET, BACKUP_BUCKET) if self._ensure_bucket(name)]
        if created:
            log(f"sandbox: created buckets {', '.join(created)} in {self.storage_path}")
        else:
            log(f"sandbox: buckets {APP_BUCKET} and {BACKUP_BUCKET} already exist")

    def _seed_images(self, log: LogFunction) -> None:
        storage = self.storage(APP_BUCKET)
        present = {item.key for item in storage.list("images/")}
        missing = [(key, data) for key, data in seed.image_objects() if key not in present]
        # The local backend fsyncs each object; a few threads overlap those waits.
        with ThreadPoolExecutor(max_workers=IMAGE_WRITERS) as pool:
            list(pool.map(lambda item: storage.put_bytes(item[0], item[1], content_type="image/jpeg"), missing))
        if missing:
            log(f"sandbox: wrote {len(missing)} demo images to bucket {APP_BUCKET}")
        else:
            log(f"sandbox: demo images already present ({len(present)} in {APP_BUCKET})")

    # ------------------------------------------------------------ helpers

    def storage(self, bucket: str = APP_BUCKET) -> Any:
        """The local storage backend for one of the sandbox buckets."""
        return open_storage(StorageConfig(provider="local", bucket=bucket, path=str(self.storage_path)))

    def _ensure_bucket(self, name: str) -> bool:
        storage = self.storage(name)
        if storage.bucket_exists():
            return False
        storage.create_bucket()
        return True

    def _count_images(self) -> int:
        if not (self.storage_path / APP_BUCKET).is_dir():
            return 0
        return sum(1 for _ in self.storage(APP_BUCKET).list("images/"))

    def _database_status(self) -> dict[str, Any]:
        with connect(self._url("postgres"), application_name="opsbook sandbox", autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            if not database_exists(conn, APP_DATABASE):
                return {"server_version": version, "database": None}
        with connect(self._url(APP_DATABASE), application_name="opsbook sandbox", autocommit=True) as conn:
            size_bytes, size = conn.execute(
                "SELECT pg_database_size(current_database()), pg_size_pretty(pg_database_size(current_database()))"
            ).fetchone()
            state = migration_status(conn, _demo_migrations_dir())
            return {
                "server_version": version, "database": APP_DATABASE, "database_size_bytes": size_bytes,
                "database_size": size, "tables": table_row_counts(conn),
                "migrations": {"applied": state.applied, "up_to_date": state.up_to_date,
                               "verdict": state.verdict},
            }

    def _password(self) -> Secret:
        try:
            data = json.loads(self.credentials_file.read_text())
        except (OSError, ValueError) as error:
            raise OpsError(f"cannot read the sandbox credentials in {self.credentials_file}: {error}",
                           hint="run `inv sandbox.up` (or delete the sandbox dir to start afresh)") from None
        return Secret(data["password"])

    def _url(self, dbname: str, port: int | None = None) -> Secret:
        password = quote(self._password().reveal(), safe="")
        port = port or self._active_port or self._port(self.is_running())
        return Secret(f"postgresql://{SERVER_USER}:{password}@{HOST}:{port}/{dbname}")

    def _port(self, running: bool) -> int | None:
        # A running server's own record (postmaster.pid line 4) wins over what we remembered.
        if running:
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int((self.data_dir / "postmaster.pid").read_text().splitlines()[3])
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads(self.state_file.read_text())["port"])
        return None

    def _choose_port(self) -> int:
        remembered = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            remembered = int(json.loads(self.state_file.read_text())["port"])
        if remembered and _port_is_free(remembered):
            return remembered
        port = _free_port()
        self.state_file.write_text(json.dumps({"port": port}) + "\n")
        return port

    def _data_major(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        return None

    def _run_server_tool(self, command: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        # A cluster made by PostgreSQL N needs N's binaries, whatever else is installed.
        bin_dir = find_server_bindir(self._data_major())
        full = _as_server_user([str(bin_dir / command[0]), *command[1:]])
        result = subprocess.run(full, capture_output=True, text=True, check=False, cwd=self.home,
                                timeout=START_TIMEOUT_SECONDS * 2)
        if check and result.returncode != 0:
            output = redact((result.stderr + result.stdout).strip())
            raise StepFailed(f"{command[0]} {command[1]} failed for the sandbox in {self.home}: {output}",
                             hint=f"see {self.log_file}; `inv sandbox.up` retries, deleting {self.home} "
                                  "starts afresh")
        return result

    def _pg_ctl(self, action: str, *options: str) -> None:
        self._run_server_tool(["pg_ctl", action, "-D", str(self.data_dir), *options])

    def _wait_until_accepting(self, port: int) -> None:
        # pg_ctl -w already waited for "ready"; one probe proves our credentials work.
        connect(self._url("postgres", port), application_name="opsbook sandbox", connect_timeout=5).close()

    def _log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return redact("\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:]))
        return ""


def _demo_app_dir() -> Path:
    return Path(__file__).resolve().parent / "demo"


def _demo_migrations_dir() -> Path:
    return _demo_app_dir() / "prisma" / "migrations"


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]

