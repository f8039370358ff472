"""The steps of incident.open, .update and .resolve: record the incident, record its triage, send its notices.

Their plan is the preview: the record's new timeline entries, the triage report and each channel's rendered
notice (secrets masked when shown) are the Changes' details; only applying records and sends. Every change is
recorded before anything is sent, and the deliveries are recorded before a failed one fails the step (exit 1),
so a channel that is down never loses the update.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.engine import Change, Runbook, RunContext, Step, WrappedStep
from ops.errors import OpsError, StepFailed
from ops.incidents import Incident, IncidentStore, add_entry, lock_resource
from ops.journal import operator_name
from ops.notify import Delivery, failed, preview_text, route, send
from ops.render import incident_notices
from ops.secrets import redact
from ops.status_page_publish import PublishStatusPage
from ops.triage import run_triage as triage_report

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.output import Output

NOTICE_TRIAGE_LINES = 12  # the internal notice carries the failing parts, not the logs


def templates_dir(env: Environment) -> str | None:
    configured = env.raw("incidents.templates_dir", None)
    if not configured:
        return None
    path = Path(str(configured)).expanduser()
    return str(path if path.is_absolute() else env.inventory.file.parent / path)


def run_triage(env: Environment, log_lines: int, output: Output) -> Any:
    """ops.triage's report, or None when triage itself broke (the incident goes on)."""
    try:
        return triage_report(env, log_lines=log_lines)
    except Exception as error:  # triage helps; it must never keep an incident from being opened
        output.warn(f"triage failed: {redact(error)}")
        return None


def triage_for_notice(report: Any) -> str:
    failing = [f"- {finding.part}: {(finding.detail or 'failed').splitlines()[0]}" for finding in report.failing]
    return "\n".join([report.summary(), *failing[:NOTICE_TRIAGE_LINES]])


def save_and_copy(store: IncidentStore, incident: Incident, output: Output) -> None:
    store.save(incident)
    problem = store.upload(incident)
    if problem:
        output.warn(f"{problem}; the local record in {store.folder(incident.id)} is complete")


def describe_entry(entry: Any) -> str:
    parts = [entry.state or ""]
    if entry.message:
        parts.append(f"— {entry.message}")
    if entry.components:
        parts.append("[" + ", ".join(f"{k}: {v}" for k, v in entry.components.items()) + "]")
    if entry.next_update:
        parts.append(f"(next update by {entry.next_update})")
    deliveries = entry.detail.get("deliveries")
    if deliveries is not None:
        parts.append("; ".join(f"{d['channel']}: {'ok' if d['ok'] else 'FAILED ' + d['detail']}"
                               for d in deliveries) or "no channels")
    for key in ("failing", "error", "cause", "postmortem", "run_id", "status", "restored_backup"):
        if entry.detail.get(key):
            parts.append(f"{key}: {entry.detail[key]}")
    return " ".join(part for part in parts if part)


class IncidentPlan:
    """What the steps of one incident run share: the incident as it will be (made once, under the run's lock:
    a new one, or the stored one with the update applied), and the triage report when there is triage."""

    def __init__(self, env: Environment, make: Callable[[IncidentStore], Incident], *, verb: str,
                 log_lines: int | None = None):
        self.env = env
        self.store = IncidentStore(env)
        self.verb = verb
        self.log_lines = log_lines
        self._make = make
        self._incident: Incident | None = None
        self._triage: list[Any] = []
        self.template_error: OpsError | None = None  # the plan says so; a dry run still ends with it (exit 2)

    @property
    def incident(self) -> Incident:
        if self._incident is None:
            self._incident = self._make(self.store)
        return self._incident

    def triage(self, output: Output) -> Any:
        """The triage report (None without triage, or when triage broke); triage runs once per run."""
        if self.log_lines is None:
            return None
        if not self._triage:
            self._triage.append(run_triage(self.env, self.log_lines, output))
        return self._triage[0]


class RecordIncident(Step):
    """The incident's new timeline entries and state, in incident.json and timeline.jsonl."""

    name = "record"

    def __init__(self, plan: IncidentPlan, title: str):
        self.plan = plan
        self.title = title

    def check(self, ctx: RunContext) -> Change | None:
        incident = self.plan.incident
        new = incident.timeline[self.plan.store.recorded(incident.id):]
        if not new:
            return None
        return Change(f"record incident {incident.id}: " + ", ".join(f"{e.kind} ({e.state})" for e in new),
                      [f"{entry.kind}: {describe_entry(entry)}" for entry in new])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        self.plan.store.save(self.plan.incident)  # recorded before anything slow or fallible
        return {"incident": self.plan.incident.id}


