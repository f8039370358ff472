"""inv backup.check: the watchdog of the backups, from the backup bucket alone (no database needed).

Exit 3, each reason on one line with what to do, when the newest complete backup is older than
the limit (--max-age-hours, else backups.retention.max_age_hours, else twice schedule_hours), when no
backup passed a verification within backups.verify_max_age_days (default 8), or when the newest
backup is of another environment or database than the inventory names; 0 otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from invoke import task

from ops.backup_check import Verdict, families, judge, limits_for, read_facts, to_json
from ops.cli import OpsTask, TaskCall
from ops.clock import utc_now
from ops.errors import CheckFailed, OpsError, UsageError
from ops.metrics import write_textfile
from ops.storage import open_storage

if TYPE_CHECKING:
    from ops.output import Output

HELP = {
    "max_age_hours": "the newest backup may be this old (default: backups.retention.max_age_hours)",
    "prometheus": "also write the result to this Prometheus textfile (node_exporter), atomically",
}


def hours_flag(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        hours = float(value)
    except ValueError:
        hours = -1.0
    if not hours > 0:
        raise UsageError(f"--max-age-hours takes a positive number of hours, not {value!r}",
                         hint="e.g. --max-age-hours 26")
    return hours


@task(klass=OpsTask, name="check", help=HELP, multi_env=True)
def check(call: TaskCall, env=None, max_age_hours=None, json=False, prometheus=None):
    """Exit 3 unless there is a fresh, recently verified backup of this environment's database."""
    limit = hours_flag(max_age_hours)
    storage = open_storage(call.environment.storage_config("backups"))
    limits = limits_for(call.environment, limit)
    now = utc_now()
    metrics = Path(prometheus).expanduser() if prometheus else None
    try:
        facts = read_facts(storage)
    except OpsError:
        if metrics:  # the watchdog's own failure shows on the dashboard too
            write_textfile(metrics, families(call.environment.name, None, None, now),
                           replace={"env": call.environment.name})
        raise
    verdict = judge(facts, limits, now)
    show(call.output, call.environment.name, storage.describe(), verdict)
    if metrics:
        write_textfile(metrics, families(call.environment.name, facts, verdict, now),
                       replace={"env": call.environment.name})
        call.output.info(f"wrote {metrics}")
    call.output.result(to_json(call.environment, storage, facts, limits, verdict, now))
    if verdict.problems:
        raise CheckFailed(f"backup.check of {call.environment.name}: "
                          + "; ".join(f"{p.check}: {p.text}" for p in verdict.problems),
                          hint="each FAIL line above says what to do")


def show(output: Output, env: str, where: str, verdict: Verdict) -> None:
    output.info(f"backup.check of {env} ({where}):")
    for finding in verdict.findings:
        detail = f"{finding.text}: {finding.hint}" if not finding.ok and finding.hint else finding.text
        output.check("pass" if finding.ok else "fail", finding.check, detail)
