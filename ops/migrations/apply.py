"""The `native` migration engine: apply pending migrations as `prisma migrate deploy` does.

Same bookkeeping as Prisma (a row with the checksum before running, finished_at after,
logs on failure), serialised with Prisma's own advisory lock, through the direct URL,
so that Prisma's CLI and this engine exclude each other and agree afterwards.
Also the two `prisma migrate resolve` operations (--rolled-back, --applied).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ops import ids, pg
from ops.errors import CheckFailed, LockHeld, StepFailed
from ops.migrations.lock_wait import LockPolicy, lock_holders, tables_named, timed_out
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
    policy: LockPolicy | None = None,
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
    longer describes the schema that was applied. `lock_timeout` is the wait for Prisma's
    advisory lock; `policy` the wait for each table lock and the attempts (ops/migrations/lock_wait.py):
    ("lock-timeout", text) is called for each attempt that gave up.
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
                return _apply_under_lock(conn, conn_url, local, where, emit, allow_edited,
                                         policy or LockPolicy())
            finally:
                _release_prisma_lock(conn)
        except pg.Error as error:  # bookkeeping failed: lost connection, missing privilege...
            raise StepFailed(
                f"migrating {where} failed: {error_line(error)}",
                hint="check the connection and that the user may create tables; then run migrate.status",
            ) from None


def _apply_under_lock(conn: psycopg.Connection, url: Secret | str, local: list[LocalMigration], where: str,
                      emit: EventCallback, allow_edited: bool, policy: LockPolicy) -> list[str]:
    use_prisma_schema(conn, url, create=True)
    _ensure_migrations_table(conn)
    state = classify(local, read_applied(conn))  # re-read under the lock: another deploy may have run
    refuse_unsafe(state, where, allow_edited=allow_edited)
    pending_names = set(state.pending)
    pending = [migration for migration in local if migration.name in pending_names]
    for setting in policy.session_settings():
        conn.execute(setting)
    for migration in pending:
        _apply_one(conn, migration, where, emit, policy)
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


def _apply_one(conn: psycopg.Connection, migration: LocalMigration, where: str, emit: EventCallback,
               policy: LockPolicy) -> None:
    one_by_one = outside_transaction(migration.sql)
    if one_by_one is None:
        _apply_script(conn, migration, where, emit, policy)
    else:
        _apply_statements(conn, migration, one_by_one, where, emit, policy)
    emit("applied", migration.name)


def _start_row(conn: psycopg.Connection, migration: LocalMigration, emit: EventCallback) -> str:
    row_id = ids.uuid4()
    # Recorded before running, exactly like Prisma: a crash midway leaves a failed row.
    conn.execute(
        "INSERT INTO _prisma_migrations (id, checksum, migration_name, started_at, applied_steps_count)"
        " VALUES (%s, %s, %s, now(), 0)",
        (row_id, migration.checksum, migration.name),
    )
    emit("started", migration.name)
    return row_id


def _finish_row(conn: psycopg.Connection, row_id: str) -> None:
    conn.execute(
        "UPDATE _prisma_migrations SET finished_at = now(), applied_steps_count = applied_steps_count + 1"
        " WHERE id = %s",
        (row_id,),
    )


def _record_failure(conn: psycopg.Connection, row_id: str, name: str, error: Exception, *,
                    rolled_back: bool = False) -> None:
    # rolled_back: nothing of the attempt was kept, as `prisma migrate resolve --rolled-back` records it
    logs = _failure_logs(name, error)
    with contextlib.suppress(pg.Error):  # connection lost: the row stays failed, without logs
        conn.execute("UPDATE _prisma_migrations SET logs = %s,"
                     " rolled_back_at = CASE WHEN %s THEN now() END WHERE id = %s", (logs, rolled_back, row_id))


def _apply_script(conn: psycopg.Connection, migration: LocalMigration, where: str, emit: EventCallback,
                  policy: LockPolicy) -> None:
    """The script as one implicit transaction; a lock timeout leaves nothing behind, so its attempt is
    recorded rolled back and the whole script is tried again."""
    for attempt in range(1, policy.attempts + 1):
        row_id = _start_row(conn, migration, emit)
        try:
            conn.execute(migration.sql)
        except pg.Error as error:
            if not timed_out(error):
                _record_failure(conn, row_id, migration.name, error)
                emit("failed", migration.name)
                raise _failure(migration.name, where, error,
                               "nothing of this migration was kept (it ran in one transaction)") from None
            _record_failure(conn, row_id, migration.name, error, rolled_back=True)
            _lock_timed_out(conn, migration, where, emit, policy, attempt, error,
                            "nothing of it was kept (it ran in one transaction) and it is pending again")
            continue
        _finish_row(conn, row_id)
        return


def _apply_statements(conn: psycopg.Connection, migration: LocalMigration, statements: list[str], where: str,
                      emit: EventCallback, policy: LockPolicy) -> None:
    """Statement by statement (something CONCURRENTLY in it): a lock timeout retries from the statement that
    timed out, or from the BEGIN of the script's own transaction it was in; what ran before is kept."""
    row_id = _start_row(conn, migration, emit)
    index = group = 0
    attempt = 1
    while index < len(statements):
        if conn.info.transaction_status.name == "IDLE":
            group = index
        try:
            conn.execute(statements[index])
            index += 1
            continue
        except pg.Error as error:
            if conn.info.transaction_status.name in ("INTRANS", "INERROR"):
                with contextlib.suppress(pg.Error):  # a BEGIN of the script's own: end it, keep the session usable
                    conn.execute("ROLLBACK")
            kept = f"it ran statement by statement (it builds or drops something CONCURRENTLY): the {index} " \
                "before the failing one were kept (but for a BEGIN … COMMIT of the script's that failed), and an " \
                "index being built concurrently stays behind INVALID; drop what was kept (DROP INDEX " \
                "CONCURRENTLY IF EXISTS …) or finish it by hand"
            if not timed_out(error) or attempt == policy.attempts:
                _record_failure(conn, row_id, migration.name, error)
                emit("failed", migration.name)
                if timed_out(error):
                    _lock_timed_out(conn, migration, where, emit, policy, attempt, error, kept)
                raise _failure(migration.name, where, error, kept) from None
            _lock_timed_out(conn, migration, where, emit, policy, attempt, error, kept)
            attempt, index = attempt + 1, group
    _finish_row(conn, row_id)


