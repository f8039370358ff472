"""Prisma-compatible migration state.

Prisma keeps one folder per migration (`prisma/migrations/<name>/migration.sql`) and
one row per attempt in `_prisma_migrations`. This module reads both and classifies each
migration exactly as `prisma migrate status` / `migrate deploy` would; `load_migrations(env)`
and `environment_status(env)` do it for an inventory environment (checkout or app host).
The `native` engine that applies pending ones with Prisma's bookkeeping is ops/migrations/apply.py.

Statuses: failed (a row with neither finished_at nor rolled_back_at: Prisma's P3009),
applied / edited (a finished row whose checksum matches / differs from the file, with
Prisma's line-ending tolerance), pending (no live row: rolled-back rows are ignored),
database_only (a live row with no folder).
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from ops import pg, pg_url
from ops.errors import CheckFailed, ConnectionFailed, InventoryError
from ops.hosts import connect
from ops.inventory import plain, resolve
from ops.lazy_dataclasses import dataclass
from ops.secrets import redact, reveal

if TYPE_CHECKING:
    import psycopg

    from ops.hosts import HostConfig
    from ops.inventory import Environment
    from ops.secrets import Secret

MIGRATIONS_TABLE = "_prisma_migrations"
DEFAULT_DIR = "prisma/migrations"
MIGRATION_FILE = "migration.sql"
LOCK_FILE = "migration_lock.toml"
# The key Prisma's schema engine passes to pg_advisory_lock: sharing it means our
# deploys and `prisma migrate deploy` exclude each other.
PRISMA_ADVISORY_LOCK_KEY = 72707369
# Prisma waits 10 s for that lock before giving up (P1002).
DEFAULT_LOCK_TIMEOUT_SECONDS = 10.0
CHECKSUM_LENGTH = 64
RESOLVE_DOCS = "https://pris.ly/d/migrate-resolve"

# Prisma's own DDL (schema engine, postgres flavour), so the table is identical.
CREATE_MIGRATIONS_TABLE = """
CREATE TABLE _prisma_migrations (
    id                      VARCHAR(36) PRIMARY KEY NOT NULL,
    checksum                VARCHAR(64) NOT NULL,
    finished_at             TIMESTAMPTZ,
    migration_name          VARCHAR(255) NOT NULL,
    logs                    TEXT,
    rolled_back_at          TIMESTAMPTZ,
    started_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    applied_steps_count     INTEGER NOT NULL DEFAULT 0
);
"""

APPLIED = "applied"
PENDING = "pending"
FAILED = "failed"
EDITED = "edited"
DATABASE_ONLY = "database_only"

EventCallback = Callable[[str, str], None]


@dataclass(frozen=True)
class LocalMigration:
    """One `<name>/migration.sql` folder on disk."""

    name: str
    checksum: str
    sql: str
    path: PurePath  # a local Path, or the PurePosixPath of the file on an app host


@dataclass(frozen=True)
class MigrationRow:
    """One row of `_prisma_migrations` (one attempt at applying a migration)."""

    id: str
    migration_name: str
    checksum: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    rolled_back_at: datetime | None = None
    logs: str | None = None
    applied_steps_count: int = 0

    @property
    def is_live(self) -> bool:
        return self.rolled_back_at is None

    @property
    def is_failed(self) -> bool:
        return self.finished_at is None and self.rolled_back_at is None


@dataclass(frozen=True)
class MigrationEntry:
    """One migration as the database's migrations table records it."""

    name: str
    status: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    logs: str | None = None

    def to_json(self) -> dict[str, Any]:
        started, finished = (moment.isoformat() if moment else None for moment in (self.started_at, self.finished_at))
        logs = {"logs": self.logs} if self.logs and self.status == FAILED else {}
        return {"name": self.name, "status": self.status, "started_at": started, "finished_at": finished, **logs}


