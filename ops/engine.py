"""Steps, the run context, and the Runner: plan → confirm → apply → verify → journal.

Steps never know whether this is a dry run: they offer a read-only `check` and a
mutating `apply`, and only the Runner decides which of them runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import field
from typing import TYPE_CHECKING, Any, TypeVar

from ops import hosts, lease, pg, pg_url
from ops.clock import iso_z_micro, utc_now
from ops.errors import CheckFailed, ConfirmationRequired, ConnectionFailed, Interrupted, OpsError, StepFailed
from ops.journal import Journal, RunRecord, git_revision, host_name, new_run_id, operator_name
from ops.lazy_dataclasses import dataclass
from ops.locks import file_lock
from ops.output import Output, Progress
from ops.secrets import redact
from ops.step_apply import Applier, PlannedStep
from ops.storage import open_storage

if TYPE_CHECKING:
    from ops.hosts import HostConfig, HostConnection
    from ops.inventory import Environment
    from ops.storage import Storage

T = TypeVar("T")


def check_confirm_name(env_name: str, confirm: str | None, *, flag: str = "--confirm") -> None:
    """A confirmation that names another environment is refused (exit 2), whatever the run would do."""
    if confirm is not None and confirm != env_name:
        raise ConfirmationRequired(f"{flag} {confirm!r} does not match the environment {env_name!r}",
                                   hint=f"nothing was run; pass {flag} {env_name} to change {env_name}")


@dataclass
class Change:
    """What a step would change: a one-line summary, detail lines, and data for apply."""

    summary: str
    details: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


class Step:
    """Base for steps. Subclasses set `name`/`title` and implement check and apply.

    `verify` defaults to "check finds nothing left to do"; override it when the
    post-condition is more than that. Define `undo(ctx, change)` to compensate: it returns
    None once the change is undone, or a sentence saying why the change stays (journaled "kept").
    """

    name: str = "step"
    title: str = "step"

    def check(self, ctx: RunContext) -> Change | None:
        raise NotImplementedError

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any] | None:
        raise NotImplementedError

    def verify(self, ctx: RunContext) -> None:
        remaining = self.check(ctx)
        if remaining is not None:
            raise StepFailed(f"still not done after applying: {remaining.summary}")

    def checklist_line(self) -> str:
        return self.title


class WrappedStep(Step):
    """Another runbook's step, gated or re-titled by a subclass that overrides `check`. It keeps the
    inner step's name (steps of a runbook find each other's outputs by name) and has an `undo` only
    when the inner step has one: the runner journals "undone" for every step with an undo."""

    def __init__(self, inner: Step, *, title: str | None = None):
        self.inner = inner
        self.name = inner.name
        self.title = title or inner.title
        undo = getattr(inner, "undo", None)
        if undo is not None:
            self.undo = self._undo

    def check(self, ctx: RunContext) -> Change | None:
        return self.inner.check(ctx)

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any] | None:
        return self.inner.apply(ctx, change)

    def verify(self, ctx: RunContext) -> None:
        self.inner.verify(ctx)

    def _undo(self, ctx: RunContext, change: Change) -> str | None:
        return self.inner.undo(ctx, change)  # type: ignore[attr-defined]

    def checklist_line(self) -> str:
        return self.title if self.title != self.inner.title else self.inner.checklist_line()


@dataclass
class Runbook:
    """Steps run in order. On a protected environment a run with changes needs the typed name or --confirm
    NAME, unless the runbook says why it changes nothing that serves users (`confirm_exempt`): the nightly
    backup must run unattended."""

    name: str
    title: str
    steps: list[Step]
    arguments: dict[str, Any] = field(default_factory=dict)
    locks: tuple[str, ...] = ("environment",)
    confirm_exempt: str | None = None

    def checklist(self, env_name: str) -> str:
        """The runbook as a numbered Markdown checklist of the steps that run (`inv runbook.show`)."""
        lines = [f"# {self.title} — {env_name}", ""]
        lines += [f"{index}. [ ] {step.checklist_line()}" for index, step in enumerate(self.steps, start=1)]
        return "\n".join(lines) + "\n"


class RunContext:
    """What steps get: the environment, the run's identity, output, and shared connections."""

    def __init__(self, env: Environment, *, output: Output | None = None, run_id: str | None = None):
        self.env = env
        self.output = output or Output()
        self.run_id = run_id or new_run_id()
        self.state: dict[str, Any] = {}
        self.operator = operator_name()
        self.journal = Journal(env.inventory.state_dir / "runs", self.run_id)
        self._pending: set[str] = set()
        self._closers: list[Callable[[], None]] = []
        self._progress: Progress | None = None
        self._cache: dict[str, Any] = {}
        self._applier = Applier(self)
        # Called before each step is applied: each raises when the run must not go on (a lease it lost).
        self.guards: list[Callable[[], None]] = []
        # The runner copies the journal to the backup bucket at the end; a step that revokes the keys
        # that bucket is opened with copies it itself beforehand and turns this off.
        self.copy_journal = True

    @property
    def label(self) -> str:
        """Names this run to other sessions (pg_stat_activity, lock holders)."""
        return f"opsbook run {self.run_id} by {self.operator}@{host_name()}"

    def pending(self, step_name: str) -> bool:
        """During planning: whether an earlier step has a change planned (so this one may depend on it)."""
        return step_name in self._pending

    def log(self, text: str) -> None:
        self.output.info(f"     {text}")

    def progress(self, verb: str, *, total_bytes: int | None = None) -> Progress:
        """The reporter of one long transfer of the step being applied (a bar on a terminal, lines in the
        log otherwise); closed when that step's apply returns or raises, or when the next one starts."""
        self.end_progress()
        self._progress = self.output.progress(self.log, verb, total_bytes=total_bytes)
        return self._progress

    def end_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def run_steps(self, steps: list[Step]) -> list[PlannedStep]:
        """From a step's apply: apply `steps` as the runner applies its own, journaled as that step's
        "N.M"; undone on a failure, which goes on to the caller. Each with its change (None: nothing to do)."""
        return self._applier.run_nested(steps)

    def database(self, dbname: str | None = None, *, admin: bool = False) -> Any:
        """An autocommit connection over the direct (or admin) URL, shared by the run's steps."""
        def connect() -> Any:
            url = self.env.admin_url() if admin else self.env.database_url(direct=True)
            if dbname:
                url = pg_url.with_database(url, dbname)
            return pg.connect(url, application_name=self.label[:63], autocommit=True)

        return self.once(f"database:{dbname}:{admin}", connect, close=lambda connection: connection.close())

    def storage(self, section: str = "storage") -> Storage:
        return self.once(f"storage:{section}", lambda: open_storage(self.env.storage_config(section)))

    def host(self, host: HostConfig) -> HostConnection:
        """One SSH connection per host for the whole run, closed with the run's other connections."""
        return self.once(f"host:{host.name}", lambda: hosts.connect(host), close=lambda connection: connection.close())

    def once(self, key: str, make: Callable[[], T], *, close: Callable[[T], None] | None = None) -> T:
        """A value made once per run and shared by its steps: a connection, or a decision they must agree on."""
        if key not in self._cache:
            value = make()
            self._cache[key] = value
            if close is not None:
                self._closers.append(lambda: close(value))
        return self._cache[key]

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
        self._cache.clear()


