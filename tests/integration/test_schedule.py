"""inv schedule.show through the real CLI: systemd units that systemd-analyze accepts, Kubernetes manifests
valid against the API's OpenAPI schemas (offline), crontab lines that parse; the scheduled command lines
run for real on a protected environment without anyone to confirm; the README's commands as written."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ops.inventory_schema import SCHEDULE
from runbooks.collection import ns
from tests.cli import REPOSITORY, Opsbook, task_arguments

ALL_UNITS = ["backup", "backup-verify", "backup-assets", "drill-due", "keys-status", "backup-check"]
KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())


@pytest.fixture
def example(opsbook: Opsbook) -> Opsbook:
    """The repository's own inventory: prod has a schedule section, staging the defaults."""
    shutil.copy(REPOSITORY / "inventory.yaml", opsbook.inventory)
    return opsbook


def edit(opsbook: Opsbook, env: str, schedule: dict[str, Any]) -> None:
    data = yaml.safe_load(opsbook.inventory.read_text())
    data["envs"][env]["schedule"] = schedule
    opsbook.write_inventory(data)


def listed(opsbook: Opsbook, env: str, fmt: str = "systemd") -> dict[str, Any]:
    result = opsbook.run("schedule.show", "--env", env, "--format", fmt, "--json")
    assert result.exit_code == 0, result
    return result.json()


def systemd_analyze_verify(directory: Path) -> subprocess.CompletedProcess[str]:
    units = sorted(str(path) for path in directory.iterdir())
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{directory}:"})


def ini(text: str) -> dict[str, list[str]]:
    """A unit's `Key=value` lines, by key (a key may repeat)."""
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def test_every_generated_systemd_unit_passes_systemd_analyze_verify(example: Opsbook, tmp_path: Path) -> None:
    for env in ("prod", "staging"):  # staging: no schedule section, every default
        out = tmp_path / env
        result = example.run("schedule.show", "--env", env, "--format", "systemd", "--out", str(out))
        assert result.exit_code == 0, result
        expected = {f"opsbook-{env}-{unit}.{kind}" for unit in ALL_UNITS for kind in ("service", "timer")}
        assert {path.name for path in out.iterdir()} == expected
        assert f"wrote 12 file(s) into {out}" in result.stderr and "systemctl enable --now" in result.stderr
        verified = systemd_analyze_verify(out)
        assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), verified

    jobs = {job["unit"]: job for job in listed(example, "prod")["jobs"]}
    service = ini((tmp_path / "prod" / "opsbook-prod-backup.service").read_text())
    assert service["Type"] == ["oneshot"] and service["User"] == ["opsbook"]
    assert service["EnvironmentFile"] == ["/etc/opsbook/prod.env"] and service["TimeoutStartSec"] == ["240min"]
    command = jobs["opsbook-prod-backup"]["command"]
    assert service["ExecStart"] == [shlex.join(command)]
    assert command[1:] == ["--inventory", str(example.inventory.resolve()), "backup", "--env", "prod"]
    assert os.access(command[0], os.X_OK) and Path(command[0]).name == "opsbook"
    timer = ini((tmp_path / "prod" / "opsbook-prod-backup.timer").read_text())
    assert timer["OnCalendar"] == ["*-*-* 02:00:00 UTC"] and timer["RandomizedDelaySec"] == ["30min"]
    assert timer["Persistent"] == ["true"] and timer["WantedBy"] == ["timers.target"]
    verify = ini((tmp_path / "prod" / "opsbook-prod-backup-verify.timer").read_text())
    assert verify["OnCalendar"] == ["Sun *-*-* 04:00:00 UTC"]
    assert jobs["opsbook-prod-backup-verify"]["command"][-5:] == ["backup.verify", "--env", "prod", "--latest",
                                                                  "--deep"]
    everything = "".join(path.read_text() for path in (tmp_path / "prod").iterdir())
    assert "${" not in everything, "the inventory's references (secrets) must not reach a unit"


