"""Drill records: quarters, whether this quarter's drill is done, durations, the Markdown report."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from ops.drill_pitr import achieved_rpo
from ops.drills import (
    FAILED,
    NOT_APPLICABLE,
    PASSED,
    SKIPPED,
    DrillReport,
    StepResult,
    due_from,
    duration_text,
    quarter_bounds,
    quarter_of,
    render_html,
    render_markdown,
)


@pytest.mark.parametrize(("moment", "quarter", "start", "end"), [
    (datetime(2026, 1, 1, tzinfo=UTC), "2026-Q1", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),
    (datetime(2026, 6, 30, 23, 59, tzinfo=UTC), "2026-Q2", datetime(2026, 4, 1, tzinfo=UTC),
     datetime(2026, 7, 1, tzinfo=UTC)),
    (datetime(2026, 11, 23, tzinfo=UTC), "2026-Q4", datetime(2026, 10, 1, tzinfo=UTC),
     datetime(2027, 1, 1, tzinfo=UTC)),
])
def test_quarters(moment, quarter, start, end):
    assert quarter_of(moment) == quarter
    assert quarter_bounds(moment) == (start, end)


def drill(started_at: str, passed: bool, drill_id: str = "d") -> dict:
    return {"id": drill_id, "started_at": started_at, "passed": passed, "target_env": "staging"}


@pytest.mark.parametrize(("drills", "done", "last"), [
    ([], False, None),
    ([drill("2026-11-01T10:00:00Z", False, "failed")], False, "failed"),
    ([drill("2026-09-30T23:59:59Z", True, "last-quarter")], False, "last-quarter"),
    ([drill("2026-10-01T00:00:00Z", True, "ok"), drill("2026-11-02T00:00:00Z", False, "newer")], True, "newer"),
])
def test_a_quarter_is_done_only_by_a_drill_that_passed_in_it(drills, done, last):
    status = due_from(drills, datetime(2026, 11, 23, 12, tzinfo=UTC))
    assert status.done_this_quarter is done
    assert (status.last or {}).get("id") == last
    assert status.quarter == "2026-Q4" and status.due_by == datetime(2027, 1, 1, tzinfo=UTC)
    assert status.to_json()["due_by"] == "2027-01-01T00:00:00Z"


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "not measured"), (0, "0s"), (59.6, "1m"), (65, "1m 5s"), (3600, "1h"), (7260, "2h 1m"),
    (90000, "1d 1h"),
])
def test_durations(seconds, text):
    assert duration_text(seconds) == text


def test_the_report_names_every_failure_and_its_objectives():
    report = DrillReport(
        id="20261123T040000Z-abcd", source_env="prod", target_env="staging", operator="ana",
        started_at="2026-11-23T04:00:00Z", finished_at="2026-11-23T04:05:00Z", backup_id="20261123T020000Z-0001",
        rto_seconds=None, rpo_seconds=7200.0, targets={"rto_minutes": 60, "rpo_hours": 24},
        steps=[StepResult("restore", PASSED, 12.5, "ok"), StepResult("staging", FAILED, 3.0, "web1 | exited 1"),
               StepResult("images", SKIPPED, 0.0, "not run"), StepResult("rto", FAILED, 0.0, "never ready"),
               StepResult("rpo", PASSED, 0.0, "2h")]).to_json()
    assert report["passed"] is False
    assert report["failures"] == ["staging: web1 | exited 1", "rto: never ready"]
    assert [s["passed"] for s in report["steps"]] == [True, False, False, False, True]
    text = render_markdown(report)
    assert text.startswith("# DR drill 20261123T040000Z-abcd: FAILED")
    assert "web1 \\| exited 1" in text  # a pipe in a detail does not break the table
    assert "| RTO (drill start → staging ready) | not measured | 60 min | failed |" in text
    assert "| RPO (age of the backup used) | 2h | 24 h | passed |" in text
    assert "- rto: never ready" in text


def test_a_step_that_is_not_applicable_does_not_fail_the_drill():
    report = DrillReport(
        id="20261123T040000Z-abcd", source_env="local", target_env="local-drill", operator="ana",
        started_at="2026-11-23T04:00:00Z", finished_at="2026-11-23T04:01:00Z", backup_id="20261123T020000Z-0001",
        rto_seconds=12.0, rpo_seconds=60.0, targets={"rto_minutes": None, "rpo_hours": None},
        rto_until="database restored and migrated; no app hosts",
        steps=[StepResult("restore", PASSED, 10.0, "ok"),
               StepResult("staging", NOT_APPLICABLE, 0.0, "not applicable: no hosts in local-drill"),
               StepResult("rto", PASSED, 0.0, "12s")]).to_json()
    assert report["passed"] is True and report["failures"] == []
    assert [s["status"] for s in report["steps"]] == ["passed", "not applicable", "passed"]
    text = render_markdown(report)
    assert "| 2 | staging | not applicable | 0.0 s | not applicable: no hosts in local-drill |" in text
    assert "| RTO (drill start → database restored and migrated; no app hosts) | 12s | none set | passed |" in text


def past_drill(day: int, rto: float | None, passed: bool = True) -> dict:
    return {"id": f"202611{day:02d}T040000Z-past", "source_env": "prod", "started_at": f"2026-11-{day:02d}T04:00:00Z",
            "passed": passed, "rto_seconds": rto, "rpo_seconds": 3600.0 * day, "restored_bytes": 1000 * day}


def test_the_html_report_holds_the_checks_the_objectives_and_a_chart_of_every_drill():
    report = DrillReport(
        id="20261123T040000Z-abcd", source_env="prod", target_env="staging", operator="ana <ops>",
        started_at="2026-11-23T04:00:00Z", finished_at="2026-11-23T04:05:00Z", backup_id="20261123T020000Z-0001",
        rto_seconds=300.0, rpo_seconds=7200.0, targets={"rto_minutes": 10, "rpo_hours": 24}, restored_bytes=2048,
        restored_rows=30, steps=[StepResult("restore", PASSED, 12.5, "swapped <in>"),
                                 StepResult("rto", PASSED, 0.0, "5m"), StepResult("rpo", PASSED, 0.0, "2h")]).to_json()
    history = [past_drill(20, 700.0, passed=False), past_drill(2, 240.0), past_drill(9, None, passed=False), report]
    html = render_html(report, history)
    assert "<script" not in html and "http" not in html.replace("http://www.w3.org", "")
    assert "swapped &lt;in&gt;" in html and "ana &lt;ops&gt;" in html  # every value escaped
    assert 'data-check="restore" data-status="passed"' in html and 'id="verdict" data-passed="true"' in html
    assert "2.0 KiB restored, 30 rows" in html
    rto_chart = html[html.index('id="rto-chart"'):html.index('id="rpo-chart"')]
    assert 'data-points="4"' in rto_chart  # this drill once, the three before it
    titles = re.findall(r'<circle class="point ([a-z ]+)" data-value="([^"]*)".*?<title>(.*?)</title>', rto_chart)
    assert [(kind, value) for kind, value, _ in titles] == [("passed", "240"), ("failed missing", ""),
                                                            ("failed", "700"), ("passed", "300")]
    assert titles[-1][2] == "11-23 04:00: 5m, drill 20261123T040000Z-abcd passed"
    assert "<title>RTO target: 10m</title>" in rto_chart
    assert "<title>RPO target: 1d</title>" in html
    size_chart = html[html.index('id="size-chart"'):]
    assert len(re.findall(r"<rect class=\"bar point", size_chart)) == 4 and "target" not in size_chart


def test_a_point_in_time_drill_reports_the_rpo_against_targets_rpo_seconds():
    report = DrillReport(
        id="20261123T040000Z-abcd", source_env="prod", target_env="staging", operator="ana",
        started_at="2026-11-23T04:00:00Z", finished_at="2026-11-23T04:02:00Z", backup_id="20261123T010000",
        rto_seconds=90.0, rpo_seconds=achieved_rpo(datetime(2026, 11, 23, 3, 59, tzinfo=UTC),
                                                   "2026-11-23T03:58:48.500000Z"),
        targets={"rto_minutes": None, "rpo_seconds": 300.0},
        pitr={"to_time": "2026-11-23T03:59:00.000000Z", "newest_commit": "2026-11-23T03:58:48.500000Z",
              "stopped_before": None},
        steps=[StepResult("restore", PASSED, 80.0, "ok"), StepResult("rpo", PASSED, 0.0, "12s")]).to_json()
    assert report["rpo_seconds"] == 11.5 and report["pitr"]["to_time"] == "2026-11-23T03:59:00.000000Z"
    text = render_markdown(report)
    assert "| RPO (target time − newest commit recovered) | 12s | 5m | passed |" in text
    assert "| recovered to | 2026-11-23T03:59:00.000000Z (newest commit recovered: 2026-11-23T03:58:48.500000Z) |" \
        in text
    assert "age of the backup used" not in text


def test_the_achieved_rpo_is_never_negative_and_unknown_without_a_replayed_commit():
    moment = datetime(2026, 11, 23, 3, 59, tzinfo=UTC)
    assert achieved_rpo(moment, "2026-11-23T03:59:00.000000Z") == 0.0
    assert achieved_rpo(moment, None) is None and achieved_rpo(None, "2026-11-23T03:59:00Z") is None
