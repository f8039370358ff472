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

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from invoke import Collection, task

from ops.backup_manifest import list_backups
from ops.cli import OpsTask, TaskCall, execute
from ops.engine import Runbook, RunContext
from ops.errors import CheckFailed, OpsError, UsageError
from ops.incident_steps import IncidentPlan, describe_entry, incident_runbook, recorded_runbook, rollback_runbook
from ops.incidents import (
    Incident,
    IncidentStore,
    apply_resolve,
    apply_update,
    lock_resource,
    new_incident,
    refuse_if_resolved,
)
from ops.journal import list_runs, operator_name
from ops.lazy_dataclasses import dataclass
from ops.platform_steps import rollback_steps
from ops.restore_steps import build as restore_runbook
from ops.storage import open_storage

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.output import Output

DEFAULT_LOG_LINES = 50
INCIDENT_ID = "the incident's id (from `inv incident.list`): the first argument, or --id ID"
COMPONENTS_LETTER = {"components": "p"}  # -c is --confirm in every task


# --- shared pieces ----------------------------------------------------------------------------


def _result(incident: Incident, failed_channels: list[str]) -> dict[str, Any]:
    return {"incident": incident.record(), "timeline": [e.to_json() for e in incident.timeline],
            "failed_channels": failed_channels}


def _operator() -> str:
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
        if plan.template_error is not None:  # what a real run would end with, once it recorded the incident
            raise plan.template_error
    else:
        output.info(done(plan.incident))


def _changed(call: TaskCall, incident_id: str, change: Callable[[Incident], None], *, verb: str, title: str,
             done: Callable[[Incident], str]) -> None:
    """update and resolve: the stored incident, loaded and changed under its lock while the run plans."""
    environment_ = call.environment
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
    run_incident(runbook, plan, call.output, dry_run=call.dry_run, done=done)


# --- tasks ------------------------------------------------------------------------------------


@task(klass=OpsTask, name="open", short=COMPONENTS_LETTER, help=dict(
    title="the whole problem in a few words, e.g. \"Uploads failing\"",
    impact="none, minor, major or critical", components="affected parts: api,uploads or api=major_outage,…",
    message="what is known so far (goes into the notices)", next_update="when the next update is due "
    "(default 30m; none to leave it out)", log_lines="log lines per host for triage (default 50)",
    no_triage="skip triage (when you already know the scope)"))
def open_(call: TaskCall, env=None, title=None, impact=None, components=None, message=None, next_update="30m",
          log_lines=None, no_triage=False, dry_run=False, json=False):
    """Open an incident: record it, run triage (scope and logs), publish the first notice (investigating)."""
    call.environment.register_secrets()
    incident = new_incident(call.environment, title=title or "", impact=impact or "", components=components,
                            message=message, operator=_operator(), next_update=_no_next_update(next_update))
    lines = None if no_triage else _log_lines(call.environment, log_lines)
    call.output.info(f"incident {incident.id} on {call.environment.name}: {incident.title} (impact {incident.impact})")
    plan = IncidentPlan(call.environment, lambda store: incident, verb="opened", log_lines=lines)
    runbook = incident_runbook("incident.open", plan, incident_id=incident.id, record="record the incident",
                               title=f"Open incident {incident.id} on {call.environment.name}")
    run_incident(runbook, plan, call.output, dry_run=dry_run,
                 done=lambda opened: f"next: `inv incident.update {opened.id} --env {call.environment.name} "
                                     "--status identified --message …`")


@task(klass=OpsTask, short=COMPONENTS_LETTER, help=dict(
    id=INCIDENT_ID, status="identified, monitoring or investigating (default: unchanged)",
    message="what is known now", next_update="when the next update is due (default 30m; none)",
    components="components and their status: api=partial_outage,uploads=operational"))
def update(call: TaskCall, id, env=None, status=None, message=None, next_update="30m", components=None, dry_run=False,
           json=False):
    """Post an update: new state, what is known, components, next update time; notices to every channel."""
    def change(incident: Incident) -> None:
        apply_update(incident, state=status or incident.state, message=message, components=components,
                     next_update=_no_next_update(next_update), operator=_operator())

    _changed(call, id, change, verb="updated", title="update",
             done=lambda incident: f"incident {incident.id} is now {incident.state}")


@task(klass=OpsTask, short={"cause": "a"}, help=dict(
    id=INCIDENT_ID, message="summary: what happened, what fixed it", cause="the cause, when known",
    postmortem="link to the postmortem"))
