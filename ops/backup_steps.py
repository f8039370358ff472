"""The backup runbook's steps and builder: dump & upload, manifest (written last), metrics, retention.

A backup is: dump & upload (pg_dump → zstd → age → sha256 → multipart upload, row
counts read in the dump's own snapshot) → the cluster's globals beside it (ops/cluster_globals.py)
→ manifest, written last → each of backups.copies (ops/backup_copies.py) → metrics → retention.
Only a backup with a manifest exists; a failed run leaves none. migrate's pre-migration backup and
decommission's final backup are these same steps.

With `database.names` (ops/backup_databases.py) there is one dump step per database, run one after
another, each streamed (and bounded in memory) as one database's is, each in its own snapshot; the one
manifest, still written last, lists them all. The globals are the cluster's, stored once.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops import backup_lock, cluster_globals, dump, metrics, migrations, pg, pg_tools, pg_url, processes
from ops.backup_copies import CopiesStep, copy_names
from ops.backup_databases import backup_databases
from ops.backup_manifest import (
    DatabaseDump,
    DatabaseInfo,
    Manifest,
    StoredObject,
    ToolInfo,
    dump_key,
    manifest_key,
    read_manifest,
    write_manifest,
)
from ops.clock import iso_z, parse_time, utc_now
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import CheckFailed, StepFailed
from ops.inventory import plain
from ops.journal import new_run_id
from ops.metrics import gauges, write_textfile
from ops.output import human_size
from ops.retention import prune_after_backup
from ops.secrets import redact
from ops.storage import BucketNotFound

if TYPE_CHECKING:
    from ops.backup_manifest import Manifest
    from ops.inventory import Environment

GLOBALS_AHEAD = "backup.globals_ahead"  # the run's cluster_globals.GlobalsAhead, started by the dump
DEFAULT_LEVEL = 1  # on the benchmark data as small as level 3 for ~45% less CPU; raise it to trade CPU for size


def settings(env: Environment) -> dict[str, Any]:
    section = plain(env.value("backups", {})) or {}
    return {"level": int(section.get("compression_level") or DEFAULT_LEVEL),
            "recipients": [str(r) for r in section.get("encrypt_to") or []],
            "identity_file": section.get("identity_file"), "metrics_file": section.get("metrics_file"),
            "exclude_table_data": [str(name) for name in section.get("exclude_table_data") or []]}


def excluded_tables(env: Environment) -> list[str]:
    """backups.exclude_table_data as "schema.table": a bare name is a table of the app's (Prisma) schema
    (the same in each database of a backup of several: they share the URL's ?schema=)."""
    schema = migrations.prisma_schema(env.database_url(direct=True))
    return sorted(name if "." in name else f"{schema}.{name}" for name in settings(env)["exclude_table_data"])


# --- steps ------------------------------------------------------------------------------------


DUMP = "dump"  # the step of a backup of one database; with several, "dump-<name>" each


class DumpStep(Step):
    """pg_dump of one database, streamed to storage; `database` (a backup of several): that one, in its folder."""

    def __init__(self, backup_id: str, database: str | None = None):
        self.backup_id, self.database = backup_id, database
        self.name = DUMP if database is None else f"{DUMP}-{database}"
        what = "the database" if database is None else f"database {database}"
        self.title = f"dump {what} and stream it to {dump_key(backup_id, False, database).rsplit('/', 1)[0]}/"
        self.key = dump_key(backup_id, encrypted=False, database=database)

    def _url(self, ctx: RunContext) -> Any:
        url = ctx.env.database_url(direct=True)
        return url if self.database is None else pg_url.with_database(url, self.database)

    def check(self, ctx: RunContext) -> Change | None:
        options = settings(ctx.env)
        connection = ctx.database()
        major, _minor = pg.server_version(connection)
        version = connection.execute("SHOW server_version").fetchone()[0].split()[0]
        tool = pg_tools.find_client_tool("pg_dump", major)  # CheckFailed naming both versions when too old
        recipients = dump.parse_recipients(options["recipients"])
        storage = ctx.storage("backups")
        if not storage.bucket_exists():
            raise BucketNotFound(f"the backup bucket does not exist: {storage.describe()}",
                                 hint=f"create it (`inv provision --env {ctx.env.name}`) or fix backups.bucket")
        name = self.database or connection.info.dbname
        row = connection.execute("SELECT pg_database_size(datname) FROM pg_database WHERE datname = %s",
                                 (name,)).fetchone()
        if row is None:
            raise CheckFailed(f"database.names: there is no database {name} on "
                              f"{pg_url.parse_url(ctx.env.database_url(direct=True)).describe()}",
                              hint="create it, or take it out of database.names")
        size = row[0]
        key = self._key(ctx)
        target = pg_url.parse_url(self._url(ctx)).describe()
        encryption = f"age to {len(recipients)} recipient(s)" if recipients else "not encrypted"
        excluded = excluded_tables(ctx.env)
        details = [f"from {target} (PostgreSQL {version}) with pg_dump {tool.version} ({tool.path})",
                   f"to {storage.describe()}", f"zstd level {options['level']}, {encryption}"]
        if excluded:
            details.append(f"without the rows of {', '.join(excluded)} (backups.exclude_table_data)")
        return Change(f"dump {name} (about {human_size(size)} on disk) to {key}", details, {"size": size})

    def _key(self, ctx: RunContext) -> str:
        return dump_key(self.backup_id, encrypted=bool(settings(ctx.env)["recipients"]), database=self.database)

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        options = settings(ctx.env)
        url = self._url(ctx)
        major, _minor = pg.server_version(ctx.database())
        tool = pg_tools.find_client_tool("pg_dump", major)
        key = self._key(ctx)
        storage = ctx.storage("backups")
        excluded = excluded_tables(ctx.env)
        ctx.once(GLOBALS_AHEAD, lambda: cluster_globals.start_globals(ctx.env, ctx.database()), close=_stop_ahead)
        snapshot_connection = pg.connect(url, application_name=ctx.label[:63], autocommit=True)
        with snapshot_connection, pg.exported_snapshot(snapshot_connection) as snapshot:
            started = utc_now()
            # every object of a backup is held until the same moment: the one its manifest records
            lock = backup_lock.object_lock(ctx.env, _first_started(ctx) or started)
            facts: dict[str, Any] = {}
            reader = threading.Thread(target=_read_facts, args=(snapshot_connection, url, facts), daemon=True)
            try:
                # Ctrl-C from here on stops the reader first: the snapshot's transaction cannot end while the
                # reader's savepoint is open on the same connection.
                reader.start()
                stored = dump.dump_to_storage(
                    pg_tools.dump_command(tool, snapshot=snapshot, exclude_table_data=excluded),
                    pg_url.child_environment(url), storage, key,
                    level=options["level"], recipients=dump.parse_recipients(options["recipients"]),
                    part_size=dump.part_size_for(change.data.get("size", 0)),
                    on_progress=ctx.progress("uploaded"),
                    what=f"pg_dump of {pg_url.parse_url(url).describe()}", lock=lock)
                reader.join()
            except BaseException:
                with processes.interrupts_held():  # a second Ctrl-C waits until the reader has stopped
                    _stop_reader(snapshot_connection, reader)
                raise
        if "error" in facts:
            storage.delete(key)
            raise facts["error"]
        finished = utc_now()
        if self.database is None:  # with several databases, the manifest step warns of a name none of them has
            _warn_unknown_exclusions(ctx, excluded, [facts["row_counts"]])
        ctx.log(f"stored {human_size(stored.size)} (dump {human_size(stored.dump_size)}) "
                f"in {stored.seconds:.1f}s; sha256 {stored.sha256}")
        version = ctx.database().execute("SHOW server_version").fetchone()[0].split()[0]
        return {"backup_id": self.backup_id, "key": key, "size": stored.size, "sha256": stored.sha256,
                "dump_size": stored.dump_size, "snapshot": snapshot, "started_at": iso_z(started),
                "finished_at": iso_z(finished), "seconds": round((finished - started).total_seconds(), 3),
                "database": self.database or ctx.database().info.dbname, "target": pg_url.parse_url(url).describe(),
                "server_version": version, "server_major": major, "pg_dump_version": tool.version,
                "pg_dump_major": tool.major, "level": options["level"], "recipients": options["recipients"],
                "excluded_table_data": excluded, "lock": backup_lock.manifest_record(ctx.env, started, finished),
                **facts}

    def verify(self, ctx: RunContext) -> None:
        outputs = ctx.state.get(self.name) or {}
        info = ctx.storage("backups").head(outputs.get("key", self._key(ctx)))
        if info is None or info.size != outputs.get("size"):
            raise StepFailed(f"backups/{self.backup_id}: the stored dump is missing or has the wrong size",
                             hint="run the backup again")

    def undo(self, ctx: RunContext, change: Change) -> str | None:
        storage = ctx.storage("backups")
        if storage.head(manifest_key(self.backup_id)) is not None:  # never remove a dump its manifest points at
            return f"backup {self.backup_id} is complete in the backup bucket"
        storage.delete(self._key(ctx))
        return None


def _warn_unknown_exclusions(ctx: RunContext, excluded: list[str], counts: list[dict[str, int]]) -> None:
    for name in excluded:
        if not any(name in found for found in counts):  # a typo or a dropped table: its rows would be kept
            ctx.output.warn(f"backups.exclude_table_data: there is no table {name} in the database")


def dumps(ctx: RunContext) -> list[dict[str, Any]]:
    """The outputs of this run's dump steps, in order (one per database)."""
    return [outputs for name, outputs in ctx.state.items()
            if (name == DUMP or name.startswith(f"{DUMP}-")) and isinstance(outputs, dict) and "key" in outputs]


def _first_started(ctx: RunContext) -> Any:
    done = dumps(ctx)
    return parse_time(done[0]["started_at"]) if done else None


def _stop_ahead(ahead: cluster_globals.GlobalsAhead | None) -> None:
    if ahead is not None:
        ahead.stop()


def _stop_reader(connection: Any, reader: threading.Thread, seconds: float = 10) -> None:
    """The reader's count(*) may be waiting for a lock, and ending the snapshot would wait for it: cancel
    until the reader is done, since a cancel that lands between two of its statements stops nothing."""
    deadline = time.monotonic() + seconds
    while reader.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            connection.cancel_safe(timeout=2)
        reader.join(timeout=0.2)


def _read_facts(connection: Any, url: Any, facts: dict[str, Any]) -> None:
    """Row counts, applied migrations and extensions, read inside the exported snapshot."""
    try:
        # A savepoint: an error here must not end the transaction whose snapshot pg_dump imports.
        with connection.transaction():
            facts["row_counts"] = pg.table_row_counts(connection)
            facts["extensions"] = [{"name": name, "version": version} for name, version in connection.execute(
                "SELECT extname, extversion FROM pg_extension ORDER BY extname").fetchall()]
            schema = migrations.prisma_schema(url)
            connection.execute("SELECT set_config('search_path', %s, true)", (f'"{schema}"',))
            facts["migrations"] = [row.migration_name for row in migrations.read_applied(connection)
                                   if row.finished_at is not None and row.rolled_back_at is None]
    except Exception as error:
        facts["error"] = StepFailed(f"reading row counts in the dump's snapshot failed: {redact(error)}",
                                    hint="nothing was kept; run the backup again")


class GlobalsStep(Step):
    """The roles and memberships the dump's owners and grants name, so it restores onto an empty server."""

    name = "globals"

    def __init__(self, backup_id: str):
        self.backup_id = backup_id
        self.title = f"store the cluster's roles (pg_dumpall --globals-only) in backups/{backup_id}/"

    def _key(self, ctx: RunContext) -> str:
        return cluster_globals.globals_key(self.backup_id, encrypted=bool(settings(ctx.env)["recipients"]))

    def check(self, ctx: RunContext) -> Change | None:
        return Change(f"dump the roles and their memberships to {self._key(ctx)}")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        options = settings(ctx.env)
        started = _first_started(ctx)  # held as long as the dumps it belongs to
        stored = cluster_globals.store_globals(ctx.env, ctx.database(), ctx.storage("backups"), self.backup_id,
                                               level=options["level"],
                                               recipients=dump.parse_recipients(options["recipients"]),
                                               lock=backup_lock.object_lock(ctx.env, started),
                                               ahead=ctx.once(GLOBALS_AHEAD, lambda: None))
        ctx.log(f"stored the globals ({human_size(stored['size'])}"
                + ("" if stored["role_passwords"] else "; without role passwords: pg_authid is not readable") + ")")
        return {"stored": stored}

    def verify(self, ctx: RunContext) -> None:
        stored = (ctx.state.get(self.name) or {}).get("stored") or {}
        info = ctx.storage("backups").head(self._key(ctx))
        if info is None or info.size != stored.get("size"):
            raise StepFailed(f"backups/{self.backup_id}: the stored globals are missing or have the wrong size",
                             hint="run the backup again")

    def undo(self, ctx: RunContext, change: Change) -> None:
        storage = ctx.storage("backups")
        if storage.head(manifest_key(self.backup_id)) is None:
            storage.delete(self._key(ctx))


class ManifestStep(Step):
    name = "manifest"

    def __init__(self, backup_id: str, tags: list[str], keep: bool, databases: list[str] | None = None):
        self.backup_id, self.tags, self.keep, self.databases = backup_id, tags, keep, databases
        self.title = f"write backups/{backup_id}/manifest.json (last: only then does the backup exist)"

    def check(self, ctx: RunContext) -> Change | None:
        steps = [DUMP] if self.databases is None else [f"{DUMP}-{name}" for name in self.databases]
        if (not any(ctx.pending(step) for step in steps)
                and ctx.storage("backups").head(manifest_key(self.backup_id)) is not None):
            return None
        details = [f"tags: {', '.join(self.tags) or 'none'}", f"keep: {'yes' if self.keep else 'no'}"]
        if self.databases is not None:
            details.append(f"databases: {', '.join(self.databases)}")
        return Change(f"write {manifest_key(self.backup_id)}", details)

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        done = dumps(ctx)
        if self.databases is not None:
            _warn_unknown_exclusions(ctx, done[0]["excluded_table_data"], [d["row_counts"] for d in done])
        manifest = build_manifest(ctx, done[0], self.tags, self.keep, done if self.databases is not None else None)
        # the dump's retention: the backup's objects are held until the same moment
        write_manifest(ctx.storage("backups"), manifest, lock=backup_lock.object_lock(ctx.env, _first_started(ctx)))
        return {"backup_id": manifest.id}

    def verify(self, ctx: RunContext) -> None:
        manifest = read_manifest(ctx.storage("backups"), self.backup_id)
        stored = [(part.object.key, part.sha256) for part in manifest.parts()]
        if stored != [(done["key"], done["sha256"]) for done in dumps(ctx)]:
            raise StepFailed(f"backups/{self.backup_id}/manifest.json does not describe the stored dump")


def build_manifest(ctx: RunContext, dumped: dict[str, Any], tags: list[str], keep: bool,
                   several: list[dict[str, Any]] | None = None) -> Manifest:
    """The manifest of the dump `dumped`; with `several` (one dump per database), listing them all."""
    encryption = {"algorithm": "age", "recipients": dumped["recipients"]} if dumped["recipients"] else None
    return Manifest(
        id=dumped["backup_id"], project=ctx.env.inventory.project, env=ctx.env.name, run_id=ctx.run_id,
        database=DatabaseInfo(dumped["database"], dumped["target"], dumped["server_version"], dumped["server_major"]),
        pg_dump=ToolInfo(dumped["pg_dump_version"], dumped["pg_dump_major"]), snapshot=dumped["snapshot"],
        started_at=dumped["started_at"], finished_at=dumped["finished_at"], seconds=dumped["seconds"],
        object=StoredObject(dumped["key"], dumped["size"], dumped["sha256"], dumped["dump_size"],
                            {"algorithm": "zstd", "level": dumped["level"]}, encryption),
        row_counts=dumped["row_counts"], migrations=dumped["migrations"], extensions=dumped["extensions"],
        tags=list(tags), keep=keep, excluded_table_data=list(dumped.get("excluded_table_data") or []),
        lock=dumped.get("lock"), globals=(ctx.state.get("globals") or {}).get("stored"),
        databases=None if several is None else [_database_dump(done, encryption) for done in several])


def _database_dump(dumped: dict[str, Any], encryption: dict[str, Any] | None) -> DatabaseDump:
    return DatabaseDump(dumped["database"], dumped["target"], dumped["snapshot"],
                        StoredObject(dumped["key"], dumped["size"], dumped["sha256"], dumped["dump_size"],
                                     {"algorithm": "zstd", "level": dumped["level"]}, encryption),
                        dumped["row_counts"], dumped["migrations"], dumped["extensions"],
                        list(dumped.get("excluded_table_data") or []))


class MetricsStep(Step):
    name = "metrics"

    def __init__(self, path: Path):
        self.path = path
        self.title = f"write Prometheus metrics to {path}"

    def check(self, ctx: RunContext) -> Change | None:
        return Change(f"update {self.path.name} (last success, duration, size)")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        done = dumps(ctx)
        finished = parse_time(done[-1]["finished_at"])
        values = {"opsbook_backup_last_success_timestamp_seconds": finished.timestamp(),
                  "opsbook_backup_duration_seconds": round((finished - _first_started(ctx)).total_seconds(), 3),
                  "opsbook_backup_size_bytes": sum(d["size"] for d in done)}
        write_metrics(self.path, ctx.env.name, values)
        return {"file": str(self.path)}

    def verify(self, ctx: RunContext) -> None:
        if not self.path.exists():
            raise StepFailed(f"{self.path} was not written")


METRIC_HELP = {
    "opsbook_backup_last_success_timestamp_seconds": "Unix time the last successful backup finished.",
    "opsbook_backup_duration_seconds": "Seconds the last successful backup took.",
    "opsbook_backup_size_bytes": "Bytes stored by the last successful backup.",
}


def render_metrics(existing: str, env: str, values: dict[str, float]) -> str:
    """The textfile with this environment's samples replaced and other environments' kept."""
    new = metrics.gauges(values, METRIC_HELP, env=env)
    return metrics.render(metrics.merge(metrics.parse(existing), new, {"env": env}))


def write_metrics(path: Path, env: str, values: dict[str, float]) -> None:
    """Atomically (temp file + rename): node_exporter never reads half a file."""
    write_textfile(path, gauges(values, METRIC_HELP, env=env), replace={"env": env})


class PruneStep(Step):
    name = "prune"
    title = "apply the retention policy (backup.prune)"

    def check(self, ctx: RunContext) -> Change | None:
        return Change("delete the backups the retention policy no longer keeps")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        return prune_after_backup(ctx)

    def verify(self, ctx: RunContext) -> None:
        """Retention reports its own outcome; a refusal does not undo the backup."""


def build(env: Environment, **arguments: Any) -> Runbook:
    backup_id = arguments.setdefault("backup_id", new_run_id())
    tags = list(arguments.get("tags") or [])
    databases = backup_databases(env)
    dumping = [DumpStep(backup_id)] if databases is None else [DumpStep(backup_id, name) for name in databases]
    steps: list[Step] = [*dumping, GlobalsStep(backup_id),
                         ManifestStep(backup_id, tags, bool(arguments.get("keep")), databases)]
    days = backup_lock.lock_days(env)
    if days is not None:
        steps.insert(0, backup_lock.LockStep(days))
    copies = copy_names(env)
    if copies:
        steps.append(CopiesStep(copies, backup_id=backup_id))
    metrics_file = settings(env)["metrics_file"]
    if metrics_file:
        path = Path(os.path.expanduser(metrics_file))
        steps.append(MetricsStep(path if path.is_absolute() else env.inventory.file.parent / path))
    if not arguments.get("no_prune"):
        steps.append(PruneStep())
    return Runbook("backup", f"Back up the {env.name} database", steps, arguments=arguments,
                   locks=("environment", "database"),
                   confirm_exempt="reads the database and adds a backup; its retention runs by policy: the "
                                  "nightly job runs unattended")
