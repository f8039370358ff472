"""Prisma-compatible migration state, and the `native` engine that applies migrations.

Prisma keeps one folder per migration (`prisma/migrations/<name>/migration.sql`) and
one row per attempt in `_prisma_migrations`. This module reads both, classifies each
migration exactly as `prisma migrate status` / `migrate deploy` would, and can apply
pending ones with the same bookkeeping, so Prisma's own CLI agrees with us afterwards.

Statuses: failed (a row with neither finished_at nor rolled_back_at: Prisma's P3009),
applied / edited (a finished row whose checksum matches / differs from the file, with
Prisma's line-ending tolerance), pending (no live row: rolled-back rows are ignored),
database_only (a live row with no folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from ops.errors import CheckFailed, LockHeld, StepFailed
from ops.secrets import redact, reveal

if TYPE_CHECKING:
    import psycopg

    from ops.secrets import Secret

MIGRATIONS_TABLE = "_prisma_migrations"
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
    path: Path


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
    name: str
    status: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    logs: str | None = None

    def to_json(self) -> dict[str, Any]:
        started, finished = (moment.isoformat() if moment else None for moment in (self.started_at, self.finished_at))
        return {"name": self.name, "status": self.status, "started_at": started, "finished_at": finished}


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


def read_lock_provider(directory: Path) -> str | None:
    """The provider named in `migration_lock.toml`, or None when there is no such file."""
    lock_path = Path(directory) / LOCK_FILE
    if not lock_path.is_file():
        return None
    try:
        return tomllib.loads(lock_path.read_text("utf-8")).get("provider")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
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
    from psycopg import sql

    name = prisma_schema(url)
    missing = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (name,))
    # As `prisma migrate deploy` does; checked first since CREATE SCHEMA needs a privilege the app may lack.
    if create and missing.fetchone()[0]:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(name)))


# ---------------------------------------------------------------- the native engine

def apply_pending(
    conn_url: Secret | str,
    directory: Path,
    *,
    on_event: EventCallback | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
) -> list[str]:
    """Apply pending migrations in order, as `prisma migrate deploy` does; return their names.

    Uses the direct URL (a transaction-mode pooler breaks the session advisory lock).
    `on_event(event, detail)` is called with ("waiting", holder), ("started", name),
    ("applied", name) and ("failed", name). Each script is sent as one simple-protocol
    query in autocommit mode, which PostgreSQL runs as one implicit transaction, as
    Prisma does: a failing script leaves none of its statements behind (scripts that
    need to run outside a transaction, e.g. CREATE INDEX CONCURRENTLY, fail the same
    way they would under Prisma). Unlike Prisma's deploy, an edited migration also
    refuses: the folder no longer describes the schema that was applied.
    """
    import psycopg

    from ops.pg import connect

    emit = on_event or (lambda event, detail: None)
    local = read_local_migrations(directory)
    with connect(conn_url, application_name="opsbook migrate", autocommit=True) as conn:
        where = _describe(conn)
        _check_provider(directory, where)
        try:
            _acquire_prisma_lock(conn, lock_timeout, where, emit)
            try:
                return _apply_under_lock(conn, conn_url, local, where, emit)
            finally:
                _release_prisma_lock(conn)
        except psycopg.Error as error:  # bookkeeping failed: lost connection, missing privilege...
            raise StepFailed(
                f"migrating {where} failed: {_error_line(error)}",
                hint="check the connection and that the user may create tables; then run migrate.status",
            ) from None


def _apply_under_lock(conn: psycopg.Connection, url: Secret | str, local: list[LocalMigration], where: str,
                      emit: EventCallback) -> list[str]:
    use_prisma_schema(conn, url, create=True)
    _ensure_migrations_table(conn)
    state = classify(local, read_applied(conn))
    _refuse_unsafe(state, where)
    pending_names = set(state.pending)
    pending = [migration for migration in local if migration.name in pending_names]
    for migration in pending:
        _apply_one(conn, migration, where, emit)
    return [migration.name for migration in pending]


def mark_rolled_back(conn: psycopg.Connection, name: str) -> int:
    """`prisma migrate resolve --rolled-back NAME`: mark its failed attempt resolved; rows changed."""
    cursor = conn.execute(
        "UPDATE _prisma_migrations SET rolled_back_at = now()"
        " WHERE migration_name = %s AND finished_at IS NULL AND rolled_back_at IS NULL",
        (name,),
    )
    if cursor.rowcount == 0:
        raise CheckFailed(f"migration {name} has no failed attempt to resolve in {_describe(conn)}",
                          hint="run migrate.status to see which migration failed")
    return cursor.rowcount


def _describe(conn: psycopg.Connection) -> str:
    info = conn.info
    return f"database {info.dbname} on {info.host}:{info.port}"


def _check_provider(directory: Path, where: str) -> None:
    provider = read_lock_provider(directory)
    if provider is not None and provider != "postgresql":
        raise CheckFailed(
            f"{Path(directory) / LOCK_FILE} says provider = {provider!r}, but {where} is PostgreSQL",
            hint="these migrations were generated for another database; regenerate them for postgresql",
        )


def _acquire_prisma_lock(conn: psycopg.Connection, timeout: float, where: str, emit: EventCallback) -> None:
    import psycopg

    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (PRISMA_ADVISORY_LOCK_KEY,)).fetchone()
    if got and got[0]:
        return
    emit("waiting", _lock_holder(conn) or "another session")
    try:
        conn.execute(f"SET lock_timeout = {int(timeout * 1000)}")
        conn.execute("SELECT pg_advisory_lock(%s)", (PRISMA_ADVISORY_LOCK_KEY,))
    except psycopg.errors.LockNotAvailable:
        holder = _lock_holder(conn) or "a session that has since gone"
        raise LockHeld(
            f"another migration holds the Prisma migration lock on {where}: {holder}",
            hint=f"wait for it to finish (gave up after {timeout:g} s), then run the migration again",
        ) from None
    finally:
        conn.execute("RESET lock_timeout")


def _lock_holder(conn: psycopg.Connection) -> str | None:
    # A bigint advisory key is stored as classid = high 32 bits, objid = low, objsubid = 1;
    # advisory locks are per database, like Prisma's.
    record = conn.execute(
        "SELECT a.pid, a.application_name, a.usename, a.client_addr::text, a.backend_start"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = %s"
        " AND l.objsubid = 1 AND a.pid <> pg_backend_pid()"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (PRISMA_ADVISORY_LOCK_KEY,),
    ).fetchone()
    if record is None:
        return None
    pid, application, user, address, since = record
    return (
        f"pid {pid} ({application or 'no application name'}, user {user}, from {address or 'local socket'},"
        f" connected since {since:%Y-%m-%d %H:%M:%S %Z})"
    )


def _release_prisma_lock(conn: psycopg.Connection) -> None:
    import psycopg

    # A lost session has released it already.
    with contextlib.suppress(psycopg.Error):
        conn.execute("SELECT pg_advisory_unlock(%s)", (PRISMA_ADVISORY_LOCK_KEY,))


def _ensure_migrations_table(conn: psycopg.Connection) -> None:
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATIONS_TABLE,)).fetchone()
    if not exists or not exists[0]:
        conn.execute(CREATE_MIGRATIONS_TABLE)


def _refuse_unsafe(state: MigrationState, where: str) -> None:
    failed = [entry for entry in state.entries if entry.status == FAILED]
    if failed:
        details = "; ".join(
            f"the `{entry.name}` migration started at {entry.started_at} failed" for entry in failed
        )
        raise CheckFailed(
            f"migrate found failed migrations in {where}, new migrations will not be applied (P3009): {details}",
            hint=(
                "see the failure in _prisma_migrations.logs, undo what the migration did, then mark it with "
                f"`prisma migrate resolve --rolled-back {failed[0].name}` (or --applied if you finished it "
                f"by hand); {RESOLVE_DOCS}"
            ),
        )
    if state.edited:
        raise CheckFailed(
            f"{len(state.edited)} applied migration(s) were edited after being applied to {where}: "
            f"{', '.join(state.edited)}",
            hint="restore the original migration.sql from version control; put changes in a new migration",
        )


def _apply_one(conn: psycopg.Connection, migration: LocalMigration, where: str, emit: EventCallback) -> None:
    import psycopg

    row_id = str(uuid.uuid4())
    # Recorded before running, exactly like Prisma: a crash midway leaves a failed row.
    conn.execute(
        "INSERT INTO _prisma_migrations (id, checksum, migration_name, started_at, applied_steps_count)"
        " VALUES (%s, %s, %s, now(), 0)",
        (row_id, migration.checksum, migration.name),
    )
    emit("started", migration.name)
    try:
        conn.execute(migration.sql)
    except psycopg.Error as error:
        logs = _failure_logs(migration.name, error)
        with contextlib.suppress(psycopg.Error):  # connection lost: the row stays failed, without logs
            conn.execute("UPDATE _prisma_migrations SET logs = %s WHERE id = %s", (logs, row_id))
        emit("failed", migration.name)
        raise StepFailed(
            f"migration {migration.name} failed on {where}: {_error_line(error)}",
            hint=(
                "nothing of this migration was kept (it ran in one transaction); fix the SQL or the data, "
                f"then `prisma migrate resolve --rolled-back {migration.name}` and migrate again"
            ),
        ) from None
    conn.execute(
        "UPDATE _prisma_migrations SET finished_at = now(), applied_steps_count = applied_steps_count + 1"
        " WHERE id = %s",
        (row_id,),
    )
    emit("applied", migration.name)


def _error_line(error: Exception) -> str:
    diag = getattr(error, "diag", None)
    primary = getattr(diag, "message_primary", None) or str(error).strip().splitlines()[0]
    code = getattr(error, "sqlstate", None)
    return redact(f"{primary} (SQLSTATE {code})" if code else primary)


def _failure_logs(name: str, error: Exception) -> str:
    # Same shape as the logs Prisma writes, so people reading the table find what they expect.
    code = getattr(error, "sqlstate", None) or "unknown"
    return redact(
        f"Migration name: {name}\n\nDatabase error code: {code}\n\nDatabase error:\n{str(error).strip()}\n"
    )

