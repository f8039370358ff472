"""The database side of restores and deep verification: scratch databases, pg_restore,
row-count comparison and the name swap.

A restore never writes into the live database: it restores into a new database
named `<db>__restore_<stamp>`, compares its row counts with the manifest, and only
then swaps names. DDL on databases runs on a maintenance connection (the `postgres`
database) because a session cannot rename or drop the database it is connected to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO

from ops import dump, fetch, pg, pg_tools, pg_url, processes
from ops.errors import CheckFailed, ConnectionFailed, StepFailed
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    import psycopg

    from ops.backup_manifest import Manifest
    from ops.engine import RunContext
    from ops.fetch import Fetched
    from ops.pg_tools import ClientTool
    from ops.storage import Storage

MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names (NAMEDATALEN - 1)
MAINTENANCE_DATABASES = ("postgres", "template1")
RENAME_ATTEMPTS = 5


def side_name(database: str, kind: str, moment: datetime) -> str:
    """`<db>__<kind>_<stamp>` (kind: restore, old, verify), shortened to fit PostgreSQL's 63 bytes."""
    suffix = f"__{kind}_{moment.strftime('%Y%m%d%H%M%S')}"
    room = MAX_IDENTIFIER - len(suffix.encode())
    head = database.encode()[:room].decode(errors="ignore")
    return head + suffix


def side_pattern(database: str, kind: str) -> str:
    """A LIKE pattern matching the side databases of one kind left by earlier runs."""
    room = MAX_IDENTIFIER - len(f"__{kind}_00000000000000")
    head = database.encode()[:room].decode(errors="ignore")
    escaped = head.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}\\_\\_{kind}\\_%"


@contextmanager
def maintenance_connection(url: Secret | str, label: str) -> Iterator[psycopg.Connection]:
    """An autocommit session on the server's maintenance database (not on the one we rename)."""
    with open_maintenance(url, label) as connection:
        yield connection


def open_maintenance(url: Secret | str, label: str) -> psycopg.Connection:
    """A new autocommit session on the first maintenance database that accepts one; the caller closes it."""
    last: ConnectionFailed | None = None
    for name in MAINTENANCE_DATABASES:
        try:
            return pg.connect(pg_url.with_database(url, name), application_name=label[:63], autocommit=True)
        except ConnectionFailed as error:
            last = error
    assert last is not None
    raise last


@contextmanager
def shared_maintenance(ctx: RunContext, url: Secret | str) -> Iterator[psycopg.Connection]:
    """The run's one maintenance session, for every step (each new session costs a backend and an
    authentication). A block that fails closes it: a query cut short may leave it busy, so whatever comes
    next (the undo that drops the scratch database) starts a session of its own."""
    key = f"maintenance:{pg_url.parse_url(url).describe()}"

    def session() -> psycopg.Connection:
        return ctx.once(key, lambda: open_maintenance(url, ctx.label), close=lambda opened: opened.close())

    connection = session()
    if connection.closed:  # the server ended it (a restart, an idle timeout)
        ctx.forget(key)
        connection = session()
    try:
        yield connection
    except BaseException:
        ctx.forget(key)
        with contextlib.suppress(Exception):
            connection.close()
        raise


def leftovers(conn: psycopg.Connection, database: str, kind: str) -> list[str]:
    rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname",
                        (side_pattern(database, kind),)).fetchall()
    return [row[0] for row in rows]


def database_owner(conn: psycopg.Connection, database: str) -> str | None:
    row = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (database,)).fetchone()
    return row[0] if row else None


def restore_options(*, cross_environment: bool, owners: bool = False) -> list[str]:
    """Objects are owned by the role that restores (the target's own database role).

    Ownership from the source would name roles the target may not have. ACLs (GRANTs)
    are kept when restoring an environment's own backup (its roles exist) and
    dropped across environments, where the grantees usually do not exist. With the
    backup's globals restored first (`owners`), its roles exist: owners and grants are kept.
    """
    if owners:
        return []
    return ["--no-owner", "--no-acl"] if cross_environment else ["--no-owner"]


