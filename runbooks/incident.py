"""inv incident.open / .update / .resolve / .show / .list / .rollback — the incident playbook.

Outline steps: 1 identify scope and 2 check logs (triage, ops.triage), 3 roll back
(deploy.rollback, and a restore only when it is safe), 4 communicate status (notices
rendered from ops/templates/incident/, sent to the inventory's `notify` channels).

Exit codes, beyond the shared ones:
- 1  the update was recorded (timeline, incident.json, bucket copy) but a channel failed to
     deliver its notice; the failed channels are named. Nothing is lost: fix the channel and
     post the next update.
- 3  the incident is resolved: updating or resolving it again is refused (the request is
     well-formed, the incident's state refuses it); a restore asked for but not safe.
- 2  unknown incident, bad --status/--impact/--components/--next-update, a template error.
Every change is recorded before anything is sent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from invoke import Collection, task

from ops.cli import environment, execute, helps, make_output, opstask
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import CheckFailed, OpsError, StepFailed, UsageError

if TYPE_CHECKING:
    from ops.incidents import Incident, IncidentStore
    from ops.inventory import Environment
    from ops.output import Output

DEFAULT_LOG_LINES = 50
NOTICE_TRIAGE_LINES = 12  # the internal notice carries the failing parts, not the logs
INCIDENT_ID = "the incident's id (from `inv incident.list`): the first argument, or --id ID"


# --- shared pieces ----------------------------------------------------------------------------


def templates_dir(env: Environment) -> str | None:
    configured = env.raw("incidents.templates_dir", None)
    if not configured:
        return None
    from pathlib import Path

    path = Path(str(configured)).expanduser()
    return str(path if path.is_absolute() else env.inventory.file.parent / path)


def run_triage(env: Environment, log_lines: int, output: Output) -> Any:
    """ops.triage's report, or None when triage itself broke (the incident goes on)."""
    from ops.triage import run_triage as triage

    try:
        return triage(env, log_lines=log_lines)
    except Exception as error:  # triage helps; it must never keep an incident from being opened
        from ops.secrets import redact

        output.warn(f"triage failed: {redact(error)}")
        return None


def triage_for_notice(report: Any) -> str:
    failing = [f"- {finding.part}: {(finding.detail or 'failed').splitlines()[0]}" for finding in report.failing]
    return "\n".join([report.summary(), *failing[:NOTICE_TRIAGE_LINES]])


def _save(store: IncidentStore, incident: Incident, output: Output) -> None:
    store.save(incident)
    problem = store.upload(incident)
    if problem:
        output.warn(f"{problem}; the local record in {store.folder(incident.id)} is complete")


def _result(incident: Incident, failed_channels: list[str]) -> dict[str, Any]:
    return {"incident": incident.record(), "timeline": [e.to_json() for e in incident.timeline],
            "failed_channels": failed_channels}


def _operator() -> str:
    from ops.journal import operator_name

    return operator_name()


def _log_lines(env: Environment, log_lines: Any) -> int:
    value = log_lines or env.raw("incidents.log_lines", None) or DEFAULT_LOG_LINES
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        raise UsageError(f"--log-lines {log_lines!r} is not a number") from None


def _no_next_update(text: str | None) -> str | None:
    return None if (text or "").strip().lower() in {"", "none", "no", "off"} else text


# --- open, update, resolve: runbooks whose plan is the notices and whose apply records and sends ------------


