"""PostgreSQL through psycopg: connections, advisory locks, databases, row counts.

The one module that imports psycopg, inside the functions that use it: other modules take
connections, composed statements (`identifiers`) and psycopg's exceptions (`pg.Error`,
`pg.ObjectInUse`, ...) from here, so importing them, and listing tasks, loads no driver.
URLs are parsed by ops/pg_url.py, the client tools found by ops/pg_tools.py.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ops.errors import ConnectionFailed, LockHeld, StepFailed
from ops.pg_url import DatabaseTarget, connection_params, parse_url
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import psycopg
    from psycopg import sql



# psycopg's exception classes for callers' `except` clauses: `except pg.Error:` looks the class
# up (importing psycopg) only when an exception reaches that clause.
_EXCEPTIONS = {"Error": "psycopg", "OperationalError": "psycopg",
               "ObjectInUse": "psycopg.errors", "LockNotAvailable": "psycopg.errors"}


def __getattr__(name: str) -> type[Exception]:
    if _EXCEPTIONS.get(name) == "psycopg":
        import psycopg

        return getattr(psycopg, name)
    if _EXCEPTIONS.get(name) == "psycopg.errors":
        from psycopg import errors

        return getattr(errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- connections -----------------------------------------------------------------------------


def connect(url: Secret | str, *, application_name: str = "opsbook", autocommit: bool = False,
            connect_timeout: int = 10) -> psycopg.Connection:
    import psycopg

    params = connection_params(url)
    params |= {"application_name": application_name, "connect_timeout": str(connect_timeout)}
    target = parse_url(url)
    try:
        return psycopg.connect(autocommit=autocommit, **params)
    except psycopg.Error as error:
        reason = " ".join(redact(error).split()) or type(error).__name__  # libpq's lines, as one
        raise ConnectionFailed(
            f"cannot connect to PostgreSQL at {target.describe()}: {reason}",
            hint=_connection_hint(reason, target),
        ) from None


def _connection_hint(reason: str, target: DatabaseTarget) -> str:
    lowered = reason.lower()
    address = f"{target.host}:{target.port}"
    if "password" in lowered or "authentication failed" in lowered:
        return (f"the server refused user {target.user!r}: check the user and password in the "
                "database URL (inventory database.url / direct_url, or the env var it reads)")
    if "database" in lowered and "does not exist" in lowered:
        return f"database {target.dbname!r} does not exist there: check the name, or provision it"
    if "role" in lowered and "does not exist" in lowered:
        return f"user {target.user!r} does not exist on that server: check the URL's user"
    if "ssl" in lowered or "pg_hba.conf" in lowered:
        return ("the server and client disagree on SSL or this client is not allowed: set sslmode in "
                "the URL (e.g. ?sslmode=require) or allow this address in pg_hba.conf")
    if "timeout" in lowered:
        return (f"no answer from {address} in time: check the network path (firewall, security "
                "group, VPN) or raise connect_timeout in the URL")
    if "translate host name" in lowered or "name or service not known" in lowered:
        return f"host {target.host!r} does not resolve: check the URL's host name and DNS"
    if "too many" in lowered:
        return "the server is out of connection slots: retry later or go through the pooler"
    return (f"is PostgreSQL running and listening on {address}? check the host and port in the URL, "
            "and that the server accepts TCP connections from here")


def server_version(conn: psycopg.Connection) -> tuple[int, int]:
    """(major, minor): 150004 -> (15, 4); before PostgreSQL 10, 90624 -> (9, 6)."""
    number = int(conn.execute("SELECT current_setting('server_version_num')").fetchone()[0])
    if number >= 100000:
        return number // 10000, number % 10000
    return number // 10000, number // 100 % 100


def _where(conn: psycopg.Connection) -> str:
    info = conn.info
    return f"{info.user}@{info.host}:{info.port}/{info.dbname}"


# --- locks -----------------------------------------------------------------------------------


def lock_key(*parts: str) -> int:
    """A stable, non-negative 63-bit advisory lock key for these strings."""
    digest = hashlib.sha256()
    for part in parts:  # length-prefixed so ("ab", "c") and ("a", "bc") differ
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return int.from_bytes(digest.digest()[:8], "big") & (2**63 - 1)


_HOLDER_QUERY = """
SELECT a.pid, a.application_name, a.usename, host(a.client_addr), a.client_hostname,
       a.backend_start, a.xact_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = %(high)s AND l.objid::bigint = %(low)s AND l.pid <> pg_backend_pid()
