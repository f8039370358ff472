"""inv status: the monitoring numbers of an environment, for people and for Prometheus.

Database size, connections by state against max_connections, the slowest statements
(pg_stat_statements, or a note saying how to get them), bucket object counts and
bytes, the last backup's age and size, the storage key's age, pending migrations and
open incidents. `--json` prints them as one object; `--prometheus FILE` writes them as
a node_exporter textfile (atomically; other environments' samples in FILE are kept);
`--html FILE` writes them as an operator's dashboard with charts (ops/status_html.py):
backups over 90 days, the retention plan, the key's age, the last drills.
A part that cannot be read is reported and exported as opsbook_status_success 0;
the task then exits 3 after writing everything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import task

from ops import status_facts as facts
from ops.cli import OpsTask, TaskCall
from ops.drills import list_drills
from ops.errors import CheckFailed, InventoryError, OpsError, StepFailed, UsageError
from ops.lazy_dataclasses import dataclass
from ops.metrics import MetricFamily, write_textfile
from ops.output import human_size
from ops.status_facts import describe_error, migration_state, open_incidents
from ops.status_html import render_dashboard

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.metrics import MetricFamily
    from ops.output import Output

WORKERS = 6


@dataclass
class StatusReport:
    """An environment's status: the parts collected, notes and errors."""

    env: str
    collected_at: float
    parts: dict[str, Any] = field(default_factory=dict)  # part -> facts (None: not configured/available)
    notes: dict[str, str] = field(default_factory=dict)  # part -> why it has no facts
    errors: dict[str, str] = field(default_factory=dict)  # part -> why reading it failed

    def to_json(self) -> dict[str, Any]:
        return {"env": self.env, "collected_at": self.collected_at, **self.parts, "notes": self.notes,
                "errors": self.errors, "ok": not self.errors}


# --- collecting --------------------------------------------------------------------------------


def _migrations(env: Environment) -> dict[str, Any] | None:
    state = migration_state(env)
    if state is None:
        return None
    return {"up_to_date": state.up_to_date, "verdict": state.verdict, "pending": state.pending,
            "failed": state.failed, "edited": state.edited, "applied": len(state.applied)}


def _incidents(env: Environment) -> dict[str, Any]:
    found = open_incidents(env)
    return {"open": len(found), "incidents": found}


def readers(env: Environment) -> dict[str, Callable[[], Any]]:
    """Each part's reader; a part the inventory does not configure is left out."""
    parts: dict[str, Callable[[], Any]] = {"database": lambda: facts.database_facts(env)}
    for section in ("storage", "backups"):
        if env.has(section):
            parts[f"{section}_bucket"] = lambda section=section: facts.bucket_usage(env, section)
    if env.has("backups"):
        parts["last_backup"] = lambda: facts.last_backup(env)
    parts["keys"] = lambda: facts.key_facts(env)
    parts["migrations"] = lambda: _migrations(env)
    parts["incidents"] = lambda: _incidents(env)
    return parts


OPTIONAL_PARTS = {"keys", "migrations"}  # an inventory without their settings still has a status
NOT_AVAILABLE = {
    "last_backup": "no complete backup yet",
    "keys": "not applicable (local folder storage has no keys)",
    "migrations": "no migrations to compare with: set app.repository or hosts with app.dir",
}


def collect(env: Environment) -> StatusReport:
    report = StatusReport(env.name, time.time())
    parts = readers(env)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {name: pool.submit(reader) for name, reader in parts.items()}
    for name, future in futures.items():
        try:
            value = future.result()
        except InventoryError as error:
            if name not in OPTIONAL_PARTS:
                raise  # the inventory is wrong: exit 2 as everywhere
            report.parts[name], report.notes[name] = None, error.message
            continue
        except Exception as error:
            report.parts[name] = None
            report.errors[name] = describe_error(error)
            continue
        report.parts[name] = value
        if value is None:
            report.notes[name] = NOT_AVAILABLE.get(name, "not available")
    return report


# --- Prometheus --------------------------------------------------------------------------------