def restore_archive(tool: ClientTool, url: Secret | str, database: str, archive: str, *, jobs: int = 2,
                    cross_environment: bool = False, owners: bool = False) -> None:
    """pg_restore `archive` into `database` (on the server of `url`, as its user)."""
    command = pg_tools.restore_command(tool, dbname=database, archive=archive, jobs=jobs)
    command = [*command[:-1], *restore_options(cross_environment=cross_environment, owners=owners), command[-1]]
    environment = pg_url.child_environment(pg_url.with_database(url, database))
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, env=environment, check=False)
    except OSError as error:
        raise StepFailed(f"cannot start {tool.path}: {error.strerror}",
                         hint="check the PostgreSQL client installation (OPS_PG_BIN)") from None
    if result.returncode != 0:
        raise _restore_failed(database, url, result.returncode, redact(result.stderr.decode(errors="replace")))


def restore_streamed(tool: ClientTool, url: Secret | str, database: str, storage: Storage, manifest: Manifest, *,
                     identities: list[Any] | None, cross_environment: bool = False, owners: bool = False,
                     selection: tuple[str, ...] = (), on_progress: Callable[[int], None] | None = None,
                     opened: contextlib.AbstractContextManager[BinaryIO] | None = None) -> Fetched:
    """Download the backup and pg_restore it into `database` as it arrives, checking size and sha256.

    The download, decoding and restore overlap, so a restore costs little more than
    pg_restore itself. Only `database` (a scratch database) is written; the caller drops
    it when this raises. `selection` (pg_restore -t/-n options) restores only those objects.
    A damaged object is reported as such (CheckFailed), whatever pg_restore made of it.
    """
    command = [*pg_tools.restore_command(tool, dbname=database),
               *restore_options(cross_environment=cross_environment, owners=owners), *selection]
    environment = pg_url.child_environment(pg_url.with_database(url, database))
    try:
        with processes.child_process(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=environment, bufsize=0) as process:
            dump.enlarge_pipe(process.stdin)
            stderr = dump.StderrTail(process.stderr)
            fetched = fetch.fetch_and_decode(storage, manifest.object.key, process.stdin, identities=identities,
                                            encrypted=manifest.encrypted, on_progress=on_progress,
                                            abort_sink=process.kill, opened=opened)
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            status = process.wait()
    except processes.CannotStart as error:
        raise StepFailed(f"cannot start {tool.path}: {error}",
                         hint="check the PostgreSQL client installation (OPS_PG_BIN)") from None
    found = fetch.differences(manifest.size, manifest.sha256, fetched)
    if found or (fetched.decode_error and not fetched.sink_closed):
        fetch.check_fetched(manifest.id, manifest.object.key, manifest.size, manifest.sha256, fetched)
    if status != 0:
        raise _restore_failed(database, url, status, stderr.text())
    if selection and fetched.sink_closed:  # pg_restore -t/-n stops reading once it has its objects
        fetch.check_fetched(manifest.id, manifest.object.key, manifest.size, manifest.sha256,
                            dataclasses.replace(fetched, decode_error=None))
        return fetched
    fetch.check_fetched(manifest.id, manifest.object.key, manifest.size, manifest.sha256, fetched,
                       manifest.object.dump_size)
    return fetched


def _restore_failed(database: str, url: Secret | str, status: int, stderr: str) -> StepFailed:
    reason = " ".join(stderr.split())[-1500:]
    return StepFailed(f"pg_restore into {database} on {pg_url.parse_url(url).describe()} failed (exit {status}): "
                      f"{reason}", hint="the live database is untouched; fix the cause (missing extension, role, "
                                        "disk space) and run it again")


