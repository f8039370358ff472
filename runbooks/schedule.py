"""inv schedule.show: the jobs an environment runs unattended, for systemd, Kubernetes or cron."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import Collection, task

from ops import schedule as jobs
from ops import yaml_text
from ops.cli import OpsTask, TaskCall
from ops.errors import InventoryError, OpsError, UsageError
from ops.inventory import plain
from ops.secrets import Secret
from runbooks import RUNBOOKS
from runbooks import build as build_runbook

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.output import Output

# The arguments each scheduled runbook is built with: its command line's, as the runbook's builder names them.
RUNBOOK_ARGUMENTS: dict[str, dict[str, Any]] = {"backup": {}, "backup.verify": {"backup": "latest", "deep": True},
                                                "backup.assets": {}, "pitr.base": {}}


@task(klass=OpsTask, help=dict(format="systemd, kubernetes or cron",
                               out="write one file per unit or manifest into this directory instead of printing"))
def show(call: TaskCall, env=None, format=None, out=None, json=False):
    """The jobs an environment needs (nightly backup, weekly deep verify, daily assets copy, weekly checks)
    as systemd units, Kubernetes CronJobs or crontab lines, from the inventory's schedule section."""
    if format not in jobs.FORMATS:
        raise UsageError(f"--format {format!r}: choose systemd, kubernetes or cron" if format else
                         "--format is required: systemd, kubernetes or cron",
                         hint="e.g. `inv schedule.show --env prod --format systemd`")
    environment = call.inventory_environment  # nothing is started or connected to: this only renders
    if environment.decommissioned:
        raise UsageError(f"environment {environment.name} is decommissioned: it has nothing to schedule",
                         where=environment.inventory.location(f"envs.{environment.name}"),
                         hint="remove its units, CronJobs or crontab lines where they were installed")
    schedule = plan(environment, call.output)
    refuse_confirmation_prompts(environment, schedule)
    files = render(environment, schedule, format)
    call.output.info(f"{len(schedule.jobs)} job(s) of {environment.name}: "
                     + "; ".join(f"{job.task} {job.when}" for job in schedule.jobs))
    for key, reason in schedule.skipped:
        call.output.info(f"not scheduled: {key} ({reason})")
    written = write(Path(out), files, call.output) if out else None
    if written is None and not json:
        show_files(format, files, call.output)
    elif written is not None:
        call.output.info(next_step(format, schedule, Path(out)))
    listed = [describe(schedule, job) for job in schedule.jobs]
    call.output.result({"env": environment.name, "format": format, "jobs": listed,
                        "skipped": [{"job": key, "reason": reason} for key, reason in schedule.skipped],
                        "files": files if written is None else None, "written": written})


def plan(env: Environment, output: Output) -> jobs.Schedule:
    section = plain(env.value("schedule", {})) or {}
    return jobs.plan(env.name, env.inventory.project, section, opsbook=console_tool(section, output),
                     inventory=str(env.inventory.file), app_bucket=env.sandbox or env.has("storage"),
                     pitr=env.has("pitr"))


def console_tool(section: dict[str, Any], output: Output) -> str:
    """The `opsbook` installed beside the Python running this task (the virtualenv's), else the one on PATH."""
    if section.get("opsbook"):
        return str(section["opsbook"])
    beside = Path(sys.executable).parent / "opsbook"
    found = str(beside) if beside.exists() else shutil.which("opsbook")
    if found is None:
        output.warn(f"no opsbook console tool beside {sys.executable} or on PATH: the units name {beside}; "
                    "install opsbook (`pip install .`) or set schedule.opsbook")
    return os.path.abspath(found or beside)


def refuse_confirmation_prompts(env: Environment, schedule: jobs.Schedule) -> None:
    """A scheduled run has no terminal: on a protected environment, a runbook that would ask is not scheduled."""
    if not env.protected:
        return
    for job in schedule.jobs:
        if job.task in RUNBOOKS and not build_runbook(job.task, env, **RUNBOOK_ARGUMENTS[job.task]).confirm_exempt:
            raise OpsError(f"{job.task} would ask for --confirm {env.name}, and a scheduled run cannot answer",
                           hint="this is a bug in opsbook's schedule: only runs that need no confirmation belong in it")


def render(env: Environment, schedule: jobs.Schedule, format: str) -> dict[str, str]:
    """{file name: text} in the chosen format."""
    if format == "systemd":
        return jobs.systemd_units(schedule)
    if format == "cron":
        return {f"opsbook-{schedule.env}.crontab": jobs.crontab(schedule)}
    refuse_inline_secrets(env)
    manifests = jobs.kubernetes_manifests(schedule, env.inventory.file.read_text())
    return {name: yaml_text.dump_manifest(manifest) for name, manifest in manifests.items()}


def refuse_inline_secrets(env: Environment) -> None:
    """The inventory goes into a ConfigMap, which is no place for a secret: each must be a reference."""
    paths: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}.{index}")
        elif isinstance(node, Secret):  # a reference is not one until resolved
            paths.append(path)

    walk(env.inventory.data, "")
    if paths:
        raise InventoryError(f"the inventory holds secrets written inline ({', '.join(paths)}), and it would go "
                             "into a ConfigMap", where=str(env.inventory.file),
                             hint="write each as ${env:NAME} and put its value in the environment's Secret")


def show_files(format: str, files: dict[str, str], output: Output) -> None:
    if format == "kubernetes":
        output.document("".join(f"---\n{text}" for text in files.values()), end="")
        return
    for index, (name, text) in enumerate(files.items()):
        prefix = "\n" if index else ""
        output.document(f"{prefix}# --- {name}\n{text}" if len(files) > 1 else text, end="")


def write(directory: Path, files: dict[str, str], output: Output) -> list[str]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text)
    except OSError as error:
        raise OpsError(f"cannot write into {directory}: {error.strerror}",
                       hint="run it as a user who can write there (root, for /etc/systemd/system), or choose "
                            "another --out") from None
    paths = [str(directory / name) for name in files]
    output.info(f"wrote {len(paths)} file(s) into {directory}: {', '.join(files)}")
    return paths


def next_step(format: str, schedule: jobs.Schedule, directory: Path) -> str:
    if format == "systemd":
        timers = " ".join(f"{schedule.unit(job)}.timer" for job in schedule.jobs)
        return (f"then: systemctl daemon-reload && systemctl enable --now {timers}; the jobs run as "
                f"{schedule.user} with the secrets in {schedule.environment_file}")
    if format == "kubernetes":
        return (f"then: create the Secret {schedule.secret} in namespace {schedule.namespace} with the inventory's "
                f"${{env:…}} variables, and `kubectl apply -f {directory}`")
    return (f"then: crontab -u USER {directory / f'opsbook-{schedule.env}.crontab'} (it replaces USER's crontab); "
            f"the secrets are read from {schedule.environment_file}")


def describe(schedule: jobs.Schedule, job: jobs.Job) -> dict[str, Any]:
    return {"job": job.key, "task": job.task, "unit": schedule.unit(job), "title": job.title,
            "command": schedule.command(job), "day": job.day,
            "time": f"{job.minute // 60:02d}:{job.minute % 60:02d}", "jitter_minutes": job.jitter,
            "offset_minutes": schedule.offset(job), "timeout_minutes": job.timeout}


collection = Collection("schedule", show)