@dataclass(frozen=True)
class MigrationState:
    """Every migration's status, local order first, then database-only ones."""

    entries: tuple[MigrationEntry, ...]

    def _named(self, status: str) -> list[str]:
        return [entry.name for entry in self.entries if entry.status == status]

    @property
    def applied(self) -> list[str]:
        return self._named(APPLIED)

    @property
    def pending(self) -> list[str]:
        return self._named(PENDING)

    @property
    def failed(self) -> list[str]:
        return self._named(FAILED)

    @property
    def edited(self) -> list[str]:
        return self._named(EDITED)

    @property
    def database_only(self) -> list[str]:
        return self._named(DATABASE_ONLY)

    @property
    def up_to_date(self) -> bool:
        return all(entry.status == APPLIED for entry in self.entries)

    @property
    def verdict(self) -> str:
        """One human line, the most serious problem first."""
        problems = [
            _count_line(self.failed, "failed migration", "deploy refuses until resolved (P3009)"),
            _count_line(self.edited, "applied migration", "edited after it was applied"),
            _count_line(self.database_only, "migration", "in the database but not in the folder"),
            _count_line(self.pending, "pending migration", "not yet applied"),
        ]
        problems = [line for line in problems if line]
        if problems:
            return "; ".join(problems)
        return f"database schema is up to date ({len(self.applied)} migrations applied)"

    def to_json(self) -> dict[str, Any]:
        lists = {status: self._named(status) for status in (APPLIED, PENDING, FAILED, EDITED, DATABASE_ONLY)}
        return {"up_to_date": self.up_to_date, "verdict": self.verdict, **lists,
                "migrations": [entry.to_json() for entry in self.entries]}


def _count_line(names: list[str], noun: str, what: str) -> str:
    if not names:
        return ""
    plural = "s" if len(names) > 1 else ""
    return f"{len(names)} {noun}{plural} {what}: {', '.join(names)}"


# ---------------------------------------------------------------- checksums

def checksum_of(text: str) -> str:
    """Prisma's checksum: lowercase, zero-padded hex SHA-256 of the script's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _checksum_unpadded(text: str) -> str:
    # Old Prisma versions wrote each byte without zero padding (prisma-engines#1887).
    return "".join(f"{byte:x}" for byte in hashlib.sha256(text.encode("utf-8")).digest())


def script_matches_checksum(script: str, checksum: str) -> bool:
    """Whether `checksum` (from the table) matches `script`, tolerating line endings as Prisma does."""
    variants = (script, script.replace("\r\n", "\n"), script.replace("\n", "\r\n"))
    legacy = bool(checksum) and len(checksum) != CHECKSUM_LENGTH
    render = _checksum_unpadded if legacy else checksum_of
    return any(render(variant) == checksum for variant in variants)


# ---------------------------------------------------------------- pure classification

def classify(local: list[LocalMigration], rows: list[MigrationRow]) -> MigrationState:
    """The status of each migration, from the folder and the table (no I/O)."""
    rows_by_name: dict[str, list[MigrationRow]] = {}
    for row in rows:
        rows_by_name.setdefault(row.migration_name, []).append(row)
    entries = [_classify_local(migration, rows_by_name.get(migration.name, [])) for migration in local]
    local_names = {migration.name for migration in local}
    for name in sorted(set(rows_by_name) - local_names):
        entry = _classify_database_only(name, rows_by_name[name])
        if entry is not None:
            entries.append(entry)
    return MigrationState(entries=tuple(entries))


def _classify_local(migration: LocalMigration, rows: list[MigrationRow]) -> MigrationEntry:
    live = [row for row in rows if row.is_live]
    failed = [row for row in live if row.is_failed]
    if failed:
        return _entry(migration.name, FAILED, failed[-1])
    if not live:
        return MigrationEntry(migration.name, PENDING)
    row = live[-1]
    matches = any(script_matches_checksum(migration.sql, each.checksum) for each in live)
    return _entry(migration.name, APPLIED if matches else EDITED, row)


def _classify_database_only(name: str, rows: list[MigrationRow]) -> MigrationEntry | None:
    live = [row for row in rows if row.is_live]
    if not live:
        return None  # only rolled-back attempts: Prisma ignores them
    failed = [row for row in live if row.is_failed]
    # A failed row blocks deploy whether or not its folder still exists.
    return _entry(name, FAILED, failed[-1]) if failed else _entry(name, DATABASE_ONLY, live[-1])


def _entry(name: str, status: str, row: MigrationRow) -> MigrationEntry:
    return MigrationEntry(name, status, row.started_at, row.finished_at, row.logs)


# ---------------------------------------------------------------- reading state

def read_local_migrations(directory: Path) -> list[LocalMigration]:
    """Migration folders in Prisma's order (by folder name); files such as the lock file are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckFailed(
            f"migrations folder {directory} does not exist",
            hint="check the environment's app.migrations.dir (Prisma keeps prisma/migrations)",
        )
    migrations = []
    for folder in sorted((entry for entry in directory.iterdir() if entry.is_dir()), key=lambda p: p.name):
        script_path = folder / MIGRATION_FILE
        if not script_path.is_file():
            raise CheckFailed(
                f"migration {folder.name} has no {MIGRATION_FILE} ({script_path})",
                hint="restore the file from version control, or remove the empty folder",
            )
        sql = _read_script(script_path)
        migrations.append(LocalMigration(folder.name, checksum_of(sql), sql, script_path))
    return migrations


