"""inv runs.list / runs.show / runs.resume, and inv runbook.show."""

from __future__ import annotations

from invoke import Collection, task

import runbooks
from ops.cli import OpsTask, TaskCall, environment, execute, load_inventory
from ops.errors import UsageError
from ops.journal import list_runs, read_run


def _runs_dir():
    return load_inventory().state_dir / "runs"


@task(klass=OpsTask, help=dict(limit="how many runs to list, newest first (default 20)"))
def list_(call: TaskCall, limit=20, json=False):
    """The journaled runs, newest first: id, runbook, environment, operator, outcome."""
    records = list_runs(_runs_dir(), limit=int(limit))
    rows = [[r.run_id, r.header.get("runbook", "?"), r.header.get("env", "?"), r.header.get("operator", "?"),
             ("dry run" if r.header.get("dry_run") else r.status), r.stopped_at() or ""] for r in records]
    call.output.table(["run", "runbook", "env", "operator", "status", "stopped at"], rows)
    call.output.result({"runs": [{"run_id": r.run_id, **{k: r.header.get(k) for k in ("runbook", "env", "operator")},
                                  "status": r.status, "stopped_at": r.stopped_at()} for r in records]})


@task(klass=OpsTask, help=dict(run_id="the run's id (from `inv runs.list`): the first argument, or --run-id ID"))
def show(call: TaskCall, run_id, json=False):
    """One run's journal: header, each step's transitions with timings, the outcome."""
    record = read_run(_runs_dir(), run_id)
    header = record.header
    call.output.info(f"run {record.run_id}: {header.get('runbook')} on {header.get('env')} by {header.get('operator')}"
                     f"@{header.get('host')} (git {header.get('git_revision') or 'n/a'}, inventory "
                     f"{header.get('inventory_hash')}){' — dry run' if header.get('dry_run') else ''}")
    for entry in record.entries[1:]:
        call.output.info(_describe(entry))
    call.output.info(f"status: {record.status}")
    call.output.result({"run_id": record.run_id, "status": record.status, "entries": record.entries})


def _describe(entry: dict) -> str:
    time = entry["time"][11:19]
    if entry["event"] == "step":
        extra = entry.get("reason") or entry.get("change") or ""
        seconds = f" ({entry['seconds']}s)" if "seconds" in entry else ""
        return f"  {time}  {entry['index']}. {entry['step']}: {entry['state']}{seconds}{' — ' + extra if extra else ''}"
    if entry["event"] == "check":
        return f"  {time}  {entry['status']:4} {entry['name']} — {entry.get('detail', '')}"
    if entry["event"] == "finished":
        return f"  {time}  finished: {entry['status']} (exit {entry.get('exit_code')})" + (
            f" at {entry['stopped_at']}: {entry.get('reason', '')}" if entry.get("stopped_at") else "")
    return f"  {time}  {entry['event']}" + (f" — {entry['message']}" if entry.get("message") else "")


@task(klass=OpsTask, help=dict(run_id="the interrupted or failed run to resume: the first argument, or --run-id ID"))
def resume(call: TaskCall, run_id, confirm=None, json=False):
    """Resume a run: re-check each step, skip those verified already, apply the rest."""
    record = read_run(_runs_dir(), run_id)
    header = record.header
    if record.status in {"succeeded", "nothing to do"}:
        raise UsageError(f"run {run_id} already {record.status}; there is nothing to resume")
    if header.get("runbook") not in runbooks.RUNBOOKS:
        raise UsageError(f"run {run_id} ({header.get('runbook')}) cannot be resumed: it is not a step runbook")
    env = environment(header["env"], output=call.output, confirm=confirm)
    runbook = runbooks.build(header["runbook"], env, **(header.get("arguments") or {}))
    call.output.info(f"resuming run {run_id} ({runbook.name} on {env.name}, stopped at {record.stopped_at()})")
    execute(runbook, env, call.output, confirm=confirm, resume=record)


runs = Collection("runs")
runs.add_task(list_, name="list")
runs.add_task(show)
runs.add_task(resume)


@task(klass=OpsTask, help=dict(name="the runbook's name, e.g. provision"))
def show_runbook(call: TaskCall, name, env=None):
    """Print the runbook as a numbered Markdown checklist, generated from the steps that run."""
    call.output.document(runbooks.build(name, call.environment).checklist(call.environment.name), end="")


runbook_collection = Collection("runbook")
runbook_collection.add_task(show_runbook, name="show")
