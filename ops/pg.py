"""PostgreSQL: connections from URLs, client tool discovery, locks, databases, row counts.

The one module that imports psycopg, inside the functions that use it: other modules take
connections, composed statements (`identifiers`) and psycopg's exceptions (`pg.Error`,
`pg.ObjectInUse`, ...) from here, so importing them, and listing tasks, loads no driver.

Connection details come from one parser (`connection_params`) so that psycopg and
child processes (pg_dump, pg_restore, psql) reach the same server with the same
credentials. Child processes get them through libpq environment variables, never
on a command line, where `ps` would show the password.
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import hashlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from ops.errors import CheckFailed, ConnectionFailed, InventoryError, LockHeld, StepFailed
from ops.patterns import Pattern
from ops.secrets import Secret, redact, reveal

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import psycopg
    from psycopg import sql

DEFAULT_PORT = 5432
URL_SCHEMES = ("postgresql", "postgres")
URL_EXAMPLE = "postgresql://USER:PASSWORD@HOST:5432/DBNAME?sslmode=require"

# libpq keyword -> environment variable (libpq docs, "Environment Variables").
ENVIRONMENT_VARIABLES: dict[str, str] = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE",
    "user": "PGUSER", "password": "PGPASSWORD", "passfile": "PGPASSFILE",
    "require_auth": "PGREQUIREAUTH", "channel_binding": "PGCHANNELBINDING", "service": "PGSERVICE",
    "options": "PGOPTIONS", "application_name": "PGAPPNAME", "sslmode": "PGSSLMODE",
    "requiressl": "PGREQUIRESSL", "sslnegotiation": "PGSSLNEGOTIATION",
    "sslcompression": "PGSSLCOMPRESSION", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY",
    "sslcertmode": "PGSSLCERTMODE", "sslrootcert": "PGSSLROOTCERT", "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR", "sslsni": "PGSSLSNI", "requirepeer": "PGREQUIREPEER",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION", "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME", "gsslib": "PGGSSLIB", "gssdelegation": "PGGSSDELEGATION",
    "connect_timeout": "PGCONNECT_TIMEOUT", "client_encoding": "PGCLIENTENCODING",
    "target_session_attrs": "PGTARGETSESSIONATTRS", "load_balance_hosts": "PGLOADBALANCEHOSTS",
}
# libpq keywords with no environment variable: psycopg gets them, child processes do not.
CONNECTION_ONLY_KEYWORDS = frozenset({
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
    "tcp_user_timeout", "sslpassword", "fallback_application_name",
})
# pg_dump would otherwise wait forever on a black-holed address.
CHILD_DEFAULT_CONNECT_TIMEOUT = "10"

CLIENT_TOOL_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu (postgresql-client-N)
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew, Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # Homebrew, Intel
    "/opt/homebrew/opt/libpq/bin",
    "/usr/local/opt/libpq/bin",
    "/usr/pgsql-*/bin",  # PGDG RPMs
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
_TOOL_VERSION = Pattern(r"\(PostgreSQL\)\s+(?P<major>\d+)(?P<rest>(?:\.\d+)*[A-Za-z0-9]*)")


# --- URLs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseTarget:
    """Where a URL points, without its password: safe in messages and journals."""

    host: str
    port: int
    dbname: str
    user: str

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}/{self.dbname}"


def connection_params(url: Secret | str) -> dict[str, str]:
    """libpq keywords for `url`; host, port, user and dbname always present.

    Query parameters libpq does not know (Prisma's `schema`, `connection_limit`,
    `pgbouncer`...) are dropped: libpq would refuse the whole URL because of them.
    """
    text = reveal(url)
    parts = urlsplit(text)
    if parts.scheme not in URL_SCHEMES:
        raise InventoryError(
            f"database URL must start with postgresql:// (got scheme {parts.scheme or 'none'!r})",
            hint=f"write it as {URL_EXAMPLE}",
        )
    params = _netloc_params(parts.netloc)
    if parts.path.strip("/"):
        params["dbname"] = unquote(parts.path.lstrip("/"))
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ENVIRONMENT_VARIABLES or key in CONNECTION_ONLY_KEYWORDS:
            params[key] = value
    params.setdefault("host", "localhost")
    params.setdefault("port", str(DEFAULT_PORT))
    params.setdefault("user", getpass.getuser())
    params.setdefault("dbname", params["user"])
    _check_port(params["port"])
    return params


def _netloc_params(netloc: str) -> dict[str, str]:
    userinfo, _, hostport = netloc.rpartition("@")
    params: dict[str, str] = {}
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        if user:
            params["user"] = unquote(user)
        if has_password:
            params["password"] = unquote(password)
    if "," in hostport:
        raise InventoryError(
            "database URL lists several hosts; opsbook needs the one primary to work on",
            hint="use the primary's (direct) URL for admin work",
        )
    if hostport.startswith("["):  # IPv6 literal: [::1]:5432
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    if host:
        params["host"] = unquote(host)
    if port:
        params["port"] = port
    return params


def _check_port(port: str) -> None:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InventoryError(f"database URL has an invalid port {port!r}", hint=f"write it as {URL_EXAMPLE}")


def parse_url(url: Secret | str) -> DatabaseTarget:
    params = connection_params(url)
    return DatabaseTarget(
        host=params["host"], port=int(params["port"]), dbname=params["dbname"], user=params["user"]
    )


def with_database(url: Secret | str, dbname: str) -> Secret:
    """The same server and credentials, another database."""
    connection_params(url)  # validate before rebuilding
    parts = urlsplit(reveal(url))
    query = [(key, dbname if key == "dbname" else value)
             for key, value in parse_qsl(parts.query, keep_blank_values=True)]
    rebuilt = parts._replace(path="/" + quote(dbname, safe=""), query="&".join(
        f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in query))
    return Secret(urlunsplit(rebuilt))


def with_credentials(url: str, password: str, *, user: str | None = None) -> str:
    """`url` with its password (and user, when given) replaced; both percent-encoded."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        hostport = parts.netloc
    current_user = userinfo.partition(":")[0] if at else ""
    name = quote(user, safe="") if user else current_user
    if not name:
        raise InventoryError("database.url has no user to go with the stored DATABASE_PASSWORD",
                             hint="put the role in the URL (postgresql://ROLE@host/db) or set database.role")
    netloc = f"{name}:{quote(password, safe='')}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def libpq_environment(url: Secret | str) -> dict[str, str]:
    """PG* variables for a child process (pg_dump, psql...). Values include the password:
    give them to subprocess `env=`, never log them."""
    environment = {
        ENVIRONMENT_VARIABLES[key]: value
        for key, value in connection_params(url).items()
        if key in ENVIRONMENT_VARIABLES
    }
    environment.setdefault("PGCONNECT_TIMEOUT", CHILD_DEFAULT_CONNECT_TIMEOUT)
    environment.setdefault("PGAPPNAME", "opsbook")
    return environment