def families(report: StatusReport) -> list[MetricFamily]:
    env = report.env
    out = [MetricFamily("opsbook_status_timestamp_seconds", "Unix time inv status collected these numbers.")
           .add(report.collected_at, env=env)]
    success = MetricFamily("opsbook_status_success", "1 when inv status could read this part, 0 when it failed.")
    for part in report.parts:
        success.add(0 if part in report.errors else 1, env=env, part=part)
    out.append(success)
    out += _database_families(report.parts.get("database"), env)
    out += _bucket_families(report, env)
    out += _backup_families(report.parts.get("last_backup"), env)
    keys = report.parts.get("keys")
    if keys and keys.get("age_days") is not None:
        out.append(MetricFamily("opsbook_storage_key_age_seconds", "Age of the storage access key in use.")
                   .add(float(keys["age_days"]) * 86400, env=env))
    migrations = report.parts.get("migrations")
    if migrations:
        out.append(MetricFamily("opsbook_migrations_pending", "Migrations on disk not applied to the database.")
                   .add(len(migrations["pending"]), env=env))
        out.append(MetricFamily("opsbook_migrations_failed", "Failed migrations (Prisma P3009) in the database.")
                   .add(len(migrations["failed"]), env=env))
    incidents = report.parts.get("incidents")
    if incidents is not None:
        out.append(MetricFamily("opsbook_incidents_open", "Incidents not yet resolved.").add(incidents["open"],
                                                                                              env=env))
    return out


def _database_families(database: dict[str, Any] | None, env: str) -> list[MetricFamily]:
    if not database:
        return []
    connections = MetricFamily("opsbook_database_connections", "Client connections on the server by state.")
    for state, count in database["connections"].items():
        connections.add(count, env=env, state=state)
    out = [
        MetricFamily("opsbook_database_size_bytes", "Size of the database on disk.")
        .add(database["size_bytes"], env=env, database=database["database"]),
        connections,
        MetricFamily("opsbook_database_max_connections", "The server's max_connections setting.")
        .add(database["max_connections"], env=env),
        MetricFamily("opsbook_database_deadlocks_total", "Deadlocks detected in the database since the "
                                                         "statistics were reset.", "counter")
        .add(database["deadlocks"], env=env, database=database["database"]),
    ]
    if database.get("slowest_statements"):
        slow = MetricFamily("opsbook_database_statement_mean_seconds",
                            "Mean execution time of the slowest statements (pg_stat_statements).")
        for statement in database["slowest_statements"]:
            slow.add(statement["mean_ms"] / 1000, env=env, queryid=statement["queryid"])
        out.append(slow)
    return out


def _bucket_families(report: StatusReport, env: str) -> list[MetricFamily]:
    objects = MetricFamily("opsbook_bucket_objects", "Objects in the bucket (under the environment's prefix).")
    size = MetricFamily("opsbook_bucket_size_bytes", "Bytes stored in the bucket (under the environment's prefix).")
    for section in ("storage", "backups"):
        usage = report.parts.get(f"{section}_bucket")
        if usage:
            objects.add(usage["objects"], env=env, section=section, bucket=usage["bucket"])
            size.add(usage["bytes"], env=env, section=section, bucket=usage["bucket"])
    return [objects, size] if objects.samples else []


def _backup_families(backup: dict[str, Any] | None, env: str) -> list[MetricFamily]:
    if not backup:
        return []
    return [
        MetricFamily("opsbook_backup_last_success_timestamp_seconds", "Unix time the last successful backup "
                                                                      "finished.")
        .add(backup["finished_timestamp"], env=env),
        MetricFamily("opsbook_backup_age_seconds", "Seconds since the last successful backup finished.")
        .add(backup["age_seconds"], env=env),
        MetricFamily("opsbook_backup_size_bytes", "Bytes stored by the last successful backup.")
        .add(backup["size_bytes"], env=env),
    ]


# --- human lines -------------------------------------------------------------------------------


