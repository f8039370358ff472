"""The jobs an environment runs unattended, as systemd units, Kubernetes CronJobs and crontab lines.

Pure: the merged `schedule:` section and the paths the task found go in; unit texts, manifests (data, for
ops/yaml_text.py to write) and crontab text come out. Each job runs the `opsbook` console tool on the
environment's inventory, the command line an operator would type; secrets reach it only through the
scheduler's own mechanism (an EnvironmentFile, a Secret in envFrom), never through what is rendered here.
"""

from __future__ import annotations

import hashlib
import shlex
from typing import Any

from ops.errors import UsageError
from ops.inventory_schema import SCHEDULE_JOBS, WEEKDAYS
from ops.lazy_dataclasses import dataclass

FORMATS = ("systemd", "kubernetes", "cron")

# A job's commands: (task, its arguments, what it does). Only tasks that need no --confirm on a protected
# environment belong here (runbooks/schedule.py checks the runbooks among them before it renders).
COMMANDS: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {
    "backup": (("backup", (), "back up the database"),),
    "pitr_base": (("pitr.base", (), "take a base backup for point-in-time recovery"),),
    "verify": (("backup.verify", ("--latest", "--deep"), "verify the newest backup by restoring it"),),
    "assets": (("backup.assets", (), "copy the app bucket to cold storage"),),
    "checks": (("drill.due", (), "check that this quarter's DR drill is done"),
               ("keys.status", (), "check the storage keys' age"),
               ("backup.check", (), "check that the newest backup is fresh and verified")),
}

INVENTORY_MOUNT = "/etc/opsbook"  # where a CronJob's pod sees the ConfigMap (read-only)
STATE_MOUNT = "/var/lib/opsbook"  # the pod's state dir (journals, locks): an emptyDir, as the mount is read-only
STARTING_DEADLINE_SECONDS = 6 * 3600  # a run missed while the cluster was down still starts, for 6 hours
SUCCESSFUL_JOBS_KEPT, FAILED_JOBS_KEPT = 3, 5
MAX_CRONJOB_NAME = 52  # Kubernetes appends 11 characters to name each Job


@dataclass(frozen=True)
class Job:
    """One scheduled command: a .service/.timer pair, a CronJob, a crontab line."""

    key: str  # its settings: schedule.jobs.KEY
    task: str
    arguments: tuple[str, ...]
    title: str
    day: str  # "daily" or a weekday (mon … sun)
    minute: int  # minutes after midnight, UTC
    jitter: int  # minutes
    timeout: int  # minutes

    @property
    def when(self) -> str:
        days = "daily" if self.day == "daily" else f"every {self.day.capitalize()}"
        return f"{days} at {self.minute // 60:02d}:{self.minute % 60:02d} UTC"


@dataclass(frozen=True)
class Schedule:
    """Everything the scheduled jobs of one environment are rendered from."""

    env: str
    project: str
    opsbook: str  # the console tool's absolute path (systemd, cron); in a pod it is `opsbook` on the PATH
    inventory: str
    environment_file: str
    user: str
    image: str | None
    namespace: str
    secret: str
    config_map: str
    mailto: str | None
    jobs: tuple[Job, ...]
    skipped: tuple[tuple[str, str], ...]  # (job, why it is not scheduled)

    def unit(self, job: Job) -> str:
        return f"opsbook-{self.env.replace('_', '-')}-{job.task.replace('.', '-')}"

    def command(self, job: Job, *, opsbook: str | None = None, inventory: str | None = None) -> list[str]:
        """The exact command line the job runs."""
        return [opsbook or self.opsbook, "--inventory", inventory or self.inventory, job.task, "--env", self.env,
                *job.arguments]

    def offset(self, job: Job) -> int:
        """A minute in [0, jitter], the same on every render: environments and jobs start spread out."""
        digest = hashlib.sha256(f"{self.project}/{self.env}/{job.task}".encode()).digest()
        return int.from_bytes(digest[:4], "big") % (job.jitter + 1)