class RecordTriage(Step):
    """Triage (scope and logs: ops.triage) runs while planning; its report is recorded with the incident."""

    name = "triage"
    title = "triage: scope and logs"

    def __init__(self, plan: IncidentPlan):
        self.plan = plan

    def check(self, ctx: RunContext) -> Change | None:
        if any(entry.kind == "triage" for entry in self.plan.incident.timeline):
            return None
        report = self.plan.triage(ctx.output)
        if report is None:
            return None
        return Change(f"record the triage: {report.summary()}", report.markdown().splitlines(),
                      data={"report": report})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        report, incident = change.data["report"], self.plan.incident
        incident.triage_failing = report.failing_parts()
        self.plan.store.save_triage(incident, report.markdown(), report.to_json())
        add_entry(incident, "triage", incident.timeline[-1].operator, message=report.summary(),
                  detail={"failing": report.failing_parts()})
        self.plan.store.save(incident)
        return {"failing": report.failing_parts()}


class SendNotices(Step):
    """The notices of the incident's state, rendered from the templates while planning (the plan shows each
    channel's), sent to every channel; the deliveries are recorded before a failed one is reported."""

    name = "notify"
    title = "send the notices"

    def __init__(self, plan: IncidentPlan):
        self.plan = plan

    def check(self, ctx: RunContext) -> Change | None:
        incident = self.plan.incident
        last = incident.timeline[-1]
        only = unsent(last) if last.kind == "notice" else None
        if only is not None and not only:
            return None
        report = self.plan.triage(ctx.output)
        try:
            notices = incident_notices(incident, triage=triage_for_notice(report) if report else None,
                                       override_dir=templates_dir(self.plan.env))
        except OpsError as error:  # the incident is still recorded, with why nobody was told
            self.plan.template_error = error
            return Change("record that no notice can be sent: a template failed", [error.message],
                          data={"error": error})
        routes = route(self.plan.env, notices, only=only)
        again = "the channel(s) that did not get them: " if only else ""
        summary = (f"send the {incident.state} notices to {again}{len(routes)} channel(s)" if routes else
                   f"record the {incident.state} notices: {self.plan.env.name} has no notify channels")
        return Change(summary, _previews(routes, notices), data={"notices": notices, "only": only})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        incident, output, store = self.plan.incident, ctx.output, self.plan.store
        operator = incident.timeline[-1].operator
        if "error" in change.data:
            error = change.data["error"]
            add_entry(incident, "notice", operator, message="no notice sent: a template failed",
                      detail={"error": error.message})
            save_and_copy(store, incident, output)
            raise error
        deliveries = send(self.plan.env, change.data["notices"], stream=sys.stderr if output.json_mode else None,
                          only=change.data.get("only"))
        add_entry(incident, "notice", operator, detail={"deliveries": [d.to_json() for d in deliveries]})
        save_and_copy(store, incident, output)
        for delivery in deliveries:
            (output.info if delivery.ok else output.warn)(f"{delivery.channel}: {delivery.detail}")
        if not deliveries:
            output.warn(f"{self.plan.env.name} has no notify channels: nobody was told (add `notify:` to the "
                        "inventory)")
        failures = failed(deliveries)
        if failures:
            ctx.state["failed_channels"] = names = [d.channel for d in failures]
            raise StepFailed(f"incident {incident.id} {self.plan.verb} and recorded, but {len(failures)} channel(s) "
                             f"did not get the notice: {', '.join(names)}",
                             hint="the timeline has each delivery's reason; fix the channel, the next update "
                                  "re-sends")
        return {"deliveries": [d.to_json() for d in deliveries]}


def unsent(notice: Any) -> set[str] | None:
    """The channels a recorded notice entry did not reach (a resumed run sends to them); None when no notice
    was sent at all (a template failed): every channel, then."""
    if "error" in notice.detail:
        return None
    return {delivery["channel"] for delivery in notice.detail.get("deliveries") or [] if not delivery["ok"]}


def _previews(routes: list[Any], notices: list[Any]) -> list[str]:
    """Each channel's notice as it would be sent (secrets are masked when shown)."""
    lines = []
    for item in routes:
        if isinstance(item, Delivery):
            lines.append(f"--- {item.channel}, {item.audience} audience (would fail: {item.detail})")
            continue
        channel, notice = item
        lines += [f"--- {channel.name}, {channel.audience} audience", *preview_text(notice).splitlines()]
    if not routes:
        for notice in notices:
            lines += [f"--- {notice.format}, {notice.audience} (no channel configured)",
                      *preview_text(notice).splitlines()]
    return lines


