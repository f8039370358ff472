"""`status --html` from fixtures: the facts status prints, backups over 90 days, the retention plan, the key's
age against its due date and the last drills, every value escaped and nothing fetched."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from ops.clock import iso_z
from ops.retention import BackupInfo, RetentionPolicy, plan_retention
from ops.status_html import render_dashboard

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def backups(count: int) -> list[dict]:
    """`count` backups, one every three days back from yesterday, every other one verified; one too old to show."""
    made = []
    for n in range(count + 1):
        finished = NOW - timedelta(days=1 + 3 * n) if n < count else NOW - timedelta(days=120)
        made.append({"id": f"{finished:%Y%m%dT%H%M%SZ}-{n:04x}", "finished_at": iso_z(finished),
                     "size_bytes": 1000 * (n + 1), "seconds": 5.0 + n,
                     "verified_at": iso_z(finished) if n % 2 == 0 else None})
    return made


def history(count: int) -> dict:
    made = backups(count)
    infos = [BackupInfo(b["id"], datetime.fromisoformat(b["finished_at"].replace("Z", "+00:00")), b["size_bytes"])
             for b in made]
    plan = plan_retention(infos, RetentionPolicy(), NOW)
    return {"backups": made, "retention": {"policy": RetentionPolicy().describe(), **plan.to_json()}}


STATUS = {"env": "prod", "ok": True, "notes": {"migrations": "no migrations <here>"}, "errors": {},
          "database": {"size_bytes": 2 ** 20, "connections_total": 3, "max_connections": 100, "deadlocks": 0},
          "last_backup": {"id": "b1", "age_seconds": 7200, "size_bytes": 1000, "newest_verified": {"id": "b1"}},
          "keys": {"key_id": "AKIA****WXYZ", "age_days": 100.0, "max_age_days": 90, "due_at": "2026-11-21T00:00:00Z",
                   "overdue": True},
          "incidents": {"open": 1, "incidents": []}}


def drills(count: int) -> list[dict]:
    return [{"id": f"d{n}", "started_at": iso_z(NOW - timedelta(days=10 * n)), "target_env": "staging",
             "passed": n != 1, "rto_seconds": 60.0 * (n + 1), "rpo_seconds": 3600.0,
             "targets": {"rto_minutes": 10, "rpo_hours": 24}} for n in range(count)]


def marks(html: str, chart_id: str) -> list[str]:
    chart = re.search(rf'<figure class="chart" id="{chart_id}".*?</figure>', html, re.DOTALL).group(0)
    return re.findall(r'<(?:circle|rect) class="(?:bar )?point ([^"]*)"', chart)


def test_the_dashboard_draws_thirty_backups_the_plan_the_key_and_the_drills():
    html = render_dashboard(STATUS, history(30), drills(4), NOW)
    assert "<script" not in html and " src=" not in html and "url(" not in html
    size = marks(html, "backup-size-chart")
    assert len(size) == 30 and size.count("verified") == 15 and size.count("unverified") == 15  # not the old one
    assert len(marks(html, "backup-duration-chart")) == 30
    assert 'data-count="30"' in html and "(30, 15 verified)" in html
    assert ">Sep 02<" in html and ">Dec 01<" in html  # the time axis spans the 90 days
    decisions = re.findall(r'data-decision="(\w+)"', html)
    assert len(decisions) == 31 and decisions.count("keep") >= 7 and "delete" in decisions
    assert "keep_last 1/7; daily " in html  # why the newest is kept
    assert "<title>rotate by: 90 days</title>" in html and "AKIA****WXYZ: 100 days" in html
    assert "rotation due 2026-11-21 00:00 UTC (OVERDUE)" in html
    assert marks(html, "drill-rto-chart") == ["passed", "passed", "failed", "passed"]  # oldest first
    assert "<title>RTO target: 10m</title>" in html
    assert "no migrations &lt;here&gt;" in html  # escaped


def test_without_backups_or_drills_the_dashboard_says_so():
    html = render_dashboard({**STATUS, "keys": None}, None, [], NOW, history_error="the backups could not be read: x")
    assert "No backup in the last 90 days." in html and "the backups could not be read: x" in html
    assert 'id="retention"' not in html and "No drill on record: <code>inv drill --env prod</code>" in html
    assert "The key's age is not known" in html and "<figure" not in html
