"""What every DR drill check shares (runbooks/drill.py, runbooks/drill_neon.py): the session and the check step.

A check records passed / failed / skipped / not applicable and never stops the drill; the report step does.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ops import drills
from ops.clock import utc_now
from ops.drills import RTO_UNTIL_READY, NotApplicable, StepResult
from ops.engine import Change, RunContext, Step
from ops.errors import OpsError, StepFailed
from ops.inventory import plain
from ops.secrets import redact
from ops.step_apply import failure_text

if TYPE_CHECKING:
    from datetime import datetime

    from ops.backup_manifest import Manifest
    from ops.inventory import Environment
    from ops.pitr_restore import PitrPlan
    from ops.restore_steps import Plan


class Session:
    """What the drill's checks share: the environments, the clock, the backup used, each check's result."""

    def __init__(self, source: Environment, target: Environment, backup: str):
        self.source, self.target, self.backup = source, target, backup
        self.results: dict[str, StepResult] = {}
        self.started_at: datetime | None = None
        self._started: float | None = None
        self.ready_after: float | None = None  # seconds from the drill's start to staging ready
        self.restore_plan: Plan | None = None
        self.manifest: Manifest | None = None
        self.pitr_plan: PitrPlan | None = None  # a drill through point-in-time recovery (ops/drill_pitr.py)
        self.recovery: dict[str, Any] | None = None  # what its recovery reached
        # Without app hosts there is nothing to restart: the RTO ends when the restored database is migrated.
        self.has_hosts = bool(target.raw("hosts", None))
        self.rto_until = RTO_UNTIL_READY if self.has_hosts else "database restored and migrated; no app hosts"

    def begin(self) -> None:
        if self._started is None:
            self.started_at, self._started = utc_now(), time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - (self._started or time.monotonic())

    def passed(self, name: str) -> bool:
        result = self.results.get(name)
        return result is not None and result.passed

    def target_value(self, name: str) -> float | None:
        value = plain(self.source.value(f"targets.{name}", None))
        return float(value) if value is not None else None




class DrillCheck(Step):
    """A measured check: apply records passed/failed/skipped and never stops the drill; the report step does."""

    needs: tuple[str, ...] = ()
    summary = "run this check"

    def __init__(self, session: Session):
        self.session = session

    def check(self, ctx: RunContext) -> Change | None:
        try:
            details = self.plan(ctx)
        except OpsError as error:
            if error.exit_code == 2:  # the inventory or the arguments are wrong: no drill can run
                raise
            details = [f"cannot be checked now: {redact(error.message)} (the drill will report it)"]
        return Change(self.summary, details)

    def plan(self, ctx: RunContext) -> list[str]:
        return []

    def run(self, ctx: RunContext) -> str:
        raise NotImplementedError

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        self.session.begin()
        began = time.monotonic()
        blocked = [name for name in self.needs if not self.session.passed(name)]
        if blocked:
            result = StepResult(self.name, drills.SKIPPED, 0.0, f"not run: {', '.join(blocked)} did not pass")
        else:
            try:
                result = StepResult(self.name, drills.PASSED, 0.0, self.run(ctx))
            except NotApplicable as reason:
                result = StepResult(self.name, drills.NOT_APPLICABLE, 0.0, str(reason))
            except (OpsError, Exception) as error:
                result = StepResult(self.name, drills.FAILED, 0.0, failure_text(error, with_hint=True))
        result.seconds = time.monotonic() - began
        self.session.results[self.name] = result
        shown = result.detail if result.status == drills.NOT_APPLICABLE else f"{result.status.upper()}: {result.detail}"
        ctx.log(shown)
        return result.to_json()

    def verify(self, ctx: RunContext) -> None:
        if self.name not in self.session.results:  # a resumed drill measures everything again
            raise StepFailed(f"the {self.name} check has not run in this drill")