@dataclass
class RunResult:
    run_id: str
    runbook: str
    env: str
    status: str  # planned | nothing to do | succeeded
    steps: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "runbook": self.runbook, "env": self.env, "status": self.status,
                "steps": self.steps}


class Runner:
    def __init__(self, runbook: Runbook, ctx: RunContext, *, confirm: str | None = None,
                 prompt: Callable[[str], str] | None = None, resume: RunRecord | None = None):
        self.runbook = runbook
        self.ctx = ctx
        self.confirm = confirm
        self.prompt = prompt
        self.resume = resume
        self.journal = ctx.journal
        self.output = ctx.output
        self.applier = ctx._applier

    def run(self, *, dry_run: bool = False) -> RunResult:
        check_confirm_name(self.ctx.env.name, self.confirm)  # before the journal, the locks and the plan
        started = self._started = time.monotonic()
        self._journal_header(dry_run)
        try:
            with self._locks(dry_run):
                plan = self.plan(dry_run=dry_run)
                self._show_plan(plan, dry_run)
                changes = [p for p in plan if p.change is not None]
                if dry_run:
                    return self._finish("planned", plan, started)
                if not changes and not self.resume:
                    self.output.info("nothing to do: every step is already satisfied")
                    return self._finish("nothing to do", plan, started)
                self._confirm(changes)
                self._apply(plan)
                self._check_guards()
                return self._finish("succeeded", plan, started)
        except KeyboardInterrupt:
            current = self.applier.active[0] if self.applier.active else None
            if current is not None:
                self.journal.step(current.index, current.name, "failed", reason="interrupted")
            self._finish_failed("interrupted", current.step.name if current else None,
                                "interrupted by the operator", 130, started)
            raise Interrupted(f"run {self.ctx.run_id} interrupted",
                              hint=f"`inv runs.resume {self.ctx.run_id}` continues where it stopped") from None
        except OpsError as error:
            if not error.journaled:
                self._finish_failed("failed", None, str(error), error.exit_code, started)
            raise
        finally:
            self.ctx.close()

    def plan(self, *, dry_run: bool) -> list[PlannedStep]:
        plan = []
        for index, step in enumerate(self.runbook.steps, start=1):
            try:
                change = step.check(self.ctx)
            except OpsError as error:
                raise self._planning_failed(index, step, error) from None
            if change is not None:
                self.ctx._pending.add(step.name)
            self.journal.step(index, step.name, "planned", change=change.summary if change else None)
            plan.append(PlannedStep(index, step, change))
        return plan

    def _planning_failed(self, index: int, step: Step, error: OpsError) -> OpsError:
        """A plan that cannot be made is a failed precondition (exit 3), in a dry run and a real one alike."""
        self.journal.step(index, step.name, "failed", reason=str(error), phase="check")
        if error.exit_code in (2, 75, 130):
            return error
        failure = CheckFailed(f"the plan cannot be made: step {index} ({step.title}) could not check its state: "
                              f"{error.message}", where=error.where, hint=error.hint)
        return failure

    def _show_plan(self, plan: list[PlannedStep], dry_run: bool) -> None:
        verb = "dry run of" if dry_run else "plan for"
        self.output.info(f"{verb} {self.runbook.name} on {self.ctx.env.name} (run {self.ctx.run_id}):")
        for planned in plan:
            change = planned.change
            state = f"would {change.summary}" if change else "nothing to do"
            self.output.info(f"  {planned.index}. {planned.step.title}: {state}")
            for detail in change.details if change else []:
                self.output.info(f"       {detail}")

    def _confirm(self, changes: list[PlannedStep]) -> None:
        env = self.ctx.env
        if not env.protected or not changes or self.runbook.confirm_exempt:
            return
        if self.confirm == env.name:
            self.journal.write("confirmed", how="--confirm")
            return
        if self.prompt is not None and sys.stdin.isatty():
            answer = self.prompt(f"{env.name} is protected. Type its name to apply this plan: ")
            if answer.strip() == env.name:
                self.journal.write("confirmed", how="prompt")
                return
            raise ConfirmationRequired("the name typed does not match; nothing was changed")
        raise ConfirmationRequired(
            f"{env.name} is protected and this run would change it, but there is no terminal to confirm at",
            hint=f"re-run with --confirm {env.name} (or from a terminal and type the name), "
                 "or use --dry-run to see the plan")

    def _apply(self, plan: list[PlannedStep]) -> None:
        verified_before = self.resume.step_states() if self.resume else {}
        if self.resume:
            self.ctx.state.update(self.resume.step_outputs())
        applied: list[PlannedStep] = []
        for planned in plan:
            step, index = planned.step, planned.index
            if verified_before.get(step.name) in {"verified", "skipped"} and self._still_verified(planned):
                continue
            try:
                change = step.check(self.ctx)  # plans go stale: check again just before applying
                if change is None:
                    self.journal.step(index, step.name, "unchanged")
                    continue
                self.applier.apply_one(planned, change)
                applied.append(PlannedStep(index, step, change))
            except (OpsError, Exception) as error:
                raise self._step_failed(planned, error, applied) from None

    def _still_verified(self, planned: PlannedStep) -> bool:
        try:
            planned.step.verify(self.ctx)
        except OpsError:
            return False
        self.journal.step(planned.index, planned.step.name, "skipped", reason=f"verified in run {self.resume.run_id}")
        self.output.info(f"  {planned.index}. {planned.step.title}: already verified in run {self.resume.run_id}")
        return True

    def _step_failed(self, planned: PlannedStep, error: BaseException, applied: list[PlannedStep]) -> OpsError:
        reason = self.applier.failed(planned, error)
        hint = error.hint if isinstance(error, OpsError) else None
        # A run that lost its lease undoes nothing: the run that holds it now may be applying.
        undone, kept = ([], []) if isinstance(error, lease.LeaseLost) else self.applier.undo(applied)
        message = f"step {planned.index} ({planned.step.title}) failed: {reason}"
        if undone:
            message += f"\n  undone: {', '.join(undone)}"
        if kept:
            message += f"\n  kept: {'; '.join(kept)}"
        failure = StepFailed(message, where=f"{self.runbook.name} on {self.ctx.env.name}, run {self.ctx.run_id}",
                             hint=hint or f"fix the cause, then run it again; `inv runs.show {self.ctx.run_id}` "
                                          "has the details")
        failure.exit_code = error.exit_code if isinstance(error, OpsError) else 1
        self._finish_failed("failed", planned.step.name, reason, failure.exit_code, self._started)
        failure.journaled = True
        return failure

    def _journal_header(self, dry_run: bool) -> None:
        env = self.ctx.env
        self.journal.write(
            "run", run_id=self.ctx.run_id, runbook=self.runbook.name, env=env.name, dry_run=dry_run,
            operator=self.ctx.operator, host=host_name(), pid=os.getpid(),
            git_revision=git_revision(env.inventory.file.parent), inventory=str(env.inventory.file),
            inventory_hash=env.inventory.digest, arguments=self.runbook.arguments,
            resumes=self.resume.run_id if self.resume else None,
            steps=[step.name for step in self.runbook.steps])

    def _finish(self, status: str, plan: list[PlannedStep], started: float) -> RunResult:
        self.journal.write("finished", status=status, exit_code=0, seconds=round(time.monotonic() - started, 3))
        self._upload_journal(dry_run=status == "planned")
        steps = [{"index": p.index, "step": p.step.name, "title": p.step.title,
                  "change": p.change.summary if p.change else None} for p in plan]
        return RunResult(self.ctx.run_id, self.runbook.name, self.ctx.env.name, status, steps)

    def _finish_failed(self, status: str, step: str | None, reason: str, exit_code: int, started: float) -> None:
        self.journal.write("finished", status=status, exit_code=exit_code, stopped_at=step, reason=redact(reason),
                           seconds=round(time.monotonic() - started, 3))

    def _upload_journal(self, *, dry_run: bool) -> None:
        """A copy of the journal goes to the environment's backup bucket (audit/); best effort."""
        if dry_run or not self.ctx.env.has("backups") or not self.ctx.copy_journal:
            return
        try:
            self.ctx.storage("backups").put_bytes(f"audit/{self.ctx.run_id}.jsonl", self.journal.path.read_bytes(),
                                                  content_type="application/x-ndjson")
        except (OpsError, OSError) as error:
            self.output.warn(f"the journal was not copied to the backup bucket: {redact(str(error))}")

    @contextlib.contextmanager
    def _locks(self, dry_run: bool) -> Iterator[None]:
        if dry_run:  # a dry run changes nothing, so it does not keep others from working
            yield
            return

        holder = {"run_id": self.ctx.run_id, "runbook": self.runbook.name, "operator": self.ctx.operator,
                  "host": host_name(), "pid": os.getpid(), "since": iso_z_micro(utc_now())}
        with contextlib.ExitStack() as stack:
            for resource in self.runbook.locks:
                if resource == "database":
                    stack.enter_context(self._database_lock())
                    continue
                path = self.ctx.env.inventory.state_dir / "locks" / f"{self.ctx.env.name}.{resource}.lock"
                dead: list[dict[str, Any]] = []  # the file lock's holder, when it died without releasing it
                stack.enter_context(file_lock(path, holder, on_takeover=functools.partial(self._took_over, dead=dead)))
                stack.enter_context(lease.held(self.ctx, resource, holder,  # the same, across machines
                                               dead_run=dead[0].get("run_id") if dead else None))
            yield

    def _check_guards(self) -> None:
        """After the last step, as before each: a run that lost its lease does not end as a success."""
        for guard in self.ctx.guards:
            guard()

    def _database_lock(self) -> contextlib.AbstractContextManager[None]:
        try:
            connection = pg.connect(self.ctx.env.database_url(direct=True), application_name=self.ctx.label[:63],
                                    autocommit=True)
        except ConnectionFailed as error:  # met before the plan, like a probe: a failed precondition
            raise CheckFailed(f"the run cannot start: it could not take the database lock: {error.message}",
                              where=error.where, hint=error.hint) from None
        self.ctx.on_close(connection.close)
        key = pg.lock_key("opsbook", self.ctx.env.inventory.project, self.ctx.env.name, "database")
        return pg.advisory_lock(connection, key, holder_label=self.ctx.label)

    def _took_over(self, previous: dict[str, Any], *, dead: list[dict[str, Any]]) -> None:
        dead.append(previous)
        self.journal.write("lock_taken_over", previous=previous)
        self.output.warn(f"took over the lock of run {previous.get('run_id')} (pid {previous.get('pid')} "
                         f"on {previous.get('host')}), which ended without releasing it")
