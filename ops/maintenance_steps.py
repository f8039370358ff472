"""The steps of maintenance.schedule, .start, .complete and .cancel: record the window, send its notices,
publish the status page (when the environment has one; a page that cannot be published only warns).

The plan is the preview: the record's new timeline entries and each channel's rendered notice. The window is
recorded before anything is sent; a channel that failed is reported (exit 1) once the others got the notice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import StepFailed
from ops.maintenance import STATE_LABELS, MaintenanceStore, Window, notices
from ops.notify import Delivery, failed, preview_text, route, send
from ops.status_page_publish import PublishStatusPage

if TYPE_CHECKING:
    from ops.inventory import Environment


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
