"""`inv restore --to-time T` (or `--to-time latest`, or `--to-lsn LSN`): the source as it was at T, into any
target.

1. recover: choose the base backup before T and check, from the bucket listing, that its WAL reaches T
   without a gap (a gap is named: which segment, which span is lost) — before anything changes; then
   recover a scratch cluster on this machine (ops/pitr_scratch.py) to T, and move its data into a new
   database on the target with `pg_dump | pg_restore`, comparing row counts with the recovered cluster's;
   the scratch cluster is removed on every way out. An LSN is checked against the backups' LSN spans
   the same way, and the recovered cluster must have replayed up to it;
2. swap: the same name swap as a dump restore (ops/restore_steps.py), so the target can be any
   PostgreSQL, managed or not.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ops import (
    dump,
    pg,
    pg_tools,
    pg_url,
    pitr_catalog,
    pitr_host,
    pitr_prefetch,
    pitr_scratch,
    pitr_seal,
    processes,
    restore_db,
)
from ops.cli import environment as load_environment
from ops.clock import iso_z, iso_z_or_none, parse_time, utc_now
from ops.engine import Change, Runbook, RunContext
from ops.errors import CheckFailed, ConnectionFailed, StepFailed, UsageError
from ops.pitr_lsn import Lsn
from ops.restore_steps import Plan, ScratchLoad, SwapStep

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.pitr_catalog import Recoverable


def target_time(text: str) -> datetime | None:
    """--to-time: an ISO-8601 time (UTC unless it says otherwise), or `latest` (None)."""
    if text == "latest":
        return None
    try:
        return parse_time(text)
    except ValueError:
        raise UsageError(f"--to-time {text!r} is not a time",
                         hint="give an ISO-8601 time such as 2026-11-23T17:00:00Z, or latest") from None


def target_lsn(text: str) -> Lsn:
    """--to-lsn: a WAL position as pg_current_wal_lsn() prints it."""
    try:
        return Lsn.parse(text)
    except ValueError:
        raise UsageError(f"--to-lsn {text!r} is not an LSN",
                         hint="give a WAL position such as 0/3000060 (pg_current_wal_lsn() on the source)") from None


class PitrPlan(Plan):
    """A dump restore's plan whose data comes from a recovered scratch cluster instead of a dump."""

    def __init__(self, target: Environment, source: Environment, database: str, moment: datetime | None,
                 keep_old: bool, lsn: Lsn | None = None):
        super().__init__(target, source, "pitr", database, utc_now(), keep_old, None, 1)
        self.moment = moment
        self.lsn = lsn  # --to-lsn: the moment is then None
        self.engine = pitr_host.engine_of(source)
        self.expected: dict[str, int] = {}
        self._chosen: Recoverable | None = None
        self._sealed = False  # a commit after the moment is archived (ops/pitr_seal.py)
        self._source_answers: bool | None = None
        self.segments: dict[str, datetime] = {}  # the archive's WAL segments, read with the chosen backup
        self.history: frozenset[str] = frozenset()  # and its timeline history files

    @property
    def when(self) -> str:
        if self.lsn is not None:
            return f"LSN {self.lsn}"
        return iso_z_or_none(self.moment) or "the latest recoverable point"

    @property
    def recovery_target(self) -> datetime | Lsn | None:
        return self.lsn if self.lsn is not None else self.moment

    def chosen(self, ctx: RunContext) -> Recoverable:
        """The base backup to recover from; CheckFailed (range, gap) before anything changes."""
        if self._chosen is None:
            catalog = pitr_catalog.read(self.storage(ctx), self.engine)
            self.segments, self.history = catalog.segments, catalog.history
            self._chosen = (pitr_catalog.choose_lsn(catalog, self.lsn, self.source.name) if self.lsn is not None
                            else self._choose_time(catalog))
        return self._chosen

    def _choose_time(self, catalog: pitr_catalog.Catalog) -> Recoverable:
        """The base backup for the moment; before the seal, a moment past the archive's end is plannable from a
        backup whose WAL reaches that end when the source answers (the seal archives a commit after it)."""
        try:
            return pitr_catalog.choose(catalog, self.moment, self.source.name)
        except CheckFailed:
            ahead = pitr_catalog.reaching_the_end(catalog, self.moment) if self.moment is not None else None
            if self._sealed or ahead is None or not self.source_answers():
                raise
            return ahead

    def source_answers(self) -> bool:
        if self._source_answers is None:
            self._source_answers = pitr_seal.reachable(self.source.admin_url())
        return self._source_answers

    @contextlib.contextmanager
    def sealing(self, ctx: RunContext) -> Iterator[Callable[[], Recoverable]]:
        """The seal (ops/pitr_seal.py) run beside the block, whose work (the base backup's restore) does not need
        it; the block is given the call that waits for it before recovery reads the WAL, and returns the base
        backup to recover from, read again after the seal (the one being restored, or CheckFailed)."""
        if self.moment is None:
            yield lambda: self.chosen(ctx)
            return
        cancelled = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pitr-seal") as pool:
            sealing = pool.submit(pitr_seal.seal, self.source.admin_url(), self.moment, cancelled=cancelled)
            try:
                yield lambda: self._after_seal(ctx, sealing)
            finally:
                cancelled.set()  # a block left early (a failure, Ctrl-C) does not wait out the archiver

    def _after_seal(self, ctx: RunContext, sealing: Future[pitr_seal.Seal]) -> Recoverable:
        """Before recovering to a time: an empty commit after it on the source, archived, so that PostgreSQL can
        stop there even when nothing was committed since; skipped when the source does not answer."""
        restoring = self.chosen(ctx)
        try:
            sealed = sealing.result()
        except ConnectionFailed:
            ctx.log(f"{self.source.name} does not answer: recovering to {self.when} from what its archive holds")
            return restoring
        except StepFailed as error:  # a failing or lagging archiver must not block a time the archive already holds
            ctx.log(f"{error.message}: recovering to {self.when} from what {self.source.name}'s archive holds")
            return restoring
        ctx.log(f"an empty transaction committed on {self.source.name} at {iso_z(sealed.committed_at)}, WAL segment "
                f"{sealed.segment} archived: recovery can stop at {self.when}")
        self._sealed, self._chosen = True, None  # the catalog is read again: it must cover the moment now
        chosen = self.chosen(ctx)
        if chosen.backup.backup_id != restoring.backup.backup_id:
            raise CheckFailed(f"{self.source.name}'s archive changed during the restore: recovering to {self.when} "
                              f"now needs base backup {chosen.backup.backup_id}, not {restoring.backup.backup_id}",
                              hint="nothing was changed on the target; run the restore again")
        return chosen

    def segments_ahead(self, chosen: Recoverable) -> list[str]:
        """The archived segments recovering from `chosen` reads, as far as the catalog read last shows them."""
        return pitr_catalog.segments_to_replay(self.segments, chosen, self.moment, self.lsn, pitr_prefetch.LIMIT)

    def restored_what(self, ctx: RunContext) -> str:
        return f"{self.source.name} as of {self.when}"

    def _find_tool(self, ctx: RunContext) -> Any:
        with self.maintenance(ctx) as connection:
            major = pg.server_version(connection)[0]
        return pg_tools.find_client_tool("pg_restore", max(major, self.chosen(ctx).backup.major))

    def check_counts(self, ctx: RunContext) -> dict[str, int]:
        scratch_url = pg_url.with_database(self.url(ctx), self.scratch)
        with pg.connect(scratch_url, application_name=ctx.label[:63]) as connection:
            counts = pg.table_row_counts(connection)
        problems = restore_db.compare_row_counts(self.expected, counts)
        if problems:
            raise CheckFailed(f"{self.scratch} does not match the recovered {self.source.name}: "
                              f"{'; '.join(problems[:10])}", hint="the live database was not touched")
        ctx.log(f"{len(counts)} tables, {sum(counts.values())} rows: as in the recovered cluster")
        return counts