def _read_script(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckFailed(
            f"{path} is not valid UTF-8 ({error.reason} at byte {error.start})",
            hint="save the migration as UTF-8, as Prisma requires",
        ) from None


def _lock_provider(text: str) -> Any:
    """The `provider` named in a migration_lock.toml's text; a ValueError when it is not TOML. tomllib (its parser
    compiles regular expressions at import) is imported here, on first use."""
    import tomllib

    return tomllib.loads(text).get("provider")


def read_lock_provider(directory: Path) -> str | None:
    """The provider named in `migration_lock.toml`, or None when there is no such file."""
    lock_path = Path(directory) / LOCK_FILE
    if not lock_path.is_file():
        return None
    try:
        return _lock_provider(lock_path.read_text("utf-8"))
    except ValueError as error:  # tomllib.TOMLDecodeError, UnicodeDecodeError
        raise CheckFailed(f"{lock_path} cannot be parsed: {error}", hint="fix or regenerate it") from None


def read_applied(conn: psycopg.Connection) -> list[MigrationRow]:
    """Rows of `_prisma_migrations` oldest first; [] when the table does not exist yet."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATIONS_TABLE,)).fetchone()
    if not exists or not exists[0]:
        return []
    cursor = conn.execute(
        "SELECT id, migration_name, checksum, started_at, finished_at, rolled_back_at, logs,"
        " applied_steps_count FROM _prisma_migrations ORDER BY started_at, migration_name"
    )
    return [MigrationRow(*record) for record in cursor.fetchall()]


def migration_status(conn: psycopg.Connection, directory: Path) -> MigrationState:
    """State of `conn`'s current schema; call use_prisma_schema first when the URL names one."""
    return classify(read_local_migrations(directory), read_applied(conn))


def prisma_schema(url: Secret | str) -> str:
    """The schema Prisma works in: the URL's `?schema=` parameter (libpq ignores it), else public."""
    return dict(parse_qsl(urlsplit(reveal(url)).query)).get("schema") or "public"


def use_prisma_schema(conn: psycopg.Connection, url: Secret | str, *, create: bool = False) -> None:
    """Point the session at the URL's Prisma schema, where its table and migrations live."""
    name = prisma_schema(url)
    missing = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (name,))
    # As `prisma migrate deploy` does; checked first since CREATE SCHEMA needs a privilege the app may lack.
    if create and missing.fetchone()[0]:
        conn.execute(pg.identifiers("CREATE SCHEMA {}", name))
    conn.execute(pg.identifiers("SET search_path TO {}", name))


def resolve_hint(name: str) -> str:
    """What to do about a failed migration, as Prisma's P3009 says, with our own command first."""
    return (f"read its logs (migrate.status shows them), undo what it did, then mark it: "
            f"`inv migrate.resolve --name {name} --rolled-back` (or `prisma migrate resolve --rolled-back {name}`); "
            f"if you finished it by hand instead, use --applied; {RESOLVE_DOCS}")


# ---------------------------------------------------------------- an inventory environment


@dataclass(frozen=True)
class MigrationSource:
    """Migrations read for an environment, and where from (for messages)."""

    where: str
    migrations: list[LocalMigration]


def load_migrations(env: Environment) -> list[LocalMigration]:
    """The environment's migrations: the local checkout, else the first app host over SSH."""
    return load_migration_source(env).migrations


def load_migration_source(env: Environment) -> MigrationSource:
    """From `app.repository` + `app.migrations.dir` when set; else from the first host's `app.dir`;
    else (no hosts, e.g. the sandbox) from `app.dir` on this machine."""
    app = plain(env.value("app", {})) or {}
    subdir = str((app.get("migrations") or {}).get("dir") or DEFAULT_DIR)
    if app.get("repository"):
        directory = _local_path(env, str(app["repository"])) / subdir
        return _read_local_source(directory, f"checkout {directory}")
    hosts = env.host_configs()
    if hosts:
        host = hosts[0]
        host_app = plain(_resolved(env.app_settings(host.name))) or {}
        if not host_app.get("dir"):
            raise env.missing("app.dir")
        host_subdir = str((host_app.get("migrations") or {}).get("dir") or subdir)
        return read_host_migrations(host, _join_posix(str(host_app["dir"]), host_subdir))
    if app.get("dir"):
        directory = _local_path(env, str(app["dir"])) / subdir
        return _read_local_source(directory, f"app directory {directory}")
    raise InventoryError(
        f"envs.{env.name}: nowhere to read migrations from",
        where=env.inventory.location(f"envs.{env.name}"),
        hint="set app.repository (a local checkout of the app) or hosts with app.dir",
    )