def show(report: StatusReport, output: Output) -> None:
    output.info(f"status of {report.env}:")
    database = report.parts.get("database")
    if database:
        states = ", ".join(f"{state} {count}" for state, count in database["connections"].items())
        output.info(f"  database     {database['target']}: {human_size(database['size_bytes'])}; connections "
                    f"{database['connections_total']} of {database['max_connections']} ({states}); "
                    f"deadlocks {database['deadlocks']}")
        for statement in database.get("slowest_statements") or []:
            output.info(f"    {statement['mean_ms']:9.1f} ms × {statement['calls']:<7} {statement['query']}")
        if database.get("statements_note"):
            output.info(f"    note: {database['statements_note']}")
    for section in ("storage", "backups"):
        usage = report.parts.get(f"{section}_bucket")
        if usage:
            more = "" if usage["complete"] else "+"
            output.info(f"  {section:<12} {usage['describe']}: {usage['objects']}{more} objects, "
                        f"{human_size(usage['bytes'])}")
    _show_rest(report, output)


def _show_rest(report: StatusReport, output: Output) -> None:
    backup = report.parts.get("last_backup")
    if backup:
        verified = "verified" if (backup["newest_verified"] or {}).get("id") == backup["id"] else "not verified"
        output.info(f"  last backup  {backup['id']}: {backup['age_seconds'] / 3600:.1f} h ago, "
                    f"{human_size(backup['size_bytes'])}, {verified}")
    keys = report.parts.get("keys")
    if keys:
        age = f"{keys['age_days']:.0f} days old" if keys.get("age_days") is not None else "age unknown"
        overdue = " (OVERDUE)" if keys.get("overdue") else ""
        output.info(f"  storage key  {keys.get('key_id')}: {age}{overdue}")
    migrations = report.parts.get("migrations")
    if migrations:
        output.info(f"  migrations   {migrations['verdict']}")
    incidents = report.parts.get("incidents")
    if incidents is not None:
        titles = "; ".join(f"{i['id']} ({i['state']}): {i['title']}" for i in incidents["incidents"])
        output.info(f"  incidents    {incidents['open']} open" + (f": {titles}" if titles else ""))
    for part, note in report.notes.items():
        output.info(f"  {part:<12} — {note}")
    for part, error in report.errors.items():
        output.check("fail", part, error)


# --- the HTML dashboard -------------------------------------------------------------------------


def dashboard(env: Environment, report: StatusReport) -> str:
    """The page: the report's facts with the backups' history, the retention plan and the drills read now."""
    now = datetime.fromtimestamp(report.collected_at, UTC)
    history, error = None, None
    if env.has("backups"):
        try:
            history = facts.backup_history(env, now)
        except OpsError as failure:
            error = f"the backups could not be read: {describe_error(failure)}"
    return render_dashboard(report.to_json(), history, list_drills(env), now, history_error=error)


def html_path(html: str, env_name: str) -> Path:
    """FILE with `{env}` replaced by the environment's name: one page each when --env names several."""
    path = Path(html.replace("{env}", env_name)).expanduser()
    if not path.parent.is_dir():
        raise UsageError(f"--html {path}: the folder {path.parent} does not exist",
                         hint="create it, or name another file")
    return path


def write_page(path: Path, page: str) -> None:
    """Atomically: a browser or a web server never reads half a page."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(page)
        partial.replace(path)
    except OSError as error:
        raise StepFailed(f"--html {path}: cannot be written ({error.strerror})",
                         hint="check the folder's permissions and free space") from None


@task(klass=OpsTask, multi_env=True,
      help=dict(prometheus="also write the numbers to this Prometheus textfile (node_exporter)",
                html="also write an operator's dashboard (charts of backups, retention, key age, drills) to FILE "
                     "({env} in it: the environment's name)"))
def status(call: TaskCall, env=None, json=False, prometheus=None, html=None):
    """Database size, connections, slow queries, buckets, last backup, key age, migrations, incidents."""
    page = html_path(html, call.environment.name) if html else None
    report = collect(call.environment)
    show(report, call.output)
    if prometheus:
        path = Path(prometheus).expanduser()
        write_textfile(path, families(report), replace={"env": call.environment.name})
        call.output.info(f"wrote {path}")
    if page:
        write_page(page, dashboard(call.environment, report))
        call.output.info(f"wrote {page}")
    call.output.result(report.to_json())
    if report.errors:
        raise CheckFailed(f"status of {call.environment.name}: could not read {', '.join(report.errors)}",
                          hint="see the lines above; `inv health` checks connectivity")