def test_the_jobs_follow_the_schedule_section(example: Opsbook, tmp_path: Path) -> None:
    out = tmp_path / "units"
    data = yaml.safe_load(example.inventory.read_text())
    data["envs"]["staging"].pop("storage")  # no app bucket: no assets job
    data["envs"]["staging"]["backups"].update({"provider": "s3", "endpoint": "https://s3.example.com"})
    data["envs"]["staging"]["schedule"] = {
        "opsbook": shutil.which("true"), "systemd": {"user": "backup-runner"},
        "jobs": {"checks": {"enabled": False}, "verify": {"day": "wed", "time": "23:50", "jitter_minutes": 20},
                 "backup": {"time": 150, "timeout_minutes": 60}}}  # 150: what YAML 1.1 makes of 02:30 unquoted
    example.write_inventory(data)
    result = example.run("schedule.show", "--env", "staging", "--format", "systemd", "--out", str(out))
    assert result.exit_code == 0, result
    assert "not scheduled: assets (the environment has no app bucket (storage))" in result.stderr
    assert "not scheduled: checks (schedule.jobs.checks.enabled is false)" in result.stderr
    assert sorted(path.name for path in out.iterdir()) == [
        "opsbook-staging-backup-verify.service", "opsbook-staging-backup-verify.timer",
        "opsbook-staging-backup.service", "opsbook-staging-backup.timer"]
    assert systemd_analyze_verify(out).returncode == 0
    backup = ini((out / "opsbook-staging-backup.service").read_text())
    assert backup["User"] == ["backup-runner"] and backup["TimeoutStartSec"] == ["60min"]
    assert backup["ExecStart"][0].startswith(f"{shutil.which('true')} --inventory ")
    assert ini((out / "opsbook-staging-backup.timer").read_text())["OnCalendar"] == ["*-*-* 02:30:00 UTC"]
    timer = ini((out / "opsbook-staging-backup-verify.timer").read_text())
    assert timer["OnCalendar"] == ["Wed *-*-* 23:50:00 UTC"] and timer["RandomizedDelaySec"] == ["20min"]

    text, jobs = crontab(example, "staging")
    [verify] = [job for job in jobs if job["task"] == "backup.verify"]
    line = next(line for line in cron_lines(text) if " backup.verify " in line)
    minute, hour, _, _, weekday = line.split()[:5]
    start = 23 * 60 + 50 + verify["offset_minutes"]  # past midnight, the weekly run moves to Thursday
    assert 0 <= verify["offset_minutes"] <= 20
    assert (int(hour), int(minute), weekday) == (start // 60 % 24, start % 60, "3" if start < 1440 else "4")

    bad = example.run("schedule.show", "--env", "staging", "--format", "launchd")
    assert bad.exit_code == 2 and "--format 'launchd': choose systemd, kubernetes or cron" in bad.stderr, bad


def test_every_kubernetes_manifest_validates_against_the_api_schemas(example: Opsbook) -> None:
    result = example.run("schedule.show", "--env", "prod", "--format", "kubernetes")
    assert result.exit_code == 0, result
    documents = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in documents] == ["ConfigMap"] + ["CronJob"] * len(ALL_UNITS)
    for document in documents:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)  # raises ValidationError
    config_map, *cron_jobs = documents
    assert config_map["metadata"]["name"] == "opsbook-inventory"
    assert config_map["data"]["inventory.yaml"] == example.inventory.read_text()
    jobs = {job["unit"]: job for job in listed(example, "prod")["jobs"]}
    for cron_job in cron_jobs:
        name = cron_job["metadata"]["name"]
        spec = cron_job["spec"]
        assert cron_job["metadata"]["namespace"] == "opsbook" and spec["timeZone"] == "UTC"
        assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
        assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
        job = spec["jobTemplate"]["spec"]
        assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] == jobs[name]["timeout_minutes"] * 60
        pod = job["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        [container] = pod["containers"]
        assert container["image"] == "ghcr.io/acme/opsbook:1"
        assert container["envFrom"] == [{"secretRef": {"name": "opsbook-prod"}}]
        assert container["command"] == ["opsbook", "--inventory", "/etc/opsbook/inventory.yaml",
                                        *jobs[name]["command"][3:]]
        assert {"name": "inventory", "configMap": {"name": "opsbook-inventory"}} in pod["volumes"]
        minute, hour = (int(field) for field in spec["schedule"].split()[:2])
        assert hour * 60 + minute == int(jobs[name]["time"][:2]) * 60 + jobs[name]["offset_minutes"]

    staging = example.run("schedule.show", "--env", "staging", "--format", "kubernetes")
    assert staging.exit_code == 2 and "envs.staging.schedule.kubernetes.image: required" in staging.stderr


def test_a_decommissioned_environment_has_nothing_to_schedule(example: Opsbook) -> None:
    data = yaml.safe_load(example.inventory.read_text())
    data["envs"]["staging"]["decommissioned"] = True
    example.write_inventory(data)
    result = example.run("schedule.show", "--env", "staging", "--format", "cron")
    assert result.exit_code == 2 and "staging is decommissioned: it has nothing to schedule" in result.stderr, result
    assert result.stdout == ""


def test_an_inventory_with_an_inline_secret_is_not_put_in_a_config_map(example: Opsbook) -> None:
    data = yaml.safe_load(example.inventory.read_text())
    data["envs"]["prod"]["notify"] = [{"kind": "smtp", "host": "mail.example", "port": 587, "from": "a@example",
                                       "to": ["b@example"], "username": "ops", "password": "hunter2-inline"}]
    example.write_inventory(data)
    result = example.run("schedule.show", "--env", "prod", "--format", "kubernetes")
    assert result.exit_code == 2, result
    assert "secrets written inline (envs.prod.notify.0.password)" in result.stderr
    assert "hunter2-inline" not in result.output and "Traceback" not in result.output


def crontab(opsbook: Opsbook, env: str) -> tuple[str, list[dict[str, Any]]]:
    """The crontab as printed (--json carries the files it prints without --json) and the jobs."""
    listing = listed(opsbook, env, "cron")
    [text] = listing["files"].values()
    return text, listing["jobs"]


def cron_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.strip() and not line.startswith("#") and not re.match(r"^[A-Z_]+=", line)]