def child_environment(url: Secret | str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without inherited PG* settings, plus those of `url`.

    An operator's own PGHOST/PGSSLMODE/PGSERVICE... must not redirect a child process."""
    inherited = os.environ if base is None else base
    clean = {key: value for key, value in inherited.items() if not key.startswith("PG")}
    return clean | libpq_environment(url)


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


# --- client tools ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTool:
    """A PostgreSQL client tool found on this machine, with its version."""

    name: str
    path: str
    major: int
    version: str


def parse_tool_version(text: str) -> tuple[int, str] | None:
    """(major, version) from `pg_dump --version` output: 'pg_dump (PostgreSQL) 15.14 (Debian…)'."""
    match = _TOOL_VERSION.search(text)
    if match is None:
        return None
    return int(match["major"]), match["major"] + match["rest"]


def client_search_dirs() -> list[str]:
    """Where find_client_tool looks by default, in order: OPS_PG_BIN, known install dirs, PATH."""
    dirs = _operator_dirs()
    for pattern in CLIENT_TOOL_GLOBS:
        dirs += sorted(glob.glob(pattern))
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    return dirs


def _operator_dirs() -> list[str]:
    value = os.environ.get("OPS_PG_BIN", "")
    return [os.path.normpath(directory) for directory in value.split(os.pathsep) if directory]


def find_client_tool(name: str, server_major: int, search_dirs: list[str] | None = None) -> ClientTool:
    """The newest `name` (pg_dump, pg_restore, psql) whose major version >= server_major.

    A tool in OPS_PG_BIN that fits wins: the operator chose it. `search_dirs`, when
    given, replaces the whole default search (OPS_PG_BIN included).
    """
    preferred = _operator_dirs() if search_dirs is None else []
    found = _installed_tools(name, client_search_dirs() if search_dirs is None else search_dirs)
    fitting = [tool for tool in found if tool.major >= server_major]
    chosen = [tool for tool in fitting if os.path.dirname(tool.path) in preferred] or fitting
    if chosen:
        return max(chosen, key=lambda tool: tool.major)  # max keeps the first of equals: search order
    raise _no_fitting_tool(name, server_major, found)


def _installed_tools(name: str, dirs: list[str]) -> list[ClientTool]:
    tools: list[ClientTool] = []
    seen: set[str] = set()
    for directory in dirs:
        path = os.path.join(directory, name)
        real = os.path.realpath(path)
        if real in seen or not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        seen.add(real)
        probed = _probe_version(path, os.stat(path).st_mtime)
        if probed is not None:
            tools.append(ClientTool(name=name, path=path, major=probed[0], version=probed[1]))
    return tools


@lru_cache(maxsize=64)
def _probe_version(path: str, mtime: float) -> tuple[int, str] | None:
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_tool_version(result.stdout) if result.returncode == 0 else None


def _no_fitting_tool(name: str, server_major: int, found: list[ClientTool]) -> CheckFailed:
    listing = ", ".join(f"{tool.name} {tool.version} at {tool.path}" for tool in found)
    seen = f"found only: {listing}" if found else f"no {name} found at all"
    return CheckFailed(
        f"the server runs PostgreSQL {server_major} and {name} needs a client of version "
        f"{server_major} or newer; {seen}",
        hint=(f"install the PostgreSQL {server_major} client: Debian/Ubuntu: add the PGDG apt "
              f"repository (https://wiki.postgresql.org/wiki/Apt), then apt-get install "
              f"postgresql-client-{server_major}; macOS: brew install postgresql@{server_major}; "
              f"or set OPS_PG_BIN to a directory holding {name} {server_major} or newer"),
    )


# --- command builders (pure) -----------------------------------------------------------------


def _tool_path(tool: ClientTool | str) -> str:
    return tool.path if isinstance(tool, ClientTool) else tool


def dump_command(tool: ClientTool | str, *, snapshot: str | None = None, compress: int = 0,
                 jobs: int | None = None, output: str | None = None) -> list[str]:
    """pg_dump argv; the connection comes from libpq_environment().

    Custom format on stdout by default (for streaming). `jobs` needs the directory
    format, so it needs `output` (a directory).
    """
    if not 0 <= compress <= 9:
        raise ValueError(f"compress must be 0-9, got {compress}")
    if jobs is not None and output is None:
        raise ValueError("pg_dump --jobs needs the directory format: pass output=DIRECTORY")
    command = [_tool_path(tool), "--no-password", f"--compress={compress}"]
    if jobs is not None:
        command += ["--format=directory", f"--jobs={jobs}"]
    else:
        command.append("--format=custom")
    if snapshot is not None:
        command.append(f"--snapshot={snapshot}")
    if output is not None:
        command.append(f"--file={output}")
    return command


def restore_command(tool: ClientTool | str, *, dbname: str, archive: str | None = None,
                    jobs: int | None = None, no_owner: bool = False) -> list[str]:
    """pg_restore argv into `dbname` (on the server of libpq_environment()).

    Reads stdin without `archive`; `jobs` needs a seekable archive file.
    """
    if jobs is not None and archive is None:
        raise ValueError("pg_restore --jobs cannot read stdin: pass archive=PATH")
    command = [_tool_path(tool), "--no-password", "--exit-on-error", f"--dbname={dbname}"]
    if jobs is not None:
        command.append(f"--jobs={jobs}")
    if no_owner:
        command += ["--no-owner", "--no-acl"]
    if archive is not None:
        command.append(archive)
    return command


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
