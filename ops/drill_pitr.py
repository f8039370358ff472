"""The DR drill through point-in-time recovery (runbooks/drill.py).

When the source has `pitr` (or `inv drill --to-time T` is given), the drill's restore is the one of
`inv restore --to-time` (ops/pitr_restore.py): the source recovered to T — by default a minute before
the drill, which the archive holds when archive_timeout is at its default of 60 s — in a scratch cluster,
copied into a new database on the target, row counts compared, then the name swap.

The RPO it reports is the target time minus the commit time of the newest transaction the recovery
replayed (pg_last_xact_replay_timestamp() on the recovered cluster), against `targets.rpo_seconds`
(default 300). Why that time: track_commit_timestamp is off by default, so no row can be asked when it
was committed, and the app's timestamp columns are the app's business; which transaction recovery
replayed last is what the server knows for sure. It bounds what a loss at T would cost: on a quiet
database it is also the quiet time before T.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ops import pitr_restore, pitr_status
from ops.clock import iso_z_micro, parse_time, utc_now
from ops.drill_checks import DrillCheck, Session
from ops.errors import UsageError

if TYPE_CHECKING:
    from ops.engine import RunContext
    from ops.inventory import Environment
    from ops.pitr_restore import PitrPlan

BEFORE_NOW = timedelta(minutes=1)  # the default target: "now minus a minute"
DEFAULT_RPO_SECONDS = pitr_status.DEFAULT_RPO_SECONDS


def drill_target_time(source: Environment, to_time: str | None, backup: str) -> str | None:
    """The --to-time the drill recovers to: the one given, else a minute ago when the source has PITR and
    no dump was named; None: the drill restores a dump."""
    if to_time is None:
        if not source.has("pitr") or backup != "latest":
            return None
        return iso_z_micro(utc_now() - BEFORE_NOW)
    if not source.has("pitr"):
        raise UsageError(f"--to-time needs point-in-time recovery on {source.name}",
                         hint=f"set envs.{source.name}.pitr and run `inv pitr.setup --env {source.name}`, or drill "
                              "a dump without --to-time")
    if backup != "latest":
        raise UsageError("--backup names a dump; --to-time recovers from the PITR archive", hint="give one of them")
    return to_time


class PitrRestoreCheck(DrillCheck):
    """The restore check of a PITR drill: `inv restore --to-time`'s steps, run as one measured check."""

    name = "restore"

    def __init__(self, session: Session, to_time: str):
        super().__init__(session)
        self.steps = pitr_restore.build(session.target, source=session.source.name, to_time=to_time).steps
        self.plan_: PitrPlan = self.steps[0].plan
        session.restore_plan = self.plan_
        session.pitr_plan = self.plan_
        self.title = (f"recover {session.source.name} to {self.plan_.when} from its PITR archive into "
                      f"{session.target.name} (scratch cluster, new database, row counts, swap)")
        self.summary = f"recover {session.source.name} to {self.plan_.when} into {session.target.name}"

    def plan(self, ctx: RunContext) -> list[str]:
        change = self.steps[0].check(ctx)
        return [change.summary, *change.details] if change else []

    def run(self, ctx: RunContext) -> str:
        ctx.run_steps(self.steps)
        loaded = self.session.recovery = dict(ctx.state.get("load") or {})
        newest = loaded.get("newest_commit") or "none replayed"
        return (f"base backup {loaded.get('base_backup')} recovered to {self.plan_.when} (newest commit {newest}); "
                f"{loaded.get('tables')} tables, {loaded.get('rows')} rows as in the recovered cluster; swapped "
                f"into {self.plan_.database}")


def target_moment(session: Session) -> datetime | None:
    """T: the time recovered to, or the drill's start for `--to-time latest`."""
    plan = session.pitr_plan
    if plan is not None and plan.moment is not None:
        return plan.moment
    return session.started_at


def achieved_rpo(target: datetime | None, newest_commit: str | None) -> float | None:
    """Seconds from the newest commit recovered to the target time (0 when it is at T)."""
    if target is None or not newest_commit:
        return None
    return max((target - parse_time(newest_commit)).total_seconds(), 0.0)


def measured_rpo(session: Session) -> float | None:
    return achieved_rpo(target_moment(session), (session.recovery or {}).get("newest_commit"))


def rpo_limit(session: Session) -> float:
    value = session.target_value("rpo_seconds")
    return value if value is not None else float(DEFAULT_RPO_SECONDS)


def rpo_detail(session: Session) -> str:
    """What the RPO figure is measured between, for the report."""
    recovery = session.recovery or {}
    target = target_moment(session)
    stopped = (f"; recovery stopped at the first commit after it ({recovery['stopped_before']})"
               if recovery.get("stopped_before") else "")
    return (f"newest commit recovered {recovery.get('newest_commit')}, target time "
            f"{iso_z_micro(target) if target else '?'}{stopped}")


def report_fields(session: Session) -> dict[str, Any]:
    """What a PITR drill's report says instead of a dump's backup id and age."""
    recovery = session.recovery or {}
    target = target_moment(session)
    rpo = measured_rpo(session)
    plan = session.pitr_plan
    chosen = getattr(plan, "_chosen", None) if plan is not None else None
    return {"backup_id": recovery.get("base_backup") or (chosen.backup.backup_id if chosen else None),
            "rpo_seconds": rpo,
            "targets": {"rto_minutes": session.target_value("rto_minutes"), "rpo_seconds": rpo_limit(session)},
            "pitr": {"to_time": iso_z_micro(target) if target else None,
                     "newest_commit": recovery.get("newest_commit"),
                     "stopped_before": recovery.get("stopped_before")}}