def plan(env: str, project: str, section: dict[str, Any], *, opsbook: str, inventory: str,
         app_bucket: bool, pitr: bool = False) -> Schedule:
    """The environment's schedule from its merged `schedule:` section (defaults in ops/inventory_schema.py)."""
    systemd, kubernetes, cron = (section.get(name) or {} for name in FORMATS)
    jobs: list[Job] = []
    skipped: list[tuple[str, str]] = []
    for key, defaults in SCHEDULE_JOBS.items():
        settings = {**defaults, **((section.get("jobs") or {}).get(key) or {})}
        if key == "pitr_base" and not pitr:
            continue  # PITR is off: no such job, nothing skipped
        if not settings["enabled"]:
            skipped.append((key, f"schedule.jobs.{key}.enabled is false"))
        elif key == "assets" and not app_bucket:
            skipped.append((key, "the environment has no app bucket (storage)"))
        else:
            jobs.extend(Job(key, task, arguments, title, settings["day"], minutes(settings["time"]),
                            settings["jitter_minutes"], settings["timeout_minutes"])
                        for task, arguments, title in COMMANDS[key])
    return Schedule(env=env, project=project, opsbook=section.get("opsbook") or opsbook,
                    inventory=section.get("inventory") or inventory,
                    environment_file=section.get("environment_file") or f"/etc/opsbook/{env}.env",
                    user=systemd.get("user") or "opsbook", image=kubernetes.get("image"),
                    namespace=kubernetes.get("namespace") or "opsbook",
                    secret=kubernetes.get("secret") or f"opsbook-{env.replace('_', '-')}",
                    config_map=kubernetes.get("config_map") or "opsbook-inventory",
                    mailto=cron.get("mailto"), jobs=tuple(jobs), skipped=tuple(skipped))


def minutes(time: str | int) -> int:
    """ "HH:MM" (or the minutes since midnight YAML 1.1 makes of an unquoted 02:00) as minutes since midnight."""
    if isinstance(time, int):
        return time
    hours, _, mins = time.partition(":")
    return int(hours) * 60 + int(mins)