class RecoverStep(ScratchLoad):
    name = "load"

    def __init__(self, plan: PitrPlan):
        super().__init__(plan)
        self.plan: PitrPlan = plan
        self.title = (f"recover {plan.source.name} to {plan.when} in a scratch cluster, then pg_dump | pg_restore "
                      f"it into a new database {plan.scratch} and compare row counts")

    def check(self, ctx: RunContext) -> Change | None:
        chosen = self.plan.chosen(ctx)
        pitr_scratch.server_bin_dir(chosen.backup.major)
        self.plan.tool(ctx)
        span = (f"LSN {chosen.earliest_lsn} .. {chosen.latest_lsn}" if self.plan.lsn is not None
                else f"{iso_z_or_none(chosen.earliest)} .. {iso_z_or_none(chosen.latest)}")
        return Change(f"recover {self.plan.source.name} to {self.plan.when} and load it into {self.plan.scratch}",
                      [f"base backup {chosen.backup.backup_id} (recoverable {span}) from {self.plan.engine.location}",
                       f"a scratch PostgreSQL {chosen.backup.major} cluster on this machine, removed afterwards",
                       f"on {ctx.env.name}; the live database {self.plan.database} is not touched"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        plan = self.plan
        chosen = plan.chosen(ctx)
        bin_dir = pitr_scratch.server_bin_dir(chosen.backup.major)
        os_user = pitr_host.default_os_user()
        state_dir = ctx.env.inventory.state_dir
        pitr_scratch.remove_leftovers(state_dir, ctx.log)
        started = time.monotonic()
        phases = Phases()
        ahead = plan.segments_ahead(chosen)
        with pitr_scratch.scratch_cluster(state_dir, ctx.run_id, bin_dir, os_user) as cluster, \
             pitr_prefetch.fetching_ahead(cluster.directory, plan.engine, os_user, ahead, plan.history) as prefetch, \
             plan.sealing(ctx) as sealed:
            with phases.timed("base_restore"):
                pitr_scratch.restore_base(cluster, plan.engine, chosen.backup.backup_id, plan.recovery_target)
            with phases.timed("seal"):
                chosen = sealed()
            if prefetch and (later := [name for name in plan.segments_ahead(chosen) if name not in ahead]):
                prefetch.add(later)
            ctx.log(f"base backup {chosen.backup.backup_id} restored in {phases['base_restore']} s; "
                    f"replaying WAL to {plan.when}"
                    f"{f' ({len(prefetch.fetched)} of {len(ahead)} segments fetched ahead)' if prefetch else ''}")
            with phases.timed("replay"):
                reached = pitr_scratch.recover(cluster, plan.engine, plan.recovery_target,
                                               prefetch.spool if prefetch else None)
            recovered = round(time.monotonic() - started, 2)
            stopped = f", stopped before the commit at {reached['stopped_before']}" if reached["stopped_before"] else ""
            ctx.log(f"recovered in {recovered} s (WAL replay {phases['replay']} s): last transaction "
                    f"{reached['last_transaction'] or '?'}{stopped}, replayed to LSN {reached['replay_lsn'] or '?'}")
            source_url = cluster.url(pg_url.parse_url(plan.source.admin_url()).user, plan.source.database_name())
            loaded = self.into_scratch(ctx, change, lambda: self._copy(ctx, source_url, chosen.backup.major, phases))
            with phases.timed("scratch_stop"):
                pitr_scratch.stop(cluster)
        ctx.log(f"phases (s): {', '.join(f'{name} {seconds}' for name, seconds in phases.items())}")
        to_lsn = {"to_lsn": str(plan.lsn)} if plan.lsn is not None else {}
        return {**loaded, "to_time": iso_z_or_none(plan.moment), **to_lsn, "base_backup": chosen.backup.backup_id,
                **reached, "recover_seconds": recovered, "phase_seconds": dict(phases),
                "wal_fetched_ahead": len(prefetch.fetched) if prefetch else 0,
                "seconds": round(time.monotonic() - started, 2)}

    def _copy(self, ctx: RunContext, source_url: Any, major: int, phases: Phases) -> dict[str, Any]:
        with phases.timed("counts"), pg.connect(source_url, application_name=ctx.label[:63]) as connection:
            self.plan.expected = pg.table_row_counts(connection)
        with phases.timed("copy"):
            copy_database(pg_tools.find_client_tool("pg_dump", major), source_url, self.plan.tool(ctx),
                          self.plan.url(ctx), self.plan.scratch, cross_environment=self.plan.cross_environment)
        return {}


class Phases(dict[str, float]):
    """Seconds spent in each named phase of a step, for its log line and its journal entry."""

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.monotonic() - started, 2)


def copy_database(dump_tool: Any, source_url: Any, restore_tool: Any, target_url: Any, database: str, *,
         cross_environment: bool) -> None:
    """`pg_dump -Fc | pg_restore` from the recovered cluster into `database` on the target."""
    dumping = pg_tools.dump_command(dump_tool)
    restoring = [*pg_tools.restore_command(restore_tool, dbname=database),
                 *restore_db.restore_options(cross_environment=cross_environment)]
    target_database = pg_url.with_database(target_url, database)
    try:
        with processes.child_process(dumping, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=pg_url.child_environment(source_url)) as dumper, \
             processes.child_process(restoring, stdin=dumper.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=pg_url.child_environment(target_database)) as restorer:
            dumper.stdout.close()  # pg_restore holds it now
            dump_errors, restore_errors = dump.StderrTail(dumper.stderr), dump.StderrTail(restorer.stderr)
            restored, dumped = restorer.wait(), dumper.wait()
    except processes.CannotStart as error:
        raise StepFailed(f"cannot start pg_dump or pg_restore: {error}",
                         hint="check the PostgreSQL client installation (OPS_PG_BIN)") from None
    if dumped != 0 or restored != 0:
        reason = dump_errors.text() if dumped != 0 else restore_errors.text()
        raise StepFailed(f"copying the recovered database into {database} failed: {' '.join(reason.split())[-1500:]}",
                         hint="the live database is untouched; fix the cause and run it again")


def build(env: Environment, **arguments: Any) -> Runbook:
    source_name = arguments.get("source") or env.name
    source = env if source_name == env.name else load_environment(source_name, allow_decommissioned=True)
    given = [flag for flag, key in (("--to-time", "to_time"), ("--to-lsn", "to_lsn")) if arguments.get(key)]
    if str(arguments.get("backup") or "latest") != "latest":
        raise UsageError(f"--backup names a dump; {given[0]} recovers from the PITR archive", hint="give one of them")
    if len(given) > 1:
        raise UsageError("--to-time and --to-lsn are two ways to name the recovery target", hint="give one of them")
    lsn = target_lsn(str(arguments["to_lsn"])) if arguments.get("to_lsn") else None
    moment = target_time(str(arguments["to_time"])) if lsn is None else None
    if moment is not None and moment > utc_now():
        raise UsageError(f"--to-time {iso_z(moment)} is in the future", hint="give a past time, or latest")
    database = arguments.get("database") or env.database_name()
    plan = PitrPlan(env, source, database, moment, bool(arguments.get("keep_old")), lsn)
    title = f"Restore {env.name} ({database}) to {plan.when} of {source.name} (point-in-time recovery)"
    return Runbook("restore", title, [RecoverStep(plan), SwapStep(plan)], arguments=arguments,
                   locks=("environment",))