"""


@contextlib.contextmanager
def advisory_lock(conn: psycopg.Connection, key: int, *, holder_label: str) -> Iterator[None]:
    """Hold session advisory lock `key` (in conn's database) or raise LockHeld naming its holder.

    `holder_label` becomes this session's application_name, so a run refused by
    this lock learns who holds it. The server releases the lock if we die.
    """
    import psycopg

    try:
        _acquire(conn, key, holder_label)
    except psycopg.OperationalError as error:
        raise ConnectionFailed(f"lost the connection while taking advisory lock {key}: {redact(error)}",
                               where=_where(conn), hint="check the server and retry") from None
    try:
        yield
    finally:
        _release(conn, key)


def _acquire(conn: psycopg.Connection, key: int, holder_label: str) -> None:
    _run(conn, "SELECT set_config('application_name', %s, false)", (holder_label,))
    for _attempt in range(3):  # the holder may release between our try and our look-up
        if _run(conn, "SELECT pg_try_advisory_lock(%s)", (key,))[0]:
            return
        holder = _run(conn, _HOLDER_QUERY, {"high": key >> 32, "low": key & 0xFFFFFFFF})
        if holder is not None:
            raise _lock_held(conn, key, holder_label, holder)
    raise LockHeld(f"advisory lock {key} is busy", where=_where(conn), hint="retry in a moment")


def _run(conn: psycopg.Connection, query: str, params: object) -> tuple | None:
    """One query and its first row; a connection that was idle is left idle, not idle in
    transaction (a caller's open transaction is left alone)."""
    from psycopg import pq

    was_idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
    row = conn.execute(query, params).fetchone()
    if was_idle and not conn.autocommit:
        conn.commit()  # do not leave the session idle in transaction
    return row


def _lock_held(conn: psycopg.Connection, key: int, label: str, holder: tuple) -> LockHeld:
    pid, application, user, address, hostname, backend_start, xact_start = holder
    client = hostname or address or "local socket"
    since = f"connected since {backend_start:%Y-%m-%d %H:%M:%S %Z}"
    if xact_start is not None:
        since += f", in a transaction since {xact_start:%Y-%m-%d %H:%M:%S %Z}"
    return LockHeld(
        f"cannot start {label!r}: the lock is held by {application or 'an unnamed session'!r} "
        f"(user {user}, pid {pid}, from {client}, {since})",
        where=_where(conn),
        hint=(f"wait for that run to finish; if it is stuck, end its session with "
              f"SELECT pg_terminate_backend({pid}) and the server releases the lock (key {key})"),
    )


def _release(conn: psycopg.Connection, key: int) -> None:
    import psycopg
    from psycopg import pq

    if conn.closed:
        return  # the server released it with the session
    try:
        if conn.info.transaction_status == pq.TransactionStatus.INERROR:
            conn.rollback()
        _run(conn, "SELECT pg_advisory_unlock(%s)", (key,))
    except psycopg.OperationalError:
        pass  # connection lost: the server released the lock with the session


# --- databases -------------------------------------------------------------------------------


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def create_database(conn: psycopg.Connection, name: str, owner: str | None = None,
                    template: str | None = None) -> None:
    from psycopg import sql

    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if owner is not None:
        statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
    if template is not None:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    _database_ddl(conn, statement, f"create database {name!r}")


def drop_database(conn: psycopg.Connection, name: str, force: bool = True) -> None:
    """Drop `name` if it exists; with force, end its sessions first (they would block it)."""
    from psycopg import sql

    statement = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
    if force and server_version(conn)[0] >= 13:
        statement += sql.SQL(" WITH (FORCE)")
    elif force:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
    _database_ddl(conn, statement, f"drop database {name!r}")


def _database_ddl(conn: psycopg.Connection, statement: object, what: str) -> None:
    import psycopg

    if not conn.autocommit:
        raise ValueError(f"{what} needs an autocommit connection: connect(..., autocommit=True)")
    try:
        conn.execute(statement)
    except psycopg.Error as error:
        reason = redact(str(error).strip())
        raise StepFailed(f"could not {what}: {reason}", where=_where(conn),
                         hint="check that the user may create databases (CREATEDB) and that "
                              "no one else is using or creating it") from None


def identifiers(template: str, *names: str) -> sql.Composed:
    """`template`, a constant, with each `{}` filled by a quoted identifier: names never reach SQL as text."""
    from psycopg import sql

    return sql.SQL(template).format(*(sql.Identifier(name) for name in names))


def create_login_role(conn: psycopg.Connection, role: str, password: Secret) -> None:
    from psycopg import sql

    conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role),
                                                                    sql.Literal(password.reveal())))