def _shifted(schedule: Schedule, job: Job) -> tuple[int | None, int, int]:
    """(weekday index Monday=0, or None daily; hour; minute) once the job's fixed offset is added."""
    start = job.minute + schedule.offset(job)
    if job.day == "daily":
        return None, start // 60 % 24, start % 60
    weekday = (WEEKDAYS.index(job.day) + start // 1440) % 7
    return weekday, start % 1440 // 60, start % 60


# --- systemd ----------------------------------------------------------------------------------------


def systemd_units(schedule: Schedule) -> dict[str, str]:
    """{file name: text}: a oneshot .service and its .timer per job."""
    units: dict[str, str] = {}
    for job in schedule.jobs:
        name = schedule.unit(job)
        units[f"{name}.service"] = _service(schedule, job)
        units[f"{name}.timer"] = _timer(schedule, job, name)
    return units


def _header(schedule: Schedule, fmt: str) -> str:
    return (f"# from `opsbook schedule.show --env {schedule.env} --format {fmt}`: change the inventory's "
            "schedule, then regenerate\n")


def _service(schedule: Schedule, job: Job) -> str:
    command = " ".join(_systemd_word(word) for word in schedule.command(job))
    return _header(schedule, "systemd") + "\n".join([
        "[Unit]",
        f"Description=opsbook {schedule.project} {schedule.env}: {job.title}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=oneshot",
        f"User={schedule.user}",
        f"EnvironmentFile={_systemd_word(schedule.environment_file)}",  # the secrets, readable by root only
        f"ExecStart={command}",
        f"TimeoutStartSec={job.timeout}min",  # then SIGTERM: opsbook stops as interrupted (130), resumable
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "",
    ])


def _timer(schedule: Schedule, job: Job, name: str) -> str:
    day = "" if job.day == "daily" else f"{job.day.capitalize()} "
    return _header(schedule, "systemd") + "\n".join([
        "[Unit]",
        f"Description=opsbook {schedule.project} {schedule.env}: {job.title}, {job.when}",
        "",
        "[Timer]",
        f"OnCalendar={day}*-*-* {job.minute // 60:02d}:{job.minute % 60:02d}:00 UTC",
        f"RandomizedDelaySec={job.jitter}min",
        "FixedRandomDelay=true",  # the same delay every time on a machine: runs stay evenly apart
        "Persistent=true",  # a run missed while the machine was off starts at boot
        f"Unit={name}.service",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])


def _systemd_word(word: str) -> str:
    """One word of a unit's command line: % and $ are systemd's own specifiers, whitespace needs quotes."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if any(c.isspace() or c in "\"'\\;" for c in escaped):
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


# --- Kubernetes ---------------------------------------------------------------------------------------


def kubernetes_manifests(schedule: Schedule, inventory_text: str) -> dict[str, dict[str, Any]]:
    """{file name: manifest}: the inventory's ConfigMap, then one CronJob per job. Needs schedule.image."""
    if not schedule.image:
        raise UsageError(f"envs.{schedule.env}.schedule.kubernetes.image: required for --format kubernetes",
                         hint="set it to an image with opsbook installed (`pip install .` of this repository)")
    manifests = {f"{schedule.config_map}.yaml": config_map(schedule, inventory_text)}
    for job in schedule.jobs:
        name = schedule.unit(job)
        if len(name) > MAX_CRONJOB_NAME:
            raise UsageError(f"the CronJob name {name} is longer than Kubernetes allows ({MAX_CRONJOB_NAME})",
                             hint=f"use a shorter environment name than {schedule.env!r}")
        manifests[f"{name}.yaml"] = cron_job(schedule, job)
    return manifests


def _metadata(schedule: Schedule, name: str, component: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "opsbook", "app.kubernetes.io/instance": schedule.env.replace("_", "-"),
              "app.kubernetes.io/component": component}
    return {"name": name, "namespace": schedule.namespace, "labels": labels,
            "annotations": {"opsbook/project": schedule.project}}


def config_map(schedule: Schedule, inventory_text: str) -> dict[str, Any]:
    """The inventory as the pods read it: its ${env:…} references are filled from the Secret."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(schedule, schedule.config_map, "inventory"),
            "data": {"inventory.yaml": inventory_text}}


def cron_job(schedule: Schedule, job: Job) -> dict[str, Any]:
    name = schedule.unit(job)
    container = {
        "name": "opsbook", "image": schedule.image,
        "command": schedule.command(job, opsbook="opsbook", inventory=f"{INVENTORY_MOUNT}/inventory.yaml"),
        "envFrom": [{"secretRef": {"name": schedule.secret}}],
        "env": [{"name": "OPS_HOME", "value": STATE_MOUNT}],
        "volumeMounts": [{"name": "inventory", "mountPath": INVENTORY_MOUNT, "readOnly": True},
                         {"name": "state", "mountPath": STATE_MOUNT}],
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    pod = {"restartPolicy": "Never", "containers": [container],
           "volumes": [{"name": "inventory", "configMap": {"name": schedule.config_map}},
                       {"name": "state", "emptyDir": {}}]}
    return {
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": _metadata(schedule, name, job.task),
        "spec": {
            "schedule": _cron_fields(schedule, job), "timeZone": "UTC",
            "concurrencyPolicy": "Forbid", "startingDeadlineSeconds": STARTING_DEADLINE_SECONDS,
            "successfulJobsHistoryLimit": SUCCESSFUL_JOBS_KEPT, "failedJobsHistoryLimit": FAILED_JOBS_KEPT,
            "jobTemplate": {"spec": {
                "backoffLimit": 0,  # a failed run is reported, not retried behind the operator's back
                "activeDeadlineSeconds": job.timeout * 60,
                "template": {"metadata": {"labels": _metadata(schedule, name, job.task)["labels"]}, "spec": pod}}},
        },
    }


# --- cron -----------------------------------------------------------------------------------------------


def _cron_fields(schedule: Schedule, job: Job) -> str:
    weekday, hour, minute = _shifted(schedule, job)
    return f"{minute} {hour} * * {'*' if weekday is None else (weekday + 1) % 7}"  # cron: Sunday is 0


def crontab(schedule: Schedule) -> str:
    """A user crontab (`crontab -u USER FILE`): one line per job; opsbook's own locks keep runs apart."""
    lines = [_header(schedule, "cron").rstrip(),
             "# times are UTC: cronie honours CRON_TZ; with another cron, run it in UTC",
             "CRON_TZ=UTC"]
    if schedule.mailto is not None:
        lines.append(f"MAILTO={schedule.mailto}")
    for job in schedule.jobs:
        secrets = f"set -a && . {shlex.quote(schedule.environment_file)} && set +a"  # KEY=value lines
        command = shlex.join(["timeout", f"{job.timeout}m", *schedule.command(job)])
        lines += [f"# {job.title}: {job.when}, +{schedule.offset(job)} min",
                  f"{_cron_fields(schedule, job)} {secrets} && {command}".replace("%", "\\%")]
    return "\n".join(lines) + "\n"