def compare_row_counts(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    """Each table whose rows differ from the manifest, as a readable line (empty when all match)."""
    problems = []
    for table in sorted(set(expected) | set(actual)):
        if table not in actual:
            problems.append(f"{table}: missing (manifest: {expected[table]} rows)")
        elif table not in expected:
            problems.append(f"{table}: not in the manifest ({actual[table]} rows)")
        elif expected[table] != actual[table]:
            problems.append(f"{table}: {actual[table]} rows, manifest: {expected[table]}")
    return problems


def check_row_counts(manifest: Manifest, url: Secret | str, database: str, label: str) -> dict[str, int]:
    """Row counts of the restored `database`; CheckFailed naming each table that differs."""
    with pg.connect(pg_url.with_database(url, database), application_name=label[:63]) as connection:
        counts = pg.table_row_counts(connection)
    problems = compare_row_counts(manifest.expected_row_counts, counts)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise CheckFailed(f"backup {manifest.id} restored into {database} does not match its manifest: {shown}",
                          hint="the live database was not touched; try another backup (`inv backup.list`)")
    return counts


def readable_by(manifest: Manifest, server_major: int, where: str) -> int:
    """The pg_restore major version needed; CheckFailed when the target server is too old for this dump."""
    source_major = manifest.database.server_major
    if server_major < source_major:
        raise CheckFailed(f"backup {manifest.id} comes from PostgreSQL {source_major} (pg_dump "
                          f"{manifest.pg_dump.version}); the target {where} runs PostgreSQL {server_major}, "
                          "which cannot load it", hint=f"restore into a server running PostgreSQL {source_major} "
                                                       "or newer (upgrade the target first)")
    return max(manifest.pg_dump.major, server_major)


# --- the swap ---------------------------------------------------------------------------------


def swap(conn: psycopg.Connection, database: str, restored: str, old: str) -> bool:
    """Make `restored` the database called `database`; the previous one becomes `old`.

    Returns whether there was a previous database. Connections to the old database are
    ended and refused while the names move; both renames commit in one transaction, so a
    run killed at any point leaves `database` under its name (the live one or the restored one).
    """
    if not pg.database_exists(conn, database):
        _rename(conn, restored, database)
        return False
    _allow_connections(conn, database, False)
    try:
        _swap_when_free(conn, database, restored, old)
    except BaseException:
        _allow_connections(conn, database, True)
        raise
    _allow_connections(conn, old, True)
    return True


def _swap_when_free(conn: psycopg.Connection, database: str, restored: str, old: str) -> None:
    """End the sessions on `database`, then both renames at once; new sessions are already refused,
    but one may have slipped in between: retry a few times."""
    for attempt in range(RENAME_ATTEMPTS):
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))
        try:
            with conn.transaction():
                _rename(conn, database, old, translate=False)
                _rename(conn, restored, database)
            return
        except pg.ObjectInUse:
            if attempt == RENAME_ATTEMPTS - 1:
                raise StepFailed(f"could not rename {database}: sessions keep connecting to it",
                                 hint="stop the app (or its pooler) for a moment and run the restore again; the "
                                      "live database is unchanged") from None
            time.sleep(0.2 * (attempt + 1))  # terminated backends take a moment to exit


def _rename(conn: psycopg.Connection, old: str, new: str, *, translate: bool = True) -> None:
    try:
        conn.execute(pg.identifiers("ALTER DATABASE {} RENAME TO {}", old, new))
    except pg.ObjectInUse:
        if not translate:
            raise
        raise StepFailed(f"could not rename database {old} to {new}: it is in use",
                         hint="run it again in a moment") from None
    except pg.Error as error:
        raise StepFailed(f"could not rename database {old} to {new}: {redact(str(error).strip())}",
                         hint="the restoring user must own the databases (or be a superuser) and have "
                              "CREATEDB") from None


def _allow_connections(conn: psycopg.Connection, database: str, allowed: bool) -> None:
    setting = "true" if allowed else "false"
    try:
        conn.execute(pg.identifiers(f"ALTER DATABASE {{}} WITH ALLOW_CONNECTIONS {setting}", database))
    except pg.Error as error:
        raise StepFailed(f"could not {'allow' if allowed else 'refuse'} connections to {database}: "
                         f"{redact(str(error).strip())}",
                         hint="the restoring user must own the database or be a superuser") from None