def random_rows(conn: psycopg.Connection, query: str, count: int) -> list[tuple]:
    """Up to `count` rows of `query` in random order; `query` is SQL an operator wrote (the inventory's)."""
    from psycopg import sql

    statement = sql.SQL("SELECT * FROM ({}) AS sampled ORDER BY random() LIMIT %s").format(sql.SQL(query))
    return conn.execute(statement, (count,)).fetchall()


def copy_rows(conn: psycopg.Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """COPY `rows` into `table` (`columns` in that order)."""
    from psycopg import sql

    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)))
    with conn.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def move_sequence_past_ids(conn: psycopg.Connection, table: str) -> None:
    """Set the serial `id` sequence of `table` to its largest id: rows inserted with explicit ids."""
    from psycopg import sql

    conn.execute(sql.SQL("SELECT setval(pg_get_serial_sequence({}, 'id'), (SELECT max(id) FROM {}))").format(
        sql.Literal(sql.Identifier(table).as_string(conn)), sql.Identifier(table)))


def table_row_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Exact rows per user table ("schema.table"), sorted by name; partitions counted
    on their own (their partitioned parent is left out, it holds no rows itself)."""
    from psycopg import sql

    tables = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'"
    ).fetchall()
    counts: dict[str, int] = {}
    for schema, table in sorted(tables):
        query = sql.SQL("SELECT count(*) FROM ONLY {}").format(sql.Identifier(schema, table))
        counts[f"{schema}.{table}"] = conn.execute(query).fetchone()[0]
    return counts


@contextlib.contextmanager
def exported_snapshot(conn: psycopg.Connection) -> Iterator[str]:
    """A repeatable-read, read-only transaction on `conn` and its exported snapshot id.

    Give the id to pg_dump --snapshot and read (e.g. table_row_counts) on `conn`
    inside the block: both see the same data. The snapshot lives until the block ends.
    """
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield conn.execute("SELECT pg_export_snapshot()").fetchone()[0]


def alter_system(conn: psycopg.Connection, name: str, value: str) -> None:
    """ALTER SYSTEM SET name = 'value' (it takes no bind parameters: the value is quoted as a literal)."""
    from psycopg import sql

    conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))


# --- quoting for statements written to a file, and reading big results ----------------------


def quote_identifier(conn: psycopg.Connection, *names: str) -> str:
    """`"schema"."Table"` as this server reads it (sql.Identifier): for SQL written to a reviewed file."""
    from psycopg import sql

    return sql.Identifier(*names).as_string(conn)


def quote_literal(conn: psycopg.Connection, value: object) -> str:
    """A value as a SQL literal (sql.Literal), quoted for this connection's encoding and settings."""
    from psycopg import sql

    return sql.Literal(value).as_string(conn)


def stream_rows(conn: psycopg.Connection, query: str, name: str, batch: int = 2000) -> Iterator[tuple]:
    """The rows of `query` through a server-side cursor: memory stays bounded whatever the table's size.
    `query` is composed of quoted identifiers (and an operator's WHERE clause); it needs a transaction."""
    with conn.cursor(name=name) as cursor:
        cursor.itersize = batch
        cursor.execute(query)  # type: ignore[arg-type]  # composed from quoted parts, not user text
        yield from cursor