def test_the_crontab_parses_five_fields_and_a_command(example: Opsbook) -> None:
    printed = example.run("schedule.show", "--env", "prod", "--format", "cron")
    assert printed.exit_code == 0, printed
    text, jobs = crontab(example, "prod")
    assert printed.stdout == text, "the same crontab on every render: its jitter is fixed"
    assert "MAILTO=ops@acme.example" in text.splitlines() and "CRON_TZ=UTC" in text
    lines = cron_lines(text)
    assert len(lines) == len(jobs) == len(ALL_UNITS)
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    for line, job in zip(lines, jobs, strict=True):
        fields, command = line.split()[:5], line.split(None, 5)[5]
        for field, (low, high) in zip(fields, ranges, strict=True):
            assert field == "*" or low <= int(field) <= high, line
        assert int(fields[0]) + 60 * int(fields[1]) == int(job["time"][:2]) * 60 + job["offset_minutes"]
        assert 0 <= job["offset_minutes"] <= job["jitter_minutes"]
        assert command.startswith("set -a && . /etc/opsbook/prod.env && set +a && ")
        assert command.endswith(shlex.join(["timeout", f"{job['timeout_minutes']}m", *job["command"]]))
        assert "flock" not in command and "%" not in command
    assert "MAILTO" not in crontab(example, "staging")[0]


def test_the_scheduled_command_lines_run_on_a_protected_environment_without_confirmation(
        opsbook: Opsbook, staging: dict[str, Any], postgres_server: Any, s3_server: Any) -> None:
    postgres_server.create_brands_database(staging["database"])
    for bucket in (staging["bucket"], staging["backups"]):
        s3_server.client().create_bucket(Bucket=bucket)
    s3_server.client().put_object(Bucket=staging["bucket"], Key="images/a.jpg", Body=b"jpeg")
    opsbook.environ["PROD_DATABASE_URL"] = postgres_server.url(staging["database"]).reveal()
    data = yaml.safe_load(opsbook.inventory.read_text())
    data["envs"]["prod"]["database"]["url"] = "${env:PROD_DATABASE_URL}"
    opsbook.write_inventory(data)

    jobs = {job["task"]: job for job in listed(opsbook, "prod")["jobs"]}
    assert data["envs"]["prod"]["protected"] is True
    environ = {k: v for k, v in opsbook.process_environment().items() if k != "OPS_INVENTORY"}  # --inventory says
    for task in ("backup", "backup.verify", "backup.assets"):  # the runbooks among the jobs, in this order
        ran = subprocess.run(jobs[task]["command"], capture_output=True, text=True, timeout=180, env=environ,
                             cwd="/", stdin=subprocess.DEVNULL)  # no terminal, no --confirm: as a timer runs it
        assert ran.returncode == 0, (task, ran.stdout, ran.stderr)
        assert "confirm" not in ran.stderr, ran.stderr
        for secret in staging["secrets"]:
            assert secret not in ran.stdout + ran.stderr

    checks = [job["task"] for job in jobs.values() if job["job"] == "checks"]
    assert checks == ["drill.due", "keys.status", "backup.check"]
    assert all(task in ns.task_names for task in checks), checks
    for task in checks:  # they only read: none takes --confirm, so none can ask
        assert "confirm" not in {argument.name for argument in task_arguments(ns[task])}, task


SECTION = "## Run it every night"
COMMANDS = "<!-- schedule-commands:"


def readme_section() -> str:
    text = (REPOSITORY / "README.md").read_text()
    assert text.count(SECTION) == 1
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def test_the_readme_schedule_commands_run_as_written(example: Opsbook, tmp_path: Path) -> None:
    section = readme_section()
    assert section.count(COMMANDS) == 1
    lines = []
    for line in section.split(COMMANDS, 1)[1].split("-->", 1)[1].splitlines()[1:]:
        if not line.startswith("    "):
            break
        lines.append(shlex.split(line))
    assert ["inv", "schedule.show", "--env", "prod", "--format", "systemd", "--out", "/etc/systemd/system"] in lines
    assert {words[words.index("--format") + 1] for words in lines} == {"systemd", "kubernetes", "cron"}
    for words in lines:
        assert words[0] == "inv", words
        if "--out" in words:  # the one-line install: into a scratch directory here, not this machine's /etc
            words[words.index("--out") + 1] = str(tmp_path / "units")
        result = example.run(*words[1:])
        assert result.exit_code == 0, result
    assert systemd_analyze_verify(tmp_path / "units").returncode == 0

    block = ("    schedule:\n" + section.split("\n    schedule:\n", 1)[1]).split("\n\n", 1)[0]
    documented = yaml.safe_load("\n".join(line[4:] for line in block.splitlines()))  # the README's schedule keys
    edit(example, "prod", documented["schedule"])
    checked = example.run("inventory.check")
    assert checked.exit_code == 0, checked
    assert set(documented["schedule"]) == set(SCHEDULE["properties"]), "every schedule key is documented"
    assert listed(example, "prod", "kubernetes")["jobs"]
