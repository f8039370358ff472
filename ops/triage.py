"""Incident triage, steps 1 and 2 of the outline: identify the scope, check the logs.

`run_triage(env)` probes, in parallel and read-only: each host's app health and
ready URLs (over SSH for loopback URLs), the database (connectivity through the
app's URL and the direct one, pg_stat_activity: the longest-running statements and
the sessions blocked by others' locks (pg_blocking_pids) with their blockers, recent
`_prisma_migrations`), the last lines of `database.log_command` (over SSH on
`database.log_host`, else on this machine), the app's storage (list it, read one
sample object; a refusal shows the S3 error code and message), the journal's recent
deploys, migrations and restores, and the last lines of each host's `app.log_command`.
Log lines lose every known secret and the values of secret-looking keys of the
host's env file; query texts and the database log's statements lose their literals.
The report names each failing part.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from ops import pg, pg_url
from ops.clock import compact_z, iso_z
from ops.envfile import parse_env_file
from ops.errors import OpsError
from ops.hosts import connect, fetch_from_here, is_on_host
from ops.inventory import plain
from ops.journal import read_run
from ops.lazy_dataclasses import dataclass
from ops.patterns import Pattern
from ops.secrets import Secret, redact
from ops.status_facts import (
    blocked_sessions,
    connections_by_state,
    describe_error,
    longest_queries,
    max_connections,
    recent_migrations,
    redact_log_line,
)
from ops.storage import open_storage

if TYPE_CHECKING:
    from ops.hosts import HostConfig, HostConnection
    from ops.inventory import Environment

SECRET_NAME = Pattern(r"SECRET|PASSWORD|PASSWD|TOKEN|KEY|HASH|SALT|PRIVATE|CREDENTIAL|DATABASE_URL|DIRECT_URL"
                         r"|DSN|WEBHOOK", re.IGNORECASE)
RECENT_HOURS = 24
CHANGE_RUNBOOKS = ("migrate", "deploy.", "restore", "incident.rollback", "keys.rotate", "secrets.rotate",
                   "provision")
SAMPLE_BYTES = 1024
LOG_TIMEOUT_SECONDS = 30
LOCAL_HOST = "this machine"  # where database.log_command runs without a database.log_host
WORKERS = 8


@dataclass
class Finding:
    """One probed part: `component` is app | host | database | storage | logs."""

    part: str  # e.g. "app health on web1"
    component: str
    status: str  # ok | warn | fail
    detail: str
    target: str | None = None  # URL, host, database or bucket it is about (never a secret)
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"part": self.part, "component": self.component, "status": self.status, "detail": self.detail,
                "target": self.target, "hint": self.hint}


@dataclass
class HostLogs:
    """The recent log lines of one host, or why they could not be read."""

    host: str
    command: str
    lines: list[str]
    error: str | None = None


class DatabaseLog(HostLogs):
    """The database server's log (`database.log_command`), apart from the app hosts' logs."""


@dataclass
class TriageReport:
    """What triage collected: findings, recent activity, runs, migrations and logs."""

    env: str
    started_at: datetime
    finished_at: datetime | None = None
    findings: list[Finding] = field(default_factory=list)
    activity: dict[str, Any] | None = None  # connections by state, longest queries, max_connections
    recent_runs: list[dict[str, Any]] = field(default_factory=list)
    recent_migrations: list[dict[str, Any]] = field(default_factory=list)
    logs: list[HostLogs] = field(default_factory=list)
    database_log: HostLogs | None = None

    @property
    def failing(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failing

    def failing_parts(self) -> list[str]:
        return [finding.part for finding in self.failing]

    def summary(self) -> str:
        """One line: what is failing, or that every probe passed."""
        if self.ok:
            return f"triage of {self.env}: all {len(self.findings)} probes passed"
        return f"triage of {self.env}: {len(self.failing)} failing: " + "; ".join(
            f"{f.part} ({f.detail.splitlines()[0] if f.detail else 'failed'})" for f in self.failing)

    def to_json(self) -> dict[str, Any]:
        return {"env": self.env, "started_at": iso_z(self.started_at),
                "finished_at": iso_z(self.finished_at) if self.finished_at else None, "ok": self.ok,
                "failing": self.failing_parts(), "summary": self.summary(),
                "findings": [f.to_json() for f in self.findings], "database_activity": self.activity,
                "recent_runs": self.recent_runs, "recent_migrations": self.recent_migrations,
                "logs": [_log_json(log) for log in self.logs],
                "database_log": _log_json(self.database_log) if self.database_log else None}

    def markdown(self) -> str:
        return redact("\n".join(_markdown_lines(self)) + "\n")


def _log_json(log: HostLogs) -> dict[str, Any]:
    return {"host": log.host, "command": log.command, "lines": log.lines, "error": log.error}




# --- the probes --------------------------------------------------------------------------------


def run_triage(env: Environment, *, log_lines: int = 50) -> TriageReport:
    """Probe every part of `env` at once; never raises for a failing part (it is a finding)."""
    env.register_secrets()  # logs and error texts can carry any of them
    report = TriageReport(env.name, datetime.now(UTC))
    jobs = [(_probe_host, (env, host, log_lines)) for host in env.host_configs()]
    jobs.append((_probe_database, (env,)))
    if env.has("database.log_command"):
        jobs.append((_database_log, (env, log_lines)))
    if env.has("storage"):
        jobs.append((_probe_storage, (env,)))
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = [pool.submit(function, *arguments) for function, arguments in jobs]
        results = [future.result() for future in futures]
    for findings, extra in results:
        report.findings.extend(findings)
        if isinstance(extra, DatabaseLog):
            report.database_log = extra
        elif isinstance(extra, HostLogs):
            report.logs.append(extra)
        elif isinstance(extra, dict):
            report.activity = extra.get("activity")
            report.recent_migrations = extra.get("recent_migrations", [])
    report.recent_runs = recent_runs(env)
    report.finished_at = datetime.now(UTC)
    return report


def _probe_host(env: Environment, host: HostConfig, log_lines: int) -> tuple[list[Finding], HostLogs | None]:
    app = env.app_settings(host.name)
    try:
        connection = connect(host)
    except OpsError as error:
        return [Finding(f"host {host.name}", "host", "fail", describe_error(error), host.target, error.hint)], None
    with connection:
        findings = [Finding(f"host {host.name}", "host", "ok", f"SSH to {host.target} works", host.target)]
        secret_values_of_env_file(connection, env_file_path(app))  # registered before any output is read
        for kind in ("health_url", "ready_url"):
            if app.get(kind):
                findings.append(_probe_url(connection, host, kind.split("_")[0], app[kind]))
        logs = _collect_logs(connection, host, app.get("log_command"), log_lines)
    return findings, logs


def _probe_url(connection: HostConnection, host: HostConfig, kind: str, url: str) -> Finding:
    part = f"app {kind} on {host.name}"
    try:
        status, body = fetch(connection, url)
    except OpsError as error:
        return Finding(part, "app", "fail", describe_error(error), url, error.hint)
    if status == 200:
        return Finding(part, "app", "ok", f"{url} answered 200", url)
    reason = f"HTTP {status}" if status else "no answer"
    return Finding(part, "app", "fail", redact(f"{url}: {reason} {body[:300].strip()}".strip()), url,
                   f"read the app's logs on {host.name} below; `inv deploy.restart --env …` restarts it, "
                   "`inv deploy.rollback` goes back to the previous release")


def fetch(connection: HostConnection, url: str) -> tuple[int, str]:
    """Loopback URLs are fetched on the host itself (over the open SSH connection), others from here."""
    return connection.fetch_url(url) if is_on_host(url) else fetch_from_here(url)


def env_file_path(app: dict[str, Any]) -> str | None:
    if app.get("env_file"):
        return str(app["env_file"])
    return f"{str(app['dir']).rstrip('/')}/.env" if app.get("dir") else None


def secret_values_of_env_file(connection: HostConnection, path: str | None) -> list[Secret]:
    """The values of secret-looking keys in the host's env file, registered for redaction everywhere."""
    if not path:
        return []
    try:
        text = connection.read_text(path)
    except OpsError:
        return []  # the logs are still redacted of every secret we know
    found = []
    for key, value in parse_env_file(text or "").items():
        if value and SECRET_NAME.search(key):
            found.append(Secret(value))
            password = urlparse(value).password if "://" in value else None
            if password:
                found += [Secret(password), Secret(unquote(password))]
    return found