class IncidentPlan:
    """What the steps of one incident run share: the incident as it will be (made once, under the run's lock:
    a new one, or the stored one with the update applied), and the triage report when there is triage."""

    def __init__(self, env: Environment, make: Callable[[IncidentStore], Incident], *, verb: str,
                 log_lines: int | None = None):
        from ops.incidents import IncidentStore

        self.env = env
        self.store = IncidentStore(env)
        self.verb = verb
        self.log_lines = log_lines
        self._make = make
        self._incident: Incident | None = None
        self._triage: list[Any] = []

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
        return Change(f"record incident {incident.id}: {describe_entry(new[-1])}",
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
        from ops.incidents import add_entry

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
        from ops.notify import route
        from ops.render import incident_notices

        incident = self.plan.incident
        if incident.timeline[-1].kind == "notice":
            return None
        report = self.plan.triage(ctx.output)
        try:
            notices = incident_notices(incident, triage=triage_for_notice(report) if report else None,
                                       override_dir=templates_dir(self.plan.env))
        except OpsError as error:  # the incident is still recorded, with why nobody was told
            return Change("record that no notice can be sent: a template failed", [error.message],
                          data={"error": error})
        routes = route(self.plan.env, notices)
        summary = (f"send the {incident.state} notices to {len(routes)} channel(s)" if routes else
                   f"record the {incident.state} notices: {self.plan.env.name} has no notify channels")
        return Change(summary, _previews(routes, notices), data={"notices": notices})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        from ops.incidents import add_entry
        from ops.notify import failed, send

        incident, output, store = self.plan.incident, ctx.output, self.plan.store
        operator = incident.timeline[-1].operator
        if "error" in change.data:
            error = change.data["error"]
            add_entry(incident, "notice", operator, message="no notice sent: a template failed",
                      detail={"error": error.message})
            _save(store, incident, output)
            raise error
        deliveries = send(self.plan.env, change.data["notices"], stream=sys.stderr if output.json_mode else None)
        add_entry(incident, "notice", operator, detail={"deliveries": [d.to_json() for d in deliveries]})
        _save(store, incident, output)
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


def _previews(routes: list[Any], notices: list[Any]) -> list[str]:
    """Each channel's notice as it would be sent (secrets are masked when shown)."""
    from ops.notify import Delivery, preview_text

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
    return Runbook(name, title, steps, arguments={"incident": incident_id}, locks=locks,
                   confirm_exempt="it records the incident and tells the notify channels; it changes nothing "
                                  "that serves users")


def run_incident(runbook: Runbook, plan: IncidentPlan, output: Output, *, dry_run: bool,
                 done: Callable[[Incident], str]) -> None:
    """Runs an incident runbook: the plan shows the notices; a real run records, sends, then says what is next.
    A channel that failed is reported (exit 1) with the result, once the update and its deliveries are recorded."""
    def on_failure(ctx: RunContext, error: OpsError) -> None:
        failed_channels = ctx.state.get("failed_channels")
        if failed_channels is not None:
            output.info(done(plan.incident))
            output.result(_result(plan.incident, failed_channels))

    outcome = execute(runbook, plan.env, output, dry_run=dry_run, on_failure=on_failure,
                      result=lambda ctx: _result(plan.incident, []))
    if outcome.status == "planned":
        output.info("dry run: nothing recorded, nothing sent; the notices are in the plan above")
    else:
        output.info(done(plan.incident))


def _changed(env: str | None, incident_id: str, change: Callable[[Incident], None], *, dry_run: bool,
             json: bool, verb: str, title: str, done: Callable[[Incident], str]) -> None:
    """update and resolve: the stored incident, loaded and changed under its lock while the run plans."""
    from ops.incidents import lock_resource

    output = make_output(json)
    environment_ = environment(env, output=output)
    environment_.register_secrets()

    def make(store: IncidentStore) -> Incident:
        incident = store.load(incident_id)
        change(incident)
        return incident

    plan = IncidentPlan(environment_, make, verb=verb)
    name = verb.removesuffix("d")
    runbook = incident_runbook(f"incident.{name}", plan, incident_id=incident_id, record=f"record the {title}",
                               title=f"{name.capitalize()} incident {incident_id} on {environment_.name}",
                               locks=(lock_resource(incident_id),))
    run_incident(runbook, plan, output, dry_run=dry_run, done=done)


# --- tasks ------------------------------------------------------------------------------------


@task(name="open", help=helps(
    "env", "dry_run", "json", title="the whole problem in a few words, e.g. \"Uploads failing\"",
    impact="none, minor, major or critical", components="affected parts: api,uploads or api=major_outage,…",
    message="what is known so far (goes into the notices)", next_update="when the next update is due "
    "(default 30m; none to leave it out)", log_lines="log lines per host for triage (default 50)",
    no_triage="skip triage (when you already know the scope)"))
@opstask
def open_(c, env=None, title=None, impact=None, components=None, message=None, next_update="30m", log_lines=None,
          no_triage=False, dry_run=False, json=False):
    """Open an incident: record it, run triage (scope and logs), publish the first notice (investigating)."""
    from ops.incidents import new_incident

    output = make_output(json)
    environment_ = environment(env, output=output)
    environment_.register_secrets()
    incident = new_incident(environment_, title=title or "", impact=impact or "", components=components,
                            message=message, operator=_operator(), next_update=_no_next_update(next_update))
    lines = None if no_triage else _log_lines(environment_, log_lines)
    output.info(f"incident {incident.id} on {environment_.name}: {incident.title} (impact {incident.impact})")
    plan = IncidentPlan(environment_, lambda store: incident, verb="opened", log_lines=lines)
    runbook = incident_runbook("incident.open", plan, incident_id=incident.id, record="record the incident",
                               title=f"Open incident {incident.id} on {environment_.name}")
    run_incident(runbook, plan, output, dry_run=dry_run,
                 done=lambda opened: f"next: `inv incident.update {opened.id} --env {environment_.name} "
                                     "--status identified --message …`")


@task(help=helps("env", "dry_run", "json", id=INCIDENT_ID,
                 status="identified, monitoring or investigating (default: unchanged)",
                 message="what is known now", next_update="when the next update is due (default 30m; none)",
                 components="components and their status: api=partial_outage,uploads=operational"))
@opstask
def update(c, id, env=None, status=None, message=None, next_update="30m", components=None, dry_run=False,
           json=False):
    """Post an update: new state, what is known, components, next update time; notices to every channel."""
    from ops.incidents import apply_update

    def change(incident: Incident) -> None:
        apply_update(incident, state=status or incident.state, message=message, components=components,
                     next_update=_no_next_update(next_update), operator=_operator())

    _changed(env, id, change, dry_run=dry_run, json=json, verb="updated", title="update",
             done=lambda incident: f"incident {incident.id} is now {incident.state}")


@task(help=helps("env", "dry_run", "json", id=INCIDENT_ID, message="summary: what happened, what fixed it",
                 cause="the cause, when known", postmortem="link to the postmortem"))
@opstask
def resolve(c, id, env=None, message=None, cause=None, postmortem=None, dry_run=False, json=False):
    """Resolve an incident (all components operational); refused, exit 3, when it is already resolved."""
    from ops.incidents import apply_resolve

    def change(incident: Incident) -> None:
        apply_resolve(incident, message=message or "", cause=cause, postmortem=postmortem, operator=_operator())

    _changed(env, id, change, dry_run=dry_run, json=json, verb="resolved", title="resolution",
             done=lambda incident: f"incident {incident.id} resolved at {incident.resolved_at}")


@task(help=helps("env", "json", id=INCIDENT_ID))
@opstask
def show(c, id, env=None, json=False):
    """The incident and its timeline: every update, triage, notice delivery and rollback, in order."""
    from ops.incidents import IncidentStore

    output = make_output(json)
    environment_ = environment(env, output=output)
    store = IncidentStore(environment_)
    incident = store.load(id)
    output.info(f"incident {incident.id} on {incident.env}: {incident.title}")
    output.info(f"  state {incident.state}, impact {incident.impact}, opened {incident.opened_at} by "
                f"{incident.operator}" + (f", resolved {incident.resolved_at}" if incident.resolved_at else ""))
    output.info("  components: " + ", ".join(f"{k} {v}" for k, v in incident.components.items()))
    for entry in incident.timeline:
        output.info(f"  {entry.at}  {entry.kind:9} {entry.operator:12} {describe_entry(entry)}")
    if store.triage_markdown(incident.id):
        output.info(f"  triage: {store.folder(incident.id) / 'triage.md'}")
    output.result({"incident": incident.record(), "timeline": [e.to_json() for e in incident.timeline]})


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


@task(name="list", help=helps("env", "json", open="only the incidents not resolved yet"))
@opstask
def list_(c, env=None, open=False, json=False):
    """The environment's incidents, newest first: id, state, impact, title, opened, resolved."""
    from ops.incidents import IncidentStore

    output = make_output(json)
    environment_ = environment(env, output=output)
    incidents = IncidentStore(environment_).list(open_only=open)
    output.table(["incident", "state", "impact", "title", "opened", "resolved"],
                 [[i.id, i.state, i.impact, i.title, i.opened_at, i.resolved_at or ""] for i in incidents])
    output.result({"incidents": [i.record() for i in incidents]})


# --- rollback (outline step 3) ----------------------------------------------------------------


@dataclass
class RestoreSafety:
    safe: bool
    reason: str
    backup_id: str | None = None
    run_id: str | None = None


def restore_safety(env: Environment) -> RestoreSafety:
    """Restoring is safe only to undo a failed migration: the last migrate run of `env` in this machine's
    journal failed after its pre-migration backup completed, and no backup is newer than that one
    (a newer backup means data written since that a restore would throw away)."""
    from ops.journal import list_runs

    for record in list_runs(env.inventory.state_dir / "runs"):
        header = record.header
        if header.get("runbook") == "migrate" and header.get("env") == env.name and not header.get("dry_run"):
            return _judge_migrate_run(env, record)
    return RestoreSafety(False, f"no migrate run of {env.name} in the journal: no failed migration to undo")


def _judge_migrate_run(env: Environment, record: Any) -> RestoreSafety:
    if record.status != "failed":
        return RestoreSafety(False, f"the last migrate run ({record.run_id}) {record.status}: "
                                    "no failed migration to undo", run_id=record.run_id)
    backup_id = (record.step_outputs().get("manifest") or {}).get("backup_id")
    if not backup_id or record.step_states().get("manifest") != "verified":
        return RestoreSafety(False, f"the failed migrate run {record.run_id} has no complete pre-migration backup",
                             run_id=record.run_id)
    from ops.backup_manifest import list_backups
    from ops.storage import open_storage

    try:
        complete, _ = list_backups(open_storage(env.storage_config("backups")), strict=False)
    except OpsError as error:
        return RestoreSafety(False, f"the backups cannot be listed: {error.message}", run_id=record.run_id)
    if backup_id not in {manifest.id for manifest in complete}:
        return RestoreSafety(False, f"the pre-migration backup {backup_id} is not in the backups bucket",
                             run_id=record.run_id)
    if complete[0].id != backup_id:
        return RestoreSafety(False, f"backup {complete[0].id} is newer than the pre-migration backup {backup_id}: "
                                    "restoring would lose what was written since", run_id=record.run_id)
    return RestoreSafety(True, f"migrate run {record.run_id} failed after its pre-migration backup {backup_id}, "
                               "and no backup is newer", backup_id=backup_id, run_id=record.run_id)


def build(env: Environment, **arguments: Any) -> Runbook:
    """deploy.rollback's steps, then (with restore=True, only when safe) the restore of the pre-migration backup."""
    from runbooks.deploy import rollback_steps

    steps = rollback_steps(env)
    if arguments.get("restore"):
        backup_id = arguments.get("backup")
        if not backup_id:
            safety = restore_safety(env)
            if not safety.safe:
                raise CheckFailed(f"a restore is not safe on {env.name}: {safety.reason}",
                                  hint="roll back without --restore; restore by hand (`inv restore`) only if you "
                                       "accept losing what was written since the backup")
            backup_id = arguments["backup"] = safety.backup_id
        from runbooks.restore import build as restore_runbook

        steps += restore_runbook(env, backup=backup_id).steps
    incident = arguments.get("incident") or "an incident"
    return Runbook("incident.rollback", f"Roll back {env.name} for {incident}", steps, arguments=arguments)


@task(help=helps("env", "dry_run", "confirm", "json", id=INCIDENT_ID,
                 restore="also restore the pre-migration backup (only offered when safe)"))
@opstask
def rollback(c, id, env=None, restore=False, dry_run=False, confirm=None, json=False):
    """Roll back the release (deploy.rollback) and, only when safe and asked, restore the pre-migration backup."""
    from ops.incidents import IncidentStore, add_entry, refuse_if_resolved

    output = make_output(json)
    environment_ = environment(env, output=output, confirm=confirm)
    environment_.register_secrets()
    store = IncidentStore(environment_)
    with store.lock(id):
        incident = store.load(id)
        refuse_if_resolved(incident, "rolled back")
        safety = restore_safety(environment_)
        output.info(f"restore of a backup: {'offered' if safety.safe else 'not offered'} — {safety.reason}")
        if restore and not safety.safe:
            raise CheckFailed(f"a restore is not safe on {environment_.name}: {safety.reason}",
                              hint="run without --restore to roll back the release only")
        if safety.safe and not restore:
            output.info(f"  add --restore to also restore backup {safety.backup_id} in this rollback")
        runbook = build(environment_, incident=id, restore=restore, backup=safety.backup_id if restore else None)
        if not runbook.steps:
            raise UsageError(f"nothing to roll back with: {environment_.name} has no hosts and no restore was asked")

        def record(status: str, run_id: str, error: str | None = None) -> None:
            add_entry(incident, "rollback", _operator(), message=f"rollback {status}",
                      detail={"run_id": run_id, "status": status, "error": error,
                              "steps": [step.name for step in runbook.steps],
                              "restored_backup": runbook.arguments.get("backup") if status == "succeeded" else None})
            _save(store, incident, output)

        def on_failure(ctx: Any, error: OpsError) -> None:
            if not dry_run:
                record("failed", ctx.run_id, error.message)

        outcome = execute(runbook, environment_, output, dry_run=dry_run, confirm=confirm, on_failure=on_failure)
        if not dry_run:
            record(outcome.status, outcome.run_id)


collection = Collection("incident")
collection.add_task(open_, name="open")
collection.add_task(update)
collection.add_task(resolve)
collection.add_task(show)
collection.add_task(list_, name="list")
collection.add_task(rollback)