def incident_runbook(name: str, plan: IncidentPlan, *, incident_id: str, title: str, record: str,
                     locks: tuple[str, ...] = ()) -> Runbook:
    steps: list[Step] = [RecordIncident(plan, record)]
    if plan.log_lines is not None:
        steps.append(RecordTriage(plan))
    steps.append(SendNotices(plan))
    if plan.env.has("status_page"):  # last, and tolerant: a page that cannot be published only warns
        steps.append(PublishStatusPage(plan.env, current=lambda: plan.incident, tolerant=True))
    arguments: dict[str, Any] = {"incident": incident_id}
    if plan.log_lines is not None:
        arguments["log_lines"] = plan.log_lines
    return Runbook(name, title, steps, arguments=arguments, locks=locks,
                   confirm_exempt="it records the incident and tells the notify channels; it changes nothing "
                                  "that serves users")


# --- a failed run of open, update or resolve, resumed (`inv runs.resume ID`) --------------------------------

RECORDED = {"incident.open": ("opened", "record the incident"), "incident.update": ("updated", "record the update"),
            "incident.resolve": ("resolved", "record the resolution")}


def recorded_runbook(name: str, env: Environment, *, incident: str | None = None, log_lines: int | None = None,
                     **arguments: Any) -> Runbook:
    """The runbook `name` for the incident as its failed run recorded it (what it changed is in the record):
    what is still to do is done, e.g. the notices go to the channels that did not get them."""
    env.register_secrets()
    incident_id = incident or "ID"
    verb, record = RECORDED[name]
    plan = IncidentPlan(env, lambda store: store.load(incident_id), verb=verb, log_lines=log_lines)
    return incident_runbook(name, plan, incident_id=incident_id, record=record,
                            title=f"{verb.capitalize()} incident {incident_id} on {env.name}: the rest of a failed run",
                            locks=(lock_resource(incident_id),) if incident else ())


# --- incident.rollback: the release's rollback steps, each failure and the outcome in the incident's timeline ------


class RollbackRecord:
    """The incident a rollback is for, loaded when the run first needs it, and how its timeline entry is written."""

    def __init__(self, env: Environment, incident_id: str, steps: list[str], restored_backup: str | None):
        self.store = IncidentStore(env)
        self.incident_id = incident_id
        self.steps = steps
        self.restored_backup = restored_backup
        self._incident: Incident | None = None

    @property
    def incident(self) -> Incident:
        if self._incident is None:
            self._incident = self.store.load(self.incident_id)
        return self._incident

    def recorded(self, run_id: str) -> bool:
        return any(entry.kind == "rollback" and entry.detail.get("run_id") == run_id
                   for entry in self.incident.timeline)

    def add(self, ctx: RunContext, status: str, error: str | None = None) -> None:
        add_entry(self.incident, "rollback", operator_name(), message=f"rollback {status}",
                  detail={"run_id": ctx.run_id, "status": status, "error": error, "steps": self.steps,
                          "restored_backup": self.restored_backup if status == "succeeded" else None})
        save_and_copy(self.store, self.incident, ctx.output)


class RecordingFailure(WrappedStep):
    """A rollback step whose failure, while it applies, is recorded in the incident's timeline (then raised)."""

    def __init__(self, inner: Step, record: RollbackRecord):
        super().__init__(inner)
        self.record = record
        self._applied = False

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any] | None:
        self._applied = True
        return self._recording(ctx, lambda: self.inner.apply(ctx, change))

    def verify(self, ctx: RunContext) -> None:
        if not self._applied:  # a resumed run asking whether an earlier run's step still holds
            return self.inner.verify(ctx)
        return self._recording(ctx, lambda: self.inner.verify(ctx))

    def _recording(self, ctx: RunContext, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except KeyboardInterrupt:
            self.record.add(ctx, "failed", "interrupted by the operator")
            raise
        except Exception as error:
            self.record.add(ctx, "failed", redact(getattr(error, "message", None) or error))
            raise


class RecordRollback(Step):
    """Last: the rollback's outcome in the incident's timeline."""

    name = "record-rollback"

    def __init__(self, record: RollbackRecord):
        self.record = record
        self.title = f"record the rollback in incident {record.incident_id}'s timeline"

    def check(self, ctx: RunContext) -> Change | None:
        if self.record.recorded(ctx.run_id):
            return None
        return Change(f"add the rollback (run {ctx.run_id}) to incident {self.record.incident_id}'s timeline")

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        self.record.add(ctx, "succeeded")
        return {"incident": self.record.incident_id}


def rollback_runbook(env: Environment, steps: list[Step], incident_id: str | None, restored_backup: str | None,
                     arguments: dict[str, Any]) -> Runbook:
    """The rollback `steps`; for an incident, each failure and the outcome recorded in its timeline."""
    if incident_id is not None:
        record = RollbackRecord(env, incident_id, [step.name for step in steps], restored_backup)
        steps = [*(RecordingFailure(step, record) for step in steps), RecordRollback(record)]
    return Runbook("incident.rollback", f"Roll back {env.name} for {incident_id or 'an incident'}", steps,
                   arguments=arguments)
