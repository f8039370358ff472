"""How long a migration may wait for a table lock, how often it tries again, and who held the lock.

A migration waiting for ACCESS EXCLUSIVE on a busy table queues every later query on that
table behind it: with `lock_timeout` it gives up after a few seconds instead, and the
native applier tries again after a pause, during which the table serves everyone.
`statement_timeout` is turned off for the migration's session: a role's default would
cancel a long index build halfway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ops.lazy_dataclasses import dataclass
from ops.migrations.script import walk
from ops.secrets import redact
from ops.sql_parse import statements

if TYPE_CHECKING:
    import psycopg

DEFAULT_TABLE_LOCK_TIMEOUT_SECONDS = 5.0
DEFAULT_LOCK_RETRIES = 3
LOCK_TIMEOUT_SQLSTATE = "55P03"
QUERY_CHARS = 120


@dataclass(frozen=True)
class LockPolicy:
    """`timeout`: seconds a statement waits for a lock (0: forever); `retries`: attempts after the first."""

    timeout: float = DEFAULT_TABLE_LOCK_TIMEOUT_SECONDS
    retries: int = DEFAULT_LOCK_RETRIES

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def backoff(self, attempt: int) -> float:
        """The pause after failed attempt `attempt` (1, 2...): the timeout, doubled each time (at least 0.1 s)."""
        return max(self.timeout, 0.1) * 2 ** (attempt - 1)

    def session_settings(self) -> list[str]:
        return [f"SET lock_timeout = {int(self.timeout * 1000)}", "SET statement_timeout = 0"]


def timed_out(error: Exception) -> bool:
    """Whether a statement gave up waiting for a lock (lock_timeout, or NOWAIT)."""
    return getattr(error, "sqlstate", None) == LOCK_TIMEOUT_SQLSTATE


def tables_named(sql: str) -> list[str]:
    """The names (unqualified) of the relations a script's statements name: where its locks are."""
    names = {node["relname"] for statement in statements(sql) if statement.tree
             for node in walk(statement.tree) if isinstance(node.get("relname"), str)}
    return sorted(names)


def lock_holders(conn: psycopg.Connection, tables: list[str]) -> list[str]:
    """Other sessions holding a lock on one of `tables` in conn's database, for messages."""
    if not tables:
        return []
    rows = conn.execute(
        "SELECT a.pid, a.application_name, a.usename, a.state, a.query, string_agg(DISTINCT"
        " format('%%s on %%I', l.mode, c.relname), ', ') FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
        " JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.granted AND l.pid <> pg_backend_pid()"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND c.relname = ANY(%s) GROUP BY a.pid, a.application_name, a.usename, a.state, a.query ORDER BY a.pid",
        (tables,)).fetchall()
    return [_holder(*row) for row in rows]


def _holder(pid: int, application: str, user: str, state: str, query: str, locks: str) -> str:
    text = " ".join((query or "").split())
    text = text if len(text) <= QUERY_CHARS else text[:QUERY_CHARS - 1] + "…"
    return redact(f"pid {pid} ({application or 'no application name'}, user {user}, {state or 'state unknown'}, "
                  f"holds {locks}; last query: {text or '-'})")