def log_command(command: str, lines: int) -> str:
    """The host's log command, its stderr too, cut to the last `lines` lines."""
    return f"{{ {command} ; }} 2>&1 | tail -n {int(lines)}"


def _collect_logs(connection: HostConnection, host: HostConfig, command: str | None, lines: int,
                  kind: type[HostLogs] = HostLogs, clean: Callable[[str], str] = redact) -> HostLogs | None:
    if not command:
        return None
    try:
        result = connection.run(log_command(command, lines), check=False, timeout=LOG_TIMEOUT_SECONDS)
    except OpsError as error:
        return kind(host.name, redact(command), [], describe_error(error))
    output = [clean(line) for line in result.stdout.splitlines()[-lines:]]
    error = None if result.ok else f"exit code {result.exit_code}"
    return kind(host.name, redact(command), output, error)


def _database_log(env: Environment, lines: int) -> tuple[list[Finding], HostLogs]:
    """`database.log_command` over SSH on `database.log_host`, or here when the database runs on this machine."""
    command = str(plain(env.value("database.log_command")))
    host = env.database_log_host()
    if host is None:
        log = _local_log(command, lines, redact_log_line)
    else:
        try:
            with connect(host) as connection:
                log = _collect_logs(connection, host, command, lines, DatabaseLog, redact_log_line)
        except OpsError as error:
            log = DatabaseLog(host.name, redact(command), [], describe_error(error))
    findings = [] if log.error is None else [
        Finding("database log", "logs", "warn", f"`{log.command}` on {log.host}: {log.error}", log.host,
                "check database.log_command and database.log_host")]
    return findings, log