def _resolved(node: Any) -> Any:
    return resolve(node)


def _local_path(env: Environment, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else env.inventory.file.parent / candidate


def _join_posix(base: str, relative: str) -> str:
    return relative if relative.startswith(("/", "~")) else f"{base.rstrip('/')}/{relative}"


def _read_local_source(directory: Path, where: str) -> MigrationSource:
    migrations = read_local_migrations(directory)
    _check_provider_name(read_lock_provider(directory), f"{directory / LOCK_FILE}")
    return MigrationSource(where, migrations)


def _check_provider_name(provider: str | None, lock_file: str) -> None:
    if provider is not None and provider != "postgresql":
        raise CheckFailed(f"{lock_file} says provider = {provider!r}, but opsbook migrates PostgreSQL",
                          hint="these migrations were generated for another database; regenerate them for postgresql")


def shell_path(path: str) -> str:
    # `~/x` must stay unquoted at the front for the remote shell to expand it.
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def read_host_migrations(host: HostConfig, directory: str) -> MigrationSource:
    """Read `<directory>/<name>/migration.sql` on an app host (listing over SSH, files over SFTP)."""
    where = f"host {host.name} ({host.target}) {directory}"
    with connect(host) as connection:
        listing = connection.run(f"cd {shell_path(directory)} && ls -1p", check=False)
        if not listing.ok:
            raise CheckFailed(f"migrations folder {directory} cannot be read on host {host.name}: "
                              f"{listing.stderr.strip() or f'exit code {listing.exit_code}'}",
                              hint="check app.dir and app.migrations.dir, and that the release is deployed there")
        folders = sorted(line[:-1] for line in listing.stdout.splitlines() if line.endswith("/"))
        migrations = []
        for folder in folders:
            path = f"{directory.rstrip('/')}/{folder}/{MIGRATION_FILE}"
            sql = connection.read_text(path)
            if sql is None:
                raise CheckFailed(f"migration {folder} has no {MIGRATION_FILE} on host {host.name} ({path})",
                                  hint="deploy the release again, or remove the empty folder")
            migrations.append(LocalMigration(folder, checksum_of(sql), sql, PurePosixPath(path)))
        lock_text = connection.read_text(f"{directory.rstrip('/')}/{LOCK_FILE}")
    if lock_text is not None:
        try:
            provider = _lock_provider(lock_text)
        except ValueError as error:  # tomllib.TOMLDecodeError
            raise CheckFailed(f"{LOCK_FILE} on host {host.name} cannot be parsed: {error}",
                              hint="fix or regenerate it") from None
        _check_provider_name(provider, f"{directory}/{LOCK_FILE} on host {host.name}")
    return MigrationSource(where, migrations)


def environment_status(env: Environment, dbname: str | None = None,
                       migrations: list[LocalMigration] | None = None) -> MigrationState:
    """The environment's migration state through the direct URL (`dbname`: another database there)."""
    local = load_migrations(env) if migrations is None else migrations
    url = env.database_url(direct=True)
    if dbname:
        url = pg_url.with_database(url, dbname)
    with pg.connect(url, application_name="opsbook migrate.status", autocommit=True) as conn:
        return read_state(conn, url, local)


def read_state(conn: psycopg.Connection, url: Secret | str, local: list[LocalMigration]) -> MigrationState:
    """classify() on conn's `_prisma_migrations` in the URL's Prisma schema; errors named, not raw."""
    try:
        use_prisma_schema(conn, url)
        return classify(local, read_applied(conn))
    except pg.Error as error:
        info = conn.info
        reason = redact(" ".join(str(error).split()))
        raise ConnectionFailed(f"cannot read {MIGRATIONS_TABLE} in database {info.dbname} on "
                               f"{info.host}:{info.port}: {reason}",
                               hint="check that the database user may read the app's schema") from None
