"""Read-only facts about an environment, shared by status, triage and preflight.

Each function reads one part (database, a bucket, the last backup, keys, migrations,
incidents) and returns plain JSON-ready data; failures are OpsErrors naming the part.
Modules owned by other parts of opsbook (keys, migrations' environment status) are
looked up when called, so a checkout without them still reports everything else.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ops import migrations, pg, pg_url
from ops.backup_manifest import last_verification, list_backups, read_verifications
from ops.clock import iso_z_or_none
from ops.errors import OpsError
from ops.keys import key_status
from ops.migrations import environment_status
from ops.patterns import Pattern
from ops.retention import plan_retention, policy_for, read_manifests
from ops.secrets import redact
from ops.storage import open_storage

if TYPE_CHECKING:
    import psycopg

    from ops.inventory import Environment
    from ops.storage import Storage

QUERY_TEXT_LIMIT = 200
LONGEST_QUERIES = 5
SLOWEST_STATEMENTS = 5
BUCKET_LISTING_LIMIT = 1_000_000  # beyond this a status run would take minutes: report "at least"
_STRING_LITERAL = Pattern(r"(?:E|e)?'(?:[^']|'')*'")
_DOLLAR_QUOTED = Pattern(r"\$([A-Za-z_]*)\$.*?\$\1\$", re.DOTALL)


def redact_query(text: str | None, limit: int = QUERY_TEXT_LIMIT) -> str:
    """Query text safe to show: string literals (passwords, emails) masked, known secrets removed, truncated."""
    if not text:
        return ""
    masked = redact(" ".join(_mask_literals(text).split()))
    return masked if len(masked) <= limit else masked[: limit - 1] + "…"


def redact_log_line(line: str) -> str:
    """A database server's log line: its statements' literals masked as in redact_query, known secrets removed."""
    return redact(_mask_literals(line))


def _mask_literals(text: str) -> str:
    return _STRING_LITERAL.sub("'…'", _DOLLAR_QUOTED.sub("$$…$$", text))


# --- database ----------------------------------------------------------------------------------


def connections_by_state(connection: psycopg.Connection) -> dict[str, int]:
    """Client connections on the whole server by state (sessions of other roles may show as unknown)."""
    rows = connection.execute(
        "SELECT coalesce(state, 'unknown'), count(*) FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' GROUP BY 1 ORDER BY 1").fetchall()
    return {state: int(count) for state, count in rows}


def longest_queries(connection: psycopg.Connection, limit: int = LONGEST_QUERIES) -> list[dict[str, Any]]:
    """The non-idle sessions running longest (open transactions included), query text redacted."""
    rows = connection.execute(
        "SELECT pid, usename, datname, state, extract(epoch FROM now() - coalesce(query_start, xact_start)),"
        " wait_event_type, application_name, query FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND state IS NOT NULL AND state <> 'idle'"
        " AND pid <> pg_backend_pid() AND coalesce(query_start, xact_start) IS NOT NULL"
        " ORDER BY coalesce(query_start, xact_start) LIMIT %s", (limit,)).fetchall()
    return [{"pid": pid, "user": user, "database": database, "state": state, "seconds": round(float(seconds), 3),
             "waiting_on": wait, "application": redact(application or ""), "query": redact_query(query)}
            for pid, user, database, state, seconds, wait, application, query in rows]


def blocked_sessions(connection: psycopg.Connection, limit: int = LONGEST_QUERIES) -> list[dict[str, Any]]:
    """Sessions of this database waiting on another's lock (pg_blocking_pids), longest first, each with the
    sessions that block it; query texts redacted."""
    rows = connection.execute(
        "SELECT pid, usename, state, extract(epoch FROM now() - coalesce(query_start, xact_start)), query,"
        " pg_blocking_pids(pid) FROM pg_stat_activity WHERE datname = current_database()"
        " AND cardinality(pg_blocking_pids(pid)) > 0 ORDER BY coalesce(query_start, xact_start) LIMIT %s",
        (limit,)).fetchall()
    holders = sorted({pid for row in rows for pid in row[5]})
    by_pid = {pid: {"pid": pid, "user": user, "state": state, "transaction_seconds": _seconds(seconds),
                    "query": redact_query(query)}
              for pid, user, state, seconds, query in connection.execute(
                  "SELECT pid, usename, state, extract(epoch FROM now() - coalesce(xact_start, query_start)), query"
                  " FROM pg_stat_activity WHERE pid = ANY(%s)", (holders,)).fetchall()}
    return [{"pid": pid, "user": user, "state": state, "waiting_seconds": _seconds(seconds),
             "query": redact_query(query), "blocked_by": list(blocking),
             "blockers": [by_pid.get(holder, {"pid": holder, "query": ""}) for holder in blocking]}
            for pid, user, state, seconds, query, blocking in rows]


def _seconds(value: Any) -> float | None:
    return round(float(value), 3) if value is not None else None


def max_connections(connection: psycopg.Connection) -> dict[str, int]:
    row = connection.execute("SELECT current_setting('max_connections')::int,"
                             " current_setting('superuser_reserved_connections')::int").fetchone()
    return {"max_connections": row[0], "superuser_reserved": row[1]}


def slowest_statements(connection: psycopg.Connection,
                       limit: int = SLOWEST_STATEMENTS) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(statements by mean time, None) with pg_stat_statements; (None, why not) without it."""
    installed = connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()
    if not installed:
        return None, ("pg_stat_statements is not installed in this database: add it to shared_preload_libraries "
                      "and run CREATE EXTENSION pg_stat_statements to see the slowest statements")
    try:
        with connection.transaction():  # a failure must not poison the caller's connection
            rows = connection.execute(
                "SELECT queryid, calls, mean_exec_time, total_exec_time, query FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " ORDER BY mean_exec_time DESC LIMIT %s", (limit,)).fetchall()
    except pg.Error as error:
        return None, f"pg_stat_statements cannot be read: {redact(error).strip().splitlines()[0]}"
    return [{"queryid": str(queryid), "calls": int(calls), "mean_ms": round(float(mean), 3),
             "total_ms": round(float(total), 3), "query": redact_query(query)}
            for queryid, calls, mean, total, query in rows], None


def database_facts(env: Environment) -> dict[str, Any]:
    """Size, connections against max_connections, deadlocks, slowest statements (through the direct URL)."""
    url = env.database_url(direct=True)
    with pg.connect(url, application_name="opsbook status", autocommit=True, connect_timeout=5) as connection:
        name, size, deadlocks = connection.execute(
            "SELECT current_database(), pg_database_size(current_database()),"
            " (SELECT deadlocks FROM pg_stat_database WHERE datname = current_database())").fetchone()
        statements, note = slowest_statements(connection)
        facts = {"database": name, "target": pg_url.parse_url(url).describe(), "size_bytes": int(size),
                 "deadlocks": int(deadlocks or 0), "connections": connections_by_state(connection),
                 **max_connections(connection), "slowest_statements": statements, "statements_note": note}
    facts["connections_total"] = sum(facts["connections"].values())
    return facts


def recent_migrations(connection: psycopg.Connection, url: Any, hours: float = 24) -> list[dict[str, Any]]:
    """`_prisma_migrations` rows finished in the last `hours`, and any failed ones, newest first."""
    migrations.use_prisma_schema(connection, url)
    since = datetime.now(UTC) - timedelta(hours=hours)
    recent = []
    for row in migrations.read_applied(connection):
        if row.is_failed or (row.finished_at and row.finished_at >= since):
            status = "failed" if row.is_failed else "rolled back" if row.rolled_back_at else "applied"
            recent.append({"name": row.migration_name, "status": status,
                           "started_at": iso_z_or_none(row.started_at), "finished_at": iso_z_or_none(row.finished_at)})
    return sorted(recent, key=lambda r: r["finished_at"] or r["started_at"] or "", reverse=True)




# --- storage and backups -----------------------------------------------------------------------


def bucket_usage(env: Environment, section: str, limit: int = BUCKET_LISTING_LIMIT) -> dict[str, Any]:
    storage = open_storage(env.storage_config(section))
    objects = size = 0
    for info in storage.list():
        objects += 1
        size += info.size
        if objects >= limit:
            break
    return {"bucket": storage.config.bucket, "describe": storage.describe(), "objects": objects, "bytes": size,
            "complete": objects < limit}


def last_backup(env: Environment, storage: Storage | None = None) -> dict[str, Any] | None:
    """The newest complete backup with its age, and the newest backup that passed a verification."""
    storage = storage or open_storage(env.storage_config("backups"))
    complete, _incomplete = list_backups(storage, strict=False)
    if not complete:
        return None
    newest = complete[0]
    now = datetime.now(UTC)
    verified = None
    for manifest in complete:
        record = last_verification(read_verifications(storage, manifest.id))
        if record:
            verified = {"id": manifest.id, "at": record.get("at"), "kind": record.get("kind")}
            break
    return {"id": newest.id, "started_at": newest.started_at, "finished_at": newest.finished_at,
            "age_seconds": round((now - newest.finished).total_seconds(), 3), "size_bytes": newest.size,
            "duration_seconds": newest.seconds, "finished_timestamp": newest.finished.timestamp(),
            "newest_verified": verified, "count": len(complete)}


def backup_history(env: Environment, now: datetime | None = None) -> dict[str, Any]:
    """Every complete backup, newest first (size, duration, last verification), and what retention keeps of
    them and why: what `status --html` draws."""
    storage = open_storage(env.storage_config("backups"))
    complete, _incomplete = read_manifests(storage)
    policy = policy_for(env)
    plan = plan_retention([info for _manifest, info in complete], policy, now or datetime.now(UTC))
    backups = [{"id": manifest.id, "finished_at": manifest.finished_at, "size_bytes": manifest.size,
                "seconds": manifest.seconds, "verified_at": iso_z_or_none(info.verified_at)}
               for manifest, info in complete]
    return {"backups": backups, "retention": {"policy": policy.describe(), **plan.to_json()}}


# --- keys, migrations, incidents (other modules' data) ----------------------------------------


def key_facts(env: Environment) -> dict[str, Any] | None:
    """keys.key_status as JSON; None for a local folder, which has no keys."""
    if env.raw("storage.provider", "s3") == "local":
        return None
    return key_status(env).to_json()


def migration_state(env: Environment) -> Any:
    """The MigrationState of the environment's database (InventoryError when no migrations are known)."""
    return environment_status(env)


def open_incidents(env: Environment) -> list[dict[str, Any]]:
    """`<state>/incidents/*/incident.json` whose state is not resolved (unreadable ones count as open)."""
    folder = env.inventory.state_dir / "incidents"
    found = []
    for path in sorted(folder.glob("*/incident.json")) if folder.exists() else []:
        try:
            incident = json.loads(path.read_text())
        except (OSError, ValueError):
            incident = {"id": path.parent.name, "state": "unreadable"}
        if not isinstance(incident, dict):
            incident = {"id": path.parent.name, "state": "unreadable"}
        if incident.get("state") != "resolved" and incident.get("env", env.name) == env.name:
            found.append({"id": incident.get("id", path.parent.name), "state": incident.get("state"),
                          "title": incident.get("title"), "impact": incident.get("impact")})
    return found


def describe_error(error: Exception) -> str:
    return redact(error.message if isinstance(error, OpsError) else f"{type(error).__name__}: {error}")