def _local_log(command: str, lines: int, clean: Callable[[str], str]) -> HostLogs:
    try:
        result = subprocess.run(["sh", "-c", log_command(command, lines)], capture_output=True, text=True,
                                timeout=LOG_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return DatabaseLog(LOCAL_HOST, redact(command), [], redact(error))
    output = [clean(line) for line in result.stdout.splitlines()[-lines:]]
    return DatabaseLog(LOCAL_HOST, redact(command), output,
                       None if result.returncode == 0 else f"exit code {result.returncode}")


def _probe_database(env: Environment) -> tuple[list[Finding], dict[str, Any]]:
    findings: list[Finding] = []
    urls = [("database", env.database_url(direct=False))]
    if env.has("database.direct_url"):
        urls.append(("database (direct)", env.database_url(direct=True)))
    extra: dict[str, Any] = {}
    for part, url in urls:
        target = pg_url.parse_url(url).describe()
        try:
            with pg.connect(url, application_name="opsbook triage", autocommit=True, connect_timeout=5) as conn:
                major, minor = pg.server_version(conn)
                findings.append(Finding(part, "database", "ok", f"{target} answers (PostgreSQL {major}.{minor})",
                                        target))
                if url is urls[-1][1]:  # admin reads through the direct URL when there is one
                    blocked = blocked_sessions(conn)
                    extra["activity"] = {"connections": connections_by_state(conn), **max_connections(conn),
                                         "longest_queries": longest_queries(conn), "blocking": blocked}
                    findings += [_locks_finding(blocked, target)] if blocked else []
                    extra["recent_migrations"] = recent_migrations(conn, url, RECENT_HOURS)
        except OpsError as error:
            findings.append(Finding(part, "database", "fail", describe_error(error), target, error.hint))
        except Exception as error:  # e.g. a permission error on a catalog: the part answered, the read did not
            findings.append(Finding(f"{part} activity", "database", "warn", describe_error(error), target))
    return findings, extra


def _locks_finding(blocked: list[dict[str, Any]], target: str) -> Finding:
    first = blocked[0]
    holders = ", ".join(f"pid {b['pid']} ({b.get('state') or '?'}: `{b.get('query')}`)" for b in first["blockers"])
    detail = (f"{len(blocked)} session(s) wait on another's lock; pid {first['pid']} (`{first['query']}`, "
              f"{first['waiting_seconds'] or 0:.1f} s) is blocked by {holders}")
    pids = ", ".join(str(pid) for pid in first["blocked_by"])
    return Finding("database locks", "database", "warn", detail, target,
                   f"finish or end the blocking session if it is stuck: SELECT pg_terminate_backend(pid) for {pids}")


def _probe_storage(env: Environment) -> tuple[list[Finding], None]:
    storage = None
    try:
        storage = open_storage(env.storage_config("storage"))
        # A listing first: a GET's refusal carries the S3 error code and message (a HEAD's has none).
        sample = next(iter(storage.list()), None)
        if sample is None:
            return [Finding("storage", "storage", "warn", f"{storage.describe()}: bucket answers but is empty",
                            storage.describe())], None
        with storage.open_read(sample.key) as reader:
            size = len(reader.read(SAMPLE_BYTES))
    except OpsError as error:
        target = storage.describe() if storage else None
        return [Finding("storage", "storage", "fail", describe_error(error), target, error.hint)], None
    return [Finding("storage", "storage", "ok", f"{storage.describe()}: listed, read {size} bytes of "
                                               f"{sample.key}", storage.describe())], None


def recent_runs(env: Environment, hours: float = RECENT_HOURS) -> list[dict[str, Any]]:
    """Deploys, migrations, restores (and other changes) journaled on `env` in the last `hours`, newest first."""
    since = compact_z(datetime.now(UTC) - timedelta(hours=hours))
    runs_dir = env.inventory.state_dir / "runs"
    found = []
    for path in sorted(runs_dir.glob("*.jsonl"), reverse=True) if runs_dir.exists() else []:
        if path.stem[:16] < since:
            break  # run ids start with their UTC start time: the rest are older
        try:
            record = read_run(runs_dir, path.stem)
        except OpsError:
            continue
        header = record.header
        runbook = str(header.get("runbook", ""))
        if header.get("env") != env.name or header.get("dry_run") or not runbook.startswith(CHANGE_RUNBOOKS):
            continue
        found.append({"run_id": record.run_id, "runbook": runbook, "operator": header.get("operator"),
                      "started_at": header.get("time"), "status": record.status,
                      "stopped_at": record.stopped_at() if record.status != "succeeded" else None})
    return found


# --- markdown ----------------------------------------------------------------------------------


def _markdown_lines(report: TriageReport) -> list[str]:
    mark = {"ok": "ok", "warn": "warn", "fail": "**FAIL**"}
    lines = [f"## Triage of {report.env} at {iso_z(report.started_at)}", ""]
    lines.append(f"**{len(report.failing)} failing:** " + ", ".join(report.failing_parts()) if report.failing
                 else "All probes passed.")
    lines += ["", "| part | status | detail |", "| --- | --- | --- |"]
    for finding in report.findings:
        detail = _cell(finding.detail) + (f" — fix: {_cell(finding.hint)}" if finding.hint and
                                          finding.status != "ok" else "")
        lines.append(f"| {_cell(finding.part)} | {mark.get(finding.status, finding.status)} | {detail} |")
    lines += _activity_lines(report.activity)
    lines += ["", f"### Recent changes (last {RECENT_HOURS} h)", ""]
    changes = [f"- run {r['run_id']}: {r['runbook']} by {r['operator']}, {r['status']}"
               + (f" (stopped at {r['stopped_at']})" if r.get("stopped_at") else "") for r in report.recent_runs]
    changes += [f"- migration {m['name']}: {m['status']} at {m['finished_at'] or m['started_at']}"
                for m in report.recent_migrations]
    lines += changes or ["- none journaled"]
    if report.database_log:
        lines += _log_lines(f"Database log of {report.database_log.host}", report.database_log)
    for log in report.logs:
        lines += _log_lines(f"Logs of {log.host}", log)
    return lines


def _log_lines(heading: str, log: HostLogs) -> list[str]:
    lines = ["", f"### {heading} (`{log.command}`)", ""]
    if log.error:
        lines.append(f"({log.error})")
    return [*lines, "```text", *(line.replace("```", "'''") for line in log.lines), "```"]


def _activity_lines(activity: dict[str, Any] | None) -> list[str]:
    if not activity:
        return []
    states = ", ".join(f"{state} {count}" for state, count in activity["connections"].items()) or "none"
    total = sum(activity["connections"].values())
    lines = ["", "### Database activity", "",
             f"Connections: {total} of max_connections {activity['max_connections']} ({states})."]
    for query in activity["longest_queries"]:
        lines.append(f"- pid {query['pid']} ({query['state']}, {query['seconds']:.1f} s, {query['user']}): "
                     f"`{query['query'].replace('`', chr(39))}`")
    if activity.get("blocking"):
        lines += ["", "Sessions waiting on another's lock:"]
    for blocked in activity.get("blocking") or []:
        holders = "; ".join(f"pid {b['pid']} ({b.get('state') or '?'}, transaction open "
                            f"{b.get('transaction_seconds') or 0:.1f} s): `{_code(b.get('query'))}`"
                            for b in blocked["blockers"])
        lines.append(f"- pid {blocked['pid']} (waiting {blocked['waiting_seconds'] or 0:.1f} s, {blocked['user']}): "
                     f"`{_code(blocked['query'])}` — blocked by {holders}")
    return lines


def _code(text: str | None) -> str:
    return (text or "").replace("`", "'")


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")