def _lock_timed_out(conn: psycopg.Connection, migration: LocalMigration, where: str, emit: EventCallback,
                    policy: LockPolicy, attempt: int, error: Exception, kept: str) -> None:
    """Report a lock timeout; pause before the next attempt, or raise after the last one."""
    holders = lock_holders(conn, tables_named(migration.sql))
    held = f"held by {'; '.join(holders)}" if holders else "its holder has released it since"
    last = attempt == policy.attempts
    pause = policy.backoff(attempt)
    emit("lock-timeout", f"{migration.name}: attempt {attempt} of {policy.attempts} gave up waiting "
                         f"{policy.timeout:g} s for a lock ({held}); "
                         + ("no attempt left" if last else f"trying again in {pause:g} s"))
    if last:
        raise StepFailed(
            f"migration {migration.name} could not take its locks on {where} in {policy.attempts} attempt(s) of "
            f"{policy.timeout:g} s each: {error_line(error)}; {held}",
            hint=f"{kept}; wait for that session to finish (or end it with pg_terminate_backend(pid)), then migrate "
                 "again; app.migrations.lock_timeout_seconds and lock_retries set the wait and the attempts")
    time.sleep(pause)


def _failure(name: str, where: str, error: Exception, kept: str) -> StepFailed:
    return StepFailed(
        f"migration {name} failed on {where}: {error_line(error)}",
        hint=(
            f"{kept}; fix the SQL or the data, "
            f"then `inv migrate.resolve --name {name} --rolled-back` (or `prisma migrate resolve "
            f"--rolled-back {name}`) and migrate again; {RESOLVE_DOCS}"
        ),
    )


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
