"""The steps of maintenance.schedule, .start, .complete and .cancel: record the window, send its notices,
publish the status page (when the environment has one; a page that cannot be published only warns).

The plan is the preview: the record's new timeline entries and each channel's rendered notice. The window is
recorded before anything is sent; a channel that failed is reported (exit 1) once the others got the notice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ops.cli import execute
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import OpsError, StepFailed
from ops.incident_steps import IncidentPlan, incident_runbook
from ops.incidents import new_incident
from ops.journal import operator_name
from ops.maintenance import STATE_LABELS, MaintenanceStore, Window, new_window, notices, transition
from ops.notify import Delivery, failed, preview_text, route, send
from ops.output import captured_results
from ops.secrets import redact
from ops.status_page_publish import PublishStatusPage

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.output import Output

T = TypeVar("T")


class MaintenancePlan:
    """The window as the run leaves it (made once: a new one, or the stored one changed)."""

    def __init__(self, env: Environment, make: Callable[[MaintenanceStore], Window]):
        self.env = env
        self.store = MaintenanceStore(env)
        self._make = make
        self._window: Window | None = None

    @property
    def window(self) -> Window:
        if self._window is None:
            self._window = self._make(self.store)
        return self._window


class RecordWindow(Step):
    name = "record"
    title = "record the maintenance window"

    def __init__(self, plan: MaintenancePlan):
        self.plan = plan

    def check(self, ctx: RunContext) -> Change | None:
        window = self.plan.window
        new = window.timeline[self.plan.store.recorded(window.id):]
        if not new:
            return None
        return Change(f"record maintenance {window.id}: " + ", ".join(entry["state"] for entry in new),
                      [f"{window.title}: {window.start} to {window.end}, {', '.join(window.components)}"]
                      + [f"{entry['state']}: {entry['message']}" for entry in new])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        self.plan.store.save(self.plan.window)
        problem = self.plan.store.upload(self.plan.window)
        if problem:
            ctx.output.warn(f"{problem}; the local record in {self.plan.store.root} is complete")
        return {"window": self.plan.window.id, "state": self.plan.window.state}


class SendWindowNotices(Step):
    name = "notify"
    title = "send the maintenance notices"

    def __init__(self, plan: MaintenancePlan):
        self.plan = plan
        self._sent = False

    def check(self, ctx: RunContext) -> Change | None:
        if self._sent:
            return None
        window = self.plan.window
        rendered = notices(window)
        routes = route(self.plan.env, rendered)
        lines: list[str] = []
        for item in routes:
            if isinstance(item, Delivery):
                lines.append(f"--- {item.channel} (would fail: {item.detail})")
            else:
                channel, notice = item
                lines += [f"--- {channel.name}, {channel.audience} audience", *preview_text(notice).splitlines()]
        label = STATE_LABELS[window.state].lower()
        summary = (f"send the maintenance {label} notices to {len(routes)} channel(s)" if routes else
                   f"send no maintenance notice: {self.plan.env.name} has no notify channels")
        return Change(summary, lines, data={"notices": rendered})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        deliveries = send(self.plan.env, change.data["notices"], stream=sys.stderr if ctx.output.json_mode else None)
        self._sent = True
        for delivery in deliveries:
            (ctx.output.info if delivery.ok else ctx.output.warn)(f"{delivery.channel}: {delivery.detail}")
        failures = failed(deliveries)
        if failures:
            raise StepFailed(f"maintenance {self.plan.window.id} recorded, but {len(failures)} channel(s) did not "
                             f"get the notice: {', '.join(d.channel for d in failures)}",
                             hint="fix the channel; the window's next change notifies again")
        return {"deliveries": [d.to_json() for d in deliveries]}


def maintenance_runbook(name: str, plan: MaintenancePlan, window_id: str, title: str) -> Runbook:
    steps: list[Step] = [RecordWindow(plan), SendWindowNotices(plan)]
    if plan.env.has("status_page"):
        steps.append(PublishStatusPage(plan.env, window=lambda: plan.window, tolerant=True))
    return Runbook(name, title, steps, arguments={"window": window_id}, locks=(f"maintenance-{window_id}",),
                   confirm_exempt="it records the maintenance window and tells the notify channels; it changes "
                                  "nothing that serves users")


# --- a runbook that causes planned downtime, inside a window (`inv migrate --maintenance "title"`) -----------------


def _affected(env: Environment) -> str:
    """Planned downtime of the app takes every component the status page shows (else: "app")."""
    components = [item["name"] for item in env.raw("status_page.components", None) or []]
    return ",".join(components) or "app"


def _announce(env: Environment, output: Output, name: str, window: Window) -> None:
    """One window runbook; a failure only warns: the work it announces matters more."""
    plan = MaintenancePlan(env, lambda store: window)
    try:
        with captured_results():  # the task's own result is the one --json prints
            execute(maintenance_runbook(name, plan, window.id, f"{name} {window.id} on {env.name}"), env, output)
    except OpsError as error:
        output.warn(f"the maintenance window was not fully announced: {redact(error.message)}")


def with_maintenance(env: Environment, output: Output, title: str, work: Callable[[], T], *,
                     duration: str = "1h") -> T:
    """Start a window, run `work`; complete the window when it succeeds, else open an incident for the
    failure (its components down) and end the window, then raise the failure."""
    env.register_secrets()
    operator = operator_name()
    window = new_window(env, title=title, start=None, duration=duration, components=_affected(env),
                        message="We are carrying out planned maintenance.", operator=operator)
    transition(window, "in_progress", message="The maintenance has started.", operator=operator)
    _announce(env, output, "maintenance.start", window)
    try:
        outcome = work()
    except OpsError as failure:
        _turn_into_incident(env, output, window, operator)
        transition(window, "completed", message="The maintenance ended early: a problem is being investigated.",
                   operator=operator)
        _announce(env, output, "maintenance.complete", window)
        raise failure from None
    transition(window, "completed", message="The maintenance is complete.", operator=operator)
    _announce(env, output, "maintenance.complete", window)
    return outcome


def _turn_into_incident(env: Environment, output: Output, window: Window, operator: str) -> None:
    incident = new_incident(env, title=f"{window.title} did not complete", impact="major",
                            components=window_components(window), operator=operator,
                            message="The planned maintenance ran into a problem; we are investigating.")
    plan = IncidentPlan(env, lambda store: incident, verb="opened")
    try:
        with captured_results():
            execute(incident_runbook("incident.open", plan, incident_id=incident.id, record="record the incident",
                                     title=f"Open incident {incident.id} on {env.name}"), env, output)
    except OpsError as error:
        output.warn(f"the incident for the failed maintenance was not fully opened: {redact(error.message)}")
    output.warn(f"incident {incident.id} opened for the failed maintenance: `inv incident.show {incident.id} "
                f"--env {env.name}`")


def window_components(window: Window) -> str:
    return ",".join(window.components)
