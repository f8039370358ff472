"""The `native` migration engine: apply pending migrations as `prisma migrate deploy` does.

Same bookkeeping as Prisma (a row with the checksum before running, finished_at after,
logs on failure), serialised with Prisma's own advisory lock, through the direct URL,
so that Prisma's CLI and this engine exclude each other and agree afterwards.
Also the two `prisma migrate resolve` operations (--rolled-back, --applied).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ops import ids, pg
from ops.errors import CheckFailed, LockHeld, StepFailed
from ops.migrations.script import outside_transaction
from ops.migrations.state import (
    CREATE_MIGRATIONS_TABLE,
    DEFAULT_LOCK_TIMEOUT_SECONDS,
    FAILED,
    LOCK_FILE,
    MIGRATIONS_TABLE,
    PRISMA_ADVISORY_LOCK_KEY,
    RESOLVE_DOCS,
    EventCallback,
    LocalMigration,
    MigrationState,
    classify,
    read_applied,
    read_local_migrations,
    read_lock_provider,
    resolve_hint,
    use_prisma_schema,
)
from ops.secrets import redact

if TYPE_CHECKING:
    import psycopg

    from ops.secrets import Secret


def apply_pending(
    conn_url: Secret | str,
    source: Path | Sequence[LocalMigration],
    *,
    on_event: EventCallback | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    allow_edited: bool = False,
    application_name: str = "opsbook migrate",
) -> list[str]:
    """Apply pending migrations in order, as `prisma migrate deploy` does; return their names.

    `source` is a migrations folder or migrations already read (e.g. from an app host).
    Uses the direct URL (a transaction-mode pooler breaks the session advisory lock).
    `on_event(event, detail)` is called with ("waiting", holder), ("started", name),
    ("applied", name) and ("failed", name). Each script is sent as one simple-protocol
    query in autocommit mode, which PostgreSQL runs as one implicit transaction, as
    Prisma does: a failing script leaves none of its statements behind. A script with a
    statement that cannot run in a transaction block (CREATE INDEX CONCURRENTLY, the
    lock linter's safe form) runs statement by statement instead, each in its own
    transaction, and is recorded as applied only once its last one succeeded. Unlike
    Prisma's deploy, an edited migration also refuses unless `allow_edited`: the folder no
    longer describes the schema that was applied.
    """
    emit = on_event or (lambda event, detail: None)
    local = read_local_migrations(source) if isinstance(source, Path) else list(source)
    with pg.connect(conn_url, application_name=application_name[:63], autocommit=True) as conn:
        where = describe(conn)
        if isinstance(source, Path):
            _check_provider(source, where)
        try:
            _acquire_prisma_lock(conn, lock_timeout, where, emit)
            try:
                return _apply_under_lock(conn, conn_url, local, where, emit, allow_edited)
            finally:
                _release_prisma_lock(conn)
        except pg.Error as error:  # bookkeeping failed: lost connection, missing privilege...
            raise StepFailed(
                f"migrating {where} failed: {error_line(error)}",
                hint="check the connection and that the user may create tables; then run migrate.status",
            ) from None


def _apply_under_lock(conn: psycopg.Connection, url: Secret | str, local: list[LocalMigration], where: str,
                      emit: EventCallback, allow_edited: bool) -> list[str]:
    use_prisma_schema(conn, url, create=True)
    _ensure_migrations_table(conn)
    state = classify(local, read_applied(conn))  # re-read under the lock: another deploy may have run
    refuse_unsafe(state, where, allow_edited=allow_edited)
    pending_names = set(state.pending)
    pending = [migration for migration in local if migration.name in pending_names]
    for migration in pending:
        _apply_one(conn, migration, where, emit)
    return [migration.name for migration in pending]


# ---------------------------------------------------------------- resolve


def mark_rolled_back(conn: psycopg.Connection, name: str) -> int:
    """`prisma migrate resolve --rolled-back NAME`: mark its failed attempt resolved; rows changed."""
    cursor = conn.execute(
        "UPDATE _prisma_migrations SET rolled_back_at = now()"
        " WHERE migration_name = %s AND finished_at IS NULL AND rolled_back_at IS NULL",
        (name,),
    )
    if cursor.rowcount == 0:
        raise CheckFailed(f"migration {name} has no failed attempt to resolve in {describe(conn)}",
                          hint="run migrate.status to see which migration failed")
    return cursor.rowcount


def mark_applied(conn: psycopg.Connection, migration: LocalMigration) -> None:
    """`prisma migrate resolve --applied NAME`: record a migration finished by hand as applied.

    As Prisma does: refused when it is already applied; failed attempts are marked
    rolled back and a finished row with the file's checksum is added.
    """
    _ensure_migrations_table(conn)
    finished = conn.execute(
        "SELECT count(*) FROM _prisma_migrations WHERE migration_name = %s"
        " AND finished_at IS NOT NULL AND rolled_back_at IS NULL", (migration.name,)).fetchone()
    if finished and finished[0]:
        raise CheckFailed(f"migration {migration.name} is already recorded as applied in {describe(conn)} (P3008)",
                          hint="nothing to resolve; run migrate.status")
    with conn.transaction():
        conn.execute("UPDATE _prisma_migrations SET rolled_back_at = now() WHERE migration_name = %s"
                     " AND finished_at IS NULL AND rolled_back_at IS NULL", (migration.name,))
        conn.execute(
            "INSERT INTO _prisma_migrations (id, checksum, migration_name, started_at, finished_at,"
            " applied_steps_count) VALUES (%s, %s, %s, now(), now(), 0)",
            (ids.uuid4(), migration.checksum, migration.name))


# ---------------------------------------------------------------- helpers


def describe(conn: psycopg.Connection) -> str:
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
    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (PRISMA_ADVISORY_LOCK_KEY,)).fetchone()
    if got and got[0]:
        return
    emit("waiting", lock_holder(conn) or "another session")
    try:
        conn.execute(f"SET lock_timeout = {int(timeout * 1000)}")
        conn.execute("SELECT pg_advisory_lock(%s)", (PRISMA_ADVISORY_LOCK_KEY,))
    except pg.LockNotAvailable:
        holder = lock_holder(conn) or "a session that has since gone"
        raise LockHeld(
            f"another migration holds the Prisma migration lock on {where}: {holder}",
            hint=f"wait for it to finish (gave up after {timeout:g} s), then run the migration again",
        ) from None
    finally:
        conn.execute("RESET lock_timeout")


def lock_holder(conn: psycopg.Connection) -> str | None:
    """Who holds Prisma's migration lock in conn's database, for messages; None when nobody."""
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
    # A lost session has released it already.
    with contextlib.suppress(pg.Error):
        conn.execute("SELECT pg_advisory_unlock(%s)", (PRISMA_ADVISORY_LOCK_KEY,))


def _ensure_migrations_table(conn: psycopg.Connection) -> None:
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATIONS_TABLE,)).fetchone()
    if not exists or not exists[0]:
        conn.execute(CREATE_MIGRATIONS_TABLE)


def refuse_unsafe(state: MigrationState, where: str, *, allow_edited: bool = False) -> None:
    """Prisma's P3009 for failed migrations; edited ones refused unless allowed."""
    failed = [entry for entry in state.entries if entry.status == FAILED]
    if failed:
        details = "; ".join(
            f"the `{entry.name}` migration started at {entry.started_at} failed" for entry in failed
        )
        raise CheckFailed(
            f"migrate found failed migrations in {where}, new migrations will not be applied (P3009): {details}",
            hint=resolve_hint(failed[0].name),
        )
    if state.edited and not allow_edited:
        raise CheckFailed(
            f"{len(state.edited)} applied migration(s) were edited after being applied to {where}: "
            f"{', '.join(state.edited)}",
            hint="restore the original migration.sql from version control and put changes in a new migration "
                 "(or pass --allow-edited if the edit is known to be harmless, e.g. a comment)",
        )


def _apply_one(conn: psycopg.Connection, migration: LocalMigration, where: str, emit: EventCallback) -> None:
    row_id = ids.uuid4()
    # Recorded before running, exactly like Prisma: a crash midway leaves a failed row.
    conn.execute(
        "INSERT INTO _prisma_migrations (id, checksum, migration_name, started_at, applied_steps_count)"
        " VALUES (%s, %s, %s, now(), 0)",
        (row_id, migration.checksum, migration.name),
    )
    emit("started", migration.name)
    one_by_one = outside_transaction(migration.sql)
    done = 0
    try:
        if one_by_one is None:
            conn.execute(migration.sql)
        for statement in one_by_one or []:
            conn.execute(statement)
            done += 1
    except pg.Error as error:
        if one_by_one is not None and conn.info.transaction_status.name in ("INTRANS", "INERROR"):
            with contextlib.suppress(pg.Error):  # a BEGIN of the script's own: end it, keep the session usable
                conn.execute("ROLLBACK")
        logs = _failure_logs(migration.name, error)
        with contextlib.suppress(pg.Error):  # connection lost: the row stays failed, without logs
            conn.execute("UPDATE _prisma_migrations SET logs = %s WHERE id = %s", (logs, row_id))
        emit("failed", migration.name)
        kept = "nothing of this migration was kept (it ran in one transaction)" if one_by_one is None else \
            f"it ran statement by statement (it builds or drops something CONCURRENTLY): the {done} before the " \
            "failing one were kept (but for a BEGIN … COMMIT of the script's that failed), and an index being " \
            "built concurrently stays behind INVALID; drop what was kept (DROP INDEX CONCURRENTLY IF EXISTS …) " \
            "or finish it by hand"
        raise StepFailed(
            f"migration {migration.name} failed on {where}: {error_line(error)}",
            hint=(
                f"{kept}; fix the SQL or the data, "
                f"then `inv migrate.resolve --name {migration.name} --rolled-back` (or `prisma migrate resolve "
                f"--rolled-back {migration.name}`) and migrate again; {RESOLVE_DOCS}"
            ),
        ) from None
    conn.execute(
        "UPDATE _prisma_migrations SET finished_at = now(), applied_steps_count = applied_steps_count + 1"
        " WHERE id = %s",
        (row_id,),
    )
    emit("applied", migration.name)


def error_line(error: Exception) -> str:
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
