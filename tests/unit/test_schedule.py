"""The schedule's pure parts: jobs from the section and its defaults, the fixed jitter, quoting per format."""

from __future__ import annotations

import shlex

from ops import schedule as jobs


def plan(section: dict | None = None, *, app_bucket: bool = True, env: str = "prod",
         pitr: bool = False) -> jobs.Schedule:
    return jobs.plan(env, "acme", section or {}, opsbook="/opt/opsbook tools/opsbook",
                     inventory="/etc/opsbook/inventory.yaml", app_bucket=app_bucket, pitr=pitr)


def test_defaults_schedule_every_job_and_assets_only_with_an_app_bucket():
    everything = plan()
    assert [job.task for job in everything.jobs] == ["backup", "backup.verify", "backup.assets", "drill.due",
                                                     "keys.status", "backup.check"]
    backup = everything.jobs[0]
    assert (backup.day, backup.minute, backup.jitter, backup.timeout) == ("daily", 120, 30, 240)
    assert everything.user == "opsbook" and everything.environment_file == "/etc/opsbook/prod.env"
    assert everything.secret == "opsbook-prod" and everything.image is None
    without = plan(app_bucket=False)
    assert "backup.assets" not in [job.task for job in without.jobs]
    assert without.skipped == (("assets", "the environment has no app bucket (storage)"),)


def test_with_pitr_on_a_nightly_base_backup_runs_before_the_dump():
    tasks = [(job.task, job.minute) for job in plan(pitr=True).jobs]
    assert tasks[:2] == [("backup", 120), ("pitr.base", 60)]
    assert "pitr.base" not in [job.task for job in plan(pitr=False).jobs]
    off = plan({"jobs": {"pitr_base": {"enabled": False}}}, pitr=True)
    assert ("pitr_base", "schedule.jobs.pitr_base.enabled is false") in off.skipped


def test_the_jitter_is_fixed_per_job_and_within_its_bound():
    section = {"jobs": {name: {"jitter_minutes": 7} for name in ("backup", "verify", "assets", "checks")}}
    first, again = plan(section), plan(section)
    offsets = [first.offset(job) for job in first.jobs]
    assert offsets == [again.offset(job) for job in again.jobs]
    assert all(0 <= offset <= 7 for offset in offsets)
    assert len(set(offsets)) > 1, "jobs of one environment should not all start in the same minute"
    unspread = plan({"jobs": {"backup": {"jitter_minutes": 0}}})
    assert unspread.offset(unspread.jobs[0]) == 0


def test_a_weekly_run_pushed_past_midnight_moves_to_the_next_day():
    section = {"jobs": {"verify": {"day": "sun", "time": "23:59", "jitter_minutes": 720}}}
    schedule = plan(section)
    verify = next(job for job in schedule.jobs if job.task == "backup.verify")
    offset = schedule.offset(verify)
    minute, hour, _, _, weekday = jobs._cron_fields(schedule, verify).split()
    start = 23 * 60 + 59 + offset
    assert (int(hour) * 60 + int(minute)) == start % 1440
    assert weekday == ("0" if start < 1440 else "1")  # Sunday, else Monday


def test_command_words_are_quoted_for_each_format():
    schedule = plan({"environment_file": "/etc/opsbook/100%.env"})
    backup = schedule.jobs[0]
    service = jobs.systemd_units(schedule)["opsbook-prod-backup.service"]
    assert 'ExecStart="/opt/opsbook tools/opsbook" --inventory /etc/opsbook/inventory.yaml backup --env prod' \
        in service.splitlines()
    assert "EnvironmentFile=/etc/opsbook/100%%.env" in service.splitlines()  # % is a systemd specifier
    [line] = [line for line in jobs.crontab(schedule).splitlines() if line.endswith("backup --env prod")]
    assert "/etc/opsbook/100\\%.env" in line  # % ends a cron command
    assert line.endswith(shlex.join(schedule.command(backup)))
    assert jobs.minutes(150) == jobs.minutes("02:30") == 150
