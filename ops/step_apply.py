"""Applying steps, for the Runner and for steps that run a list of steps of their own.

The Runner plans and confirms; what happens to one step after that — check again, apply,
verify, journal each transition, undo what was applied when a later one fails — is here,
once. A step whose apply runs other steps (the drill's restore, decommission's final
backup) calls `ctx.run_steps(steps)`: they are applied the same way and journaled as
steps "N.M" named "parent/inner", so `inv runs.show` lists them with the others. They are
not resumed one by one: `inv runs.resume` applies their parent again, and each checks again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ops.errors import OpsError
from ops.lazy_dataclasses import dataclass
from ops.lease import LeaseLost
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.engine import Change, RunContext, Step


def failure_text(error: BaseException, *, with_hint: bool = False) -> str:
    """One line for a failed step, redacted: where and what (and, when asked, what to do)."""
    if isinstance(error, OpsError):
        text = f"{error.where}: {error.message}" if error.where else error.message
        if with_hint and error.hint:
            text += f" (what to do: {error.hint})"
        return redact(text)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return redact(f"{type(error).__name__}: {error}")


@dataclass
class PlannedStep:
    """A step of the plan, with what it would change and the steps nested under it."""

    index: int | str  # "2.1": the first step that step 2 runs
    step: Step
    change: Change | None
    parent: str | None = None  # the journal name of the step that runs this one
    inner: int = 0  # how many steps this one has run: their numbers go on across its calls of run_steps

    @property
    def name(self) -> str:
        """The step's name in the journal: its own, under its parent's when it is run by another step."""
        return f"{self.parent}/{self.step.name}" if self.parent else self.step.name

    @property
    def depth(self) -> int:
        return str(self.index).count(".")


class Applier:
    """Applies steps of one run and journals them; `active` is the stack of steps being applied."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.active: list[PlannedStep] = []

    def apply_one(self, planned: PlannedStep, change: Change) -> None:
        ctx, step, indent = self.ctx, planned.step, "   " * planned.depth
        for guard in ctx.guards:  # e.g. the run lost its lease: stop before this step
            guard()
        self.active.append(planned)
        ctx.output.info(f"{indent}  {planned.index}. {step.title}: {change.summary} …")
        ctx.journal.step(planned.index, planned.name, "started", change=change.summary)
        began = time.monotonic()
        try:
            outputs = step.apply(ctx, change) or {}
        finally:
            ctx.end_progress()  # a bar stops drawing before the step's next lines
        ctx.state[step.name] = outputs
        ctx.journal.step(planned.index, planned.name, "applied", seconds=round(time.monotonic() - began, 3),
                         outputs=outputs)
        step.verify(ctx)
        ctx.journal.step(planned.index, planned.name, "verified", seconds=round(time.monotonic() - began, 3))
        ctx.output.info(f"{indent}     done ({time.monotonic() - began:.1f}s)")
        self.active.pop()

    def failed(self, planned: PlannedStep, error: BaseException) -> str:
        """Journal and show that `planned` failed; the reason, one redacted line."""
        reason = failure_text(error)
        hint = error.hint if isinstance(error, OpsError) else None
        self.ctx.journal.step(planned.index, planned.name, "failed", reason=reason, hint=hint)
        self.ctx.output.info(f"{'   ' * planned.depth}     FAILED: {reason}")
        if self.active and self.active[-1] is planned:
            self.active.pop()
        return reason

    def undo(self, applied: list[PlannedStep]) -> tuple[list[str], list[str]]:
        """Undo what was applied, newest first: (titles undone, "title (why it stays)" of those kept)."""
        undone, kept = [], []
        for planned in reversed(applied):
            undo = getattr(planned.step, "undo", None)
            if undo is None:
                continue
            try:
                why_kept = undo(self.ctx, planned.change)
            except Exception as error:  # keep undoing the rest; report what could not be
                self.ctx.journal.step(planned.index, planned.name, "undo_failed", reason=redact(str(error)))
                self.ctx.output.warn(f"could not undo {planned.step.title}: {redact(str(error))}")
                continue
            if why_kept:
                self.ctx.journal.step(planned.index, planned.name, "kept", reason=redact(why_kept))
                kept.append(f"{planned.step.title} ({redact(why_kept)})")
                continue
            self.ctx.journal.step(planned.index, planned.name, "undone")
            undone.append(planned.step.title)
        return undone, kept

    def run_nested(self, steps: list[Step]) -> list[PlannedStep]:
        """Apply `steps` inside the step being applied: each checked, applied and verified in turn; on any
        failure (an interrupt too: they are not resumed one by one) those applied are undone and the error
        goes on to the parent. Returns each step with its change (None: nothing to do)."""
        if not self.active:
            raise RuntimeError("run_steps is for a step's apply: the runner applies a runbook's own steps")
        parent = self.active[-1]
        done: list[PlannedStep] = []
        applied: list[PlannedStep] = []
        for step in steps:
            parent.inner += 1
            planned = PlannedStep(f"{parent.index}.{parent.inner}", step, None, parent.name)
            try:
                planned.change = step.check(self.ctx)
                if planned.change is None:
                    self.ctx.journal.step(planned.index, planned.name, "unchanged")
                else:
                    self.apply_one(planned, planned.change)
                    applied.append(planned)
            except BaseException as error:
                self.failed(planned, error)
                if not isinstance(error, LeaseLost):  # a lost lease: another run may be applying now
                    self.undo(applied)
                raise
            done.append(planned)
        return done
