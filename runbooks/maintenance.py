"""inv maintenance.schedule / .start / .complete / .cancel / .list — announced maintenance windows.

Each change records the window, sends its notices to the notify channels (ops/templates/maintenance/) and
publishes the status page (ops.maintenance_steps): scheduled windows show as upcoming maintenance, a window
in progress shows its components "under maintenance". Exit 3 when the window's state refuses the change
(a completed or cancelled window is final), 1 when a channel did not get the notice (the rest is recorded).
"""

from __future__ import annotations

from invoke import Collection, task

from ops.cli import OpsTask, TaskCall, execute
from ops.journal import operator_name
from ops.maintenance import MaintenanceStore, Window, new_window, transition
from ops.maintenance_steps import MaintenancePlan, maintenance_runbook

WINDOW_ID = "the window's id (from `inv maintenance.list`): the first argument, or --id ID"
COMPONENTS_LETTER = {"components": "p"}  # -c is --confirm in every task


def _result(window: Window) -> dict[str, object]:
    return {"maintenance": window.record()}


@task(klass=OpsTask, short=COMPONENTS_LETTER, help=dict(
    title="what the maintenance is, e.g. \"Database upgrade\"", start="when it starts, UTC (2026-12-02T02:00Z; "
    "default: now)", duration="how long it lasts: 30m, 2h, 1h30m", components="the parts it takes down: api,uploads",
    message="what customers should know (goes into the notices)"))
def schedule(call: TaskCall, env=None, title=None, start=None, duration=None, components=None, message=None,
             dry_run=False, json=False):
    """Announce a maintenance window: recorded, notices sent, shown on the status page as upcoming."""
    call.environment.register_secrets()
    window = new_window(call.environment, title=title or "", start=start, duration=duration, components=components,
                        message=message, operator=operator_name())
    plan = MaintenancePlan(call.environment, lambda store: window)
    runbook = maintenance_runbook("maintenance.schedule", plan, window.id,
                                  f"Schedule maintenance {window.id} on {call.environment.name}")
    execute(runbook, call.environment, call.output, dry_run=dry_run, result=lambda ctx: _result(window))
    if not dry_run:
        call.output.info(f"next: `inv maintenance.start {window.id} --env {call.environment.name}` when it begins")


def _changed(call: TaskCall, window_id: str, state: str, message: str | None) -> None:
    call.environment.register_secrets()

    def make(store: MaintenanceStore) -> Window:
        window = store.load(window_id)
        transition(window, state, message=message, operator=operator_name())
        return window

    plan = MaintenancePlan(call.environment, make)
    name = {"in_progress": "start", "completed": "complete", "cancelled": "cancel"}[state]
    runbook = maintenance_runbook(f"maintenance.{name}", plan, window_id,
                                  f"{name.capitalize()} maintenance {window_id} on {call.environment.name}")
    execute(runbook, call.environment, call.output, dry_run=call.dry_run, result=lambda ctx: _result(plan.window))


@task(klass=OpsTask, help=dict(id=WINDOW_ID, message="what customers should know now"))
def start(call: TaskCall, id, env=None, message=None, dry_run=False, json=False):
    """Start a scheduled window: its components show "under maintenance" until it completes."""
    _changed(call, id, "in_progress", message)


@task(klass=OpsTask, help=dict(id=WINDOW_ID, message="what was done"))
def complete(call: TaskCall, id, env=None, message=None, dry_run=False, json=False):
    """Complete a running window: its components are back in service."""
    _changed(call, id, "completed", message)


@task(klass=OpsTask, help=dict(id=WINDOW_ID, message="why it will not take place"))
def cancel(call: TaskCall, id, env=None, message=None, dry_run=False, json=False):
    """Cancel a scheduled or running window."""
    _changed(call, id, "cancelled", message)


@task(klass=OpsTask, name="list")
def list_(call: TaskCall, env=None, json=False):
    """The environment's maintenance windows known here, newest first: id, state, start, end, title."""
    windows = MaintenanceStore(call.environment).list()
    call.output.table(["window", "state", "start", "end", "components", "title"],
                      [[w.id, w.state, w.start, w.end, ",".join(w.components), w.title] for w in windows])
    call.output.result({"maintenance": [w.record() for w in windows]})


collection = Collection("maintenance")
collection.add_task(schedule)
collection.add_task(start)
collection.add_task(complete)
collection.add_task(cancel)
collection.add_task(list_, name="list")