def resolve(call: TaskCall, id, env=None, message=None, cause=None, postmortem=None, dry_run=False, json=False):
    """Resolve an incident (all components operational); refused, exit 3, when it is already resolved."""
    def change(incident: Incident) -> None:
        apply_resolve(incident, message=message or "", cause=cause, postmortem=postmortem, operator=_operator())

    _changed(call, id, change, verb="resolved", title="resolution",
             done=lambda incident: f"incident {incident.id} resolved at {incident.resolved_at}")


@task(klass=OpsTask, help=dict(id=INCIDENT_ID))
def show(call: TaskCall, id, env=None, json=False):
    """The incident and its timeline: every update, triage, notice delivery and rollback, in order."""
    store = IncidentStore(call.environment)
    incident = store.load(id)
    call.output.info(f"incident {incident.id} on {incident.env}: {incident.title}")
    call.output.info(f"  state {incident.state}, impact {incident.impact}, opened {incident.opened_at} by "
                     f"{incident.operator}" + (f", resolved {incident.resolved_at}" if incident.resolved_at else ""))
    call.output.info("  components: " + ", ".join(f"{k} {v}" for k, v in incident.components.items()))
    for entry in incident.timeline:
        call.output.info(f"  {entry.at}  {entry.kind:9} {entry.operator:12} {describe_entry(entry)}")
    if store.triage_markdown(incident.id):
        call.output.info(f"  triage: {store.folder(incident.id) / 'triage.md'}")
    call.output.result({"incident": incident.record(), "timeline": [e.to_json() for e in incident.timeline]})


@task(klass=OpsTask, name="list", help=dict(open="only the incidents not resolved yet"))
def list_(call: TaskCall, env=None, open=False, json=False):
    """The environment's incidents, newest first: id, state, impact, title, opened, resolved."""
    incidents = IncidentStore(call.environment).list(open_only=open)
    call.output.table(["incident", "state", "impact", "title", "opened", "resolved"],
                      [[i.id, i.state, i.impact, i.title, i.opened_at, i.resolved_at or ""] for i in incidents])
    call.output.result({"incidents": [i.record() for i in incidents]})


# --- rollback (outline step 3) ----------------------------------------------------------------


@dataclass
class RestoreSafety:
    """Whether restoring the last backup is safe during the incident, and why."""

    safe: bool
    reason: str
    backup_id: str | None = None
    run_id: str | None = None


def restore_safety(env: Environment) -> RestoreSafety:
    """Restoring is safe only to undo a failed migration: the last migrate run of `env` in this machine's
    journal failed after its pre-migration backup completed, and no backup is newer than that one
    (a newer backup means data written since that a restore would throw away)."""
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
    """deploy.rollback's steps, then (with restore=True, only when safe) the restore of the pre-migration backup;
    for an incident, each failure and the outcome are recorded in its timeline."""
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
        steps += restore_runbook(env, backup=backup_id).steps
    incident = arguments.get("incident")
    if incident and not steps:
        raise UsageError(f"nothing to roll back with: {env.name} has no hosts and no restore was asked")
    return rollback_runbook(env, steps, incident, arguments.get("backup"), arguments)


@task(klass=OpsTask, help=dict(id=INCIDENT_ID,
                               restore="also restore the pre-migration backup (only offered when safe)"))
def rollback(call: TaskCall, id, env=None, restore=False, dry_run=False, confirm=None, json=False):
    """Roll back the release (deploy.rollback) and, only when safe and asked, restore the pre-migration backup."""
    call.environment.register_secrets()
    store = IncidentStore(call.environment)
    with store.lock(id):
        refuse_if_resolved(store.load(id), "rolled back")
        safety = restore_safety(call.environment)
        call.output.info(f"restore of a backup: {'offered' if safety.safe else 'not offered'} — {safety.reason}")
        if restore and not safety.safe:
            raise CheckFailed(f"a restore is not safe on {call.environment.name}: {safety.reason}",
                              hint="run without --restore to roll back the release only")
        if safety.safe and not restore:
            call.output.info(f"  add --restore to also restore backup {safety.backup_id} in this rollback")
        runbook = build(call.environment, incident=id, restore=restore, backup=safety.backup_id if restore else None)
        execute(runbook, call.environment, call.output, dry_run=dry_run, confirm=confirm)


# RUNBOOKS: a failed open, update or resolve resumed (`inv runs.resume ID`) from what its run recorded.
build_open = functools.partial(recorded_runbook, "incident.open")
build_update = functools.partial(recorded_runbook, "incident.update")
build_resolve = functools.partial(recorded_runbook, "incident.resolve")


collection = Collection("incident")
collection.add_task(open_, name="open")
collection.add_task(update)
collection.add_task(resolve)
collection.add_task(show)
collection.add_task(list_, name="list")
collection.add_task(rollback)
