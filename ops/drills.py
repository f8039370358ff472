"""DR drill records: the evidence a drill leaves, where it is kept, and whether this quarter's is done.

A drill's evidence is three files, `report.md` (from ops/templates/drill_report.md.j2),
`report.html` (ops/templates/reports/drill.html.j2: the same facts, and charts of every drill
of the source so far) and `report.json`, kept under `<state>/drills/<id>/` and uploaded to
the SOURCE environment's backups storage at `drills/<id>/`. report.json:

    {id, source_env, target_env, operator, started_at, finished_at (ISO UTC "…Z"), backup_id,
     passed, rto_seconds, rpo_seconds, rto_until, targets: {rto_minutes, rpo_hours},
     restored_bytes, restored_rows (the dump's size before compression and its rows; null when
     the restore did not pass), steps: [{name, passed, seconds, detail, status}], failures: [...], pitr}

A drill through point-in-time recovery (ops/drill_pitr.py) has the base backup's id as backup_id,
targets {rto_minutes, rpo_seconds}, and pitr: {to_time, newest_commit, stopped_before}; rpo_seconds
is then to_time − newest_commit. A dump drill's pitr is null.

A step is passed, failed, skipped (a check it needs did not pass) or not applicable (the
target has nothing it could check, e.g. no app hosts to restart); the drill passes when
every step passed or was not applicable.

The bucket is the record other machines see; the local folder is the fallback when the
bucket cannot be read (and the copy kept when an upload failed).
"""

from __future__ import annotations

import json
from dataclasses import field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.clock import iso_z, parse_time
from ops.errors import OpsError
from ops.lazy_dataclasses import dataclass
from ops.output import human_size
from ops.render import render_markup, template_environment
from ops.storage import open_storage
from ops.svg_chart import BYTES, SECONDS, Axes, Point, bar_chart, line_chart

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.storage import Storage

DRILLS_DIR = "drills/"
REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
TEMPLATE = "drill_report.md.j2"
HTML_TEMPLATE = "reports/drill.html.j2"
PASSED, FAILED, SKIPPED, NOT_APPLICABLE = "passed", "failed", "skipped", "not applicable"
RTO_UNTIL_READY = "staging ready"


# --- one drill's report -------------------------------------------------------------------------


class NotApplicable(Exception):
    """Raised by a check the target has nothing for (no hosts to restart): reported, never a failure."""


@dataclass
class StepResult:
    """One check of the drill: passed, failed, skipped (an earlier check it needs failed) or not applicable."""

    name: str
    status: str
    seconds: float
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "seconds": round(self.seconds, 3),
                "detail": self.detail, "status": self.status}


@dataclass
class DrillReport:
    """One restore drill: what was restored where, how long it took, what was checked."""

    id: str
    source_env: str
    target_env: str
    operator: str
    started_at: str
    finished_at: str
    backup_id: str | None
    rto_seconds: float | None
    rpo_seconds: float | None
    targets: dict[str, float | None]
    steps: list[StepResult] = field(default_factory=list)
    rto_until: str = RTO_UNTIL_READY  # what the RTO is measured up to
    restored_bytes: int | None = None  # the dump restored, before compression
    restored_rows: int | None = None
    pitr: dict[str, Any] | None = None  # a drill through point-in-time recovery: what it recovered to

    @property
    def failures(self) -> list[str]:
        return [f"{step.name}: {step.detail}" for step in self.steps if step.status == FAILED]

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(step.status in (PASSED, NOT_APPLICABLE) for step in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source_env": self.source_env, "target_env": self.target_env,
                "operator": self.operator, "started_at": self.started_at, "finished_at": self.finished_at,
                "backup_id": self.backup_id, "passed": self.passed,
                "rto_seconds": _rounded(self.rto_seconds), "rpo_seconds": _rounded(self.rpo_seconds),
                "rto_until": self.rto_until, "restored_bytes": self.restored_bytes,
                "restored_rows": self.restored_rows,
                "targets": dict(self.targets), "steps": [step.to_json() for step in self.steps],
                "failures": self.failures, "pitr": self.pitr}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def duration_text(seconds: float | None) -> str:
    """45s, 12m 5s, 3h 20m, 2d 4h: how the report and the history show RTO and RPO."""
    if seconds is None:
        return "not measured"
    whole = round(seconds)
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if whole >= size:
            rest = (whole % size) // small_size
            return f"{whole // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{whole}s"


def render_markdown(report: dict[str, Any]) -> str:
    """The human evidence, from ops/templates/drill_report.md.j2 (StrictUndefined: a missing field is a bug)."""
    jinja = template_environment(trim_blocks=False, filters={"duration": duration_text})
    statuses = {step["name"]: step["status"] for step in report["steps"]}
    objectives = {name: statuses.get(name, "not checked") for name in ("rto", "rpo")}
    return jinja.get_template(TEMPLATE).render(
        report={"rto_until": RTO_UNTIL_READY, **report, "objectives": objectives})


def save_report(state_dir: Path, report: dict[str, Any], markdown: str, html: str) -> Path:
    """`<state>/drills/<id>/report.json|md|html`; returns the folder."""
    folder = state_dir / "drills" / report["id"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (folder / REPORT_MARKDOWN).write_text(markdown)
    (folder / REPORT_HTML).write_text(html)
    return folder


def upload_report(storage: Storage, report: dict[str, Any], markdown: str, html: str) -> list[str]:
    """Markdown and HTML first, JSON last: a listing only shows drills whose report.json (the record) is complete."""
    prefix = f"{DRILLS_DIR}{report['id']}/"
    storage.put_bytes(prefix + REPORT_MARKDOWN, markdown.encode(), content_type="text/markdown; charset=utf-8")
    storage.put_bytes(prefix + REPORT_HTML, html.encode(), content_type="text/html; charset=utf-8")
    storage.put_bytes(prefix + REPORT_JSON, (json.dumps(report, indent=2) + "\n").encode(),
                      content_type="application/json")
    return [prefix + REPORT_MARKDOWN, prefix + REPORT_HTML, prefix + REPORT_JSON]


# --- the HTML report ------------------------------------------------------------------------------


def render_html(report: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """The report as a page, with charts of RTO, RPO and restored size over `history` (the source's past
    drills, any order; this one is added when missing), oldest first."""
    drills = sorted([d for d in history if d.get("id") != report["id"]] + [report],
                    key=lambda d: (d.get("started_at") or "", d.get("id") or ""))
    targets = report.get("targets") or {}
    rto_target = targets.get("rto_minutes")
    # A dump drill's RPO target is in hours, a point-in-time drill's in seconds (targets.rpo_seconds).
    rpo_hours, rpo_seconds = targets.get("rpo_hours"), targets.get("rpo_seconds")
    rpo_target = rpo_seconds if rpo_seconds is not None else rpo_hours * 3600 if rpo_hours is not None else None
    rpo_label = "RPO (target time − newest commit recovered)" if report.get("pitr") else "RPO (age of the backup used)"
    statuses = {step["name"]: step["status"] for step in report["steps"]}
    objectives = [
        {"name": "rto", "label": f"RTO (drill start → {report.get('rto_until', RTO_UNTIL_READY)})",
         "measured": duration_text(report.get("rto_seconds")),
         "target": f"{rto_target:g} min" if rto_target is not None else "none set",
         "status": statuses.get("rto", "not checked")},
        {"name": "rpo", "label": rpo_label, "measured": duration_text(report.get("rpo_seconds")),
         "target": duration_text(rpo_target) if rpo_target is not None else "none set",
         "status": statuses.get("rpo", "not checked")}]
    durations = Axes(duration_text, SECONDS)
    charts = {
        "rto": line_chart("rto-chart", "RTO of every drill", _points(drills, "rto_seconds"), durations,
                          target=rto_target * 60 if rto_target is not None else None, target_label="RTO target"),
        "rpo": line_chart("rpo-chart", "RPO of every drill", _points(drills, "rpo_seconds"), durations,
                          target=rpo_target, target_label="RPO target"),
        "size": bar_chart("size-chart", "Restored size of every drill (the dump, before compression)",
                          _points(drills, "restored_bytes"), Axes(human_size, BYTES))}
    restored = report.get("restored_bytes")
    size = f"{human_size(restored)} restored, {report.get('restored_rows')} rows" if restored is not None else ""
    return render_markup(HTML_TEMPLATE, {"report": {**report, "restored_size": size}, "objectives": objectives,
                                         "charts": charts, "history_count": len(drills)})


def _points(drills: list[dict[str, Any]], field_name: str) -> list[Point]:
    def label(drill: dict[str, Any]) -> str:
        started = drill.get("started_at") or ""
        return started[5:16].replace("T", " ") or str(drill.get("id"))

    return [Point(label(d), d.get(field_name), kind="passed" if d.get("passed") else "failed",
                  note=f"drill {d.get('id')} {'passed' if d.get('passed') else 'failed'}") for d in drills]


# --- history ------------------------------------------------------------------------------------


def list_drills(env: Environment) -> list[dict[str, Any]]:
    """The drills whose source is `env`, newest first: from its backups storage, else the local folder."""
    try:
        drills = _drills_in_storage(env)
    except OpsError:
        drills = None
    if drills is None:
        drills = _drills_in_folder(env.inventory.state_dir / "drills")
    mine = [drill for drill in drills if drill.get("source_env") == env.name]
    return sorted(mine, key=lambda drill: (drill.get("started_at") or "", drill.get("id") or ""), reverse=True)


def _drills_in_storage(env: Environment) -> list[dict[str, Any]] | None:
    if not env.has("backups"):
        return None

    storage = open_storage(env.storage_config("backups"))
    drills = []
    for info in storage.list(DRILLS_DIR):
        if info.key.endswith("/" + REPORT_JSON):
            parsed = _parse(storage.get_bytes(info.key))
            if parsed is not None:
                drills.append(parsed)
    return drills


def _drills_in_folder(folder: Path) -> list[dict[str, Any]]:
    if not folder.exists():
        return []
    parsed = (_parse(path.read_bytes()) for path in folder.glob(f"*/{REPORT_JSON}"))
    return [drill for drill in parsed if drill is not None]


def _parse(data: bytes) -> dict[str, Any] | None:
    """A report.json, or None when it is not one (a stray or truncated file is not a drill)."""
    try:
        drill = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return drill if isinstance(drill, dict) and "id" in drill and "passed" in drill else None


# --- is this quarter's drill done? ---------------------------------------------------------------


def quarter_of(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    return f"{moment.year}-Q{(moment.month - 1) // 3 + 1}"


def quarter_bounds(moment: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the calendar quarter holding `moment`, in UTC."""
    moment = moment.astimezone(UTC)
    first_month = (moment.month - 1) // 3 * 3 + 1
    start = datetime(moment.year, first_month, 1, tzinfo=UTC)
    end = datetime(moment.year + 1, 1, 1, tzinfo=UTC) if first_month == 10 else datetime(
        moment.year, first_month + 3, 1, tzinfo=UTC)
    return start, end


@dataclass
class DrillDue:
    """Whether this quarter's drill is done, and by when the next one is due."""

    done_this_quarter: bool
    last: dict[str, Any] | None  # the newest drill, passed or not
    quarter: str  # "2026-Q4"
    due_by: datetime  # end of the quarter
    last_passed: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        def summary(drill: dict[str, Any] | None) -> dict[str, Any] | None:
            if drill is None:
                return None
            return {key: drill.get(key) for key in ("id", "target_env", "started_at", "passed", "rto_seconds",
                                                    "rpo_seconds", "backup_id")}

        return {"done_this_quarter": self.done_this_quarter, "quarter": self.quarter,
                "due_by": iso_z(self.due_by), "last": summary(self.last), "last_passed": summary(self.last_passed)}


def due_from(drills: list[dict[str, Any]], now: datetime) -> DrillDue:
    """Pure: done when a drill that passed started in the quarter holding `now`."""
    start, end = quarter_bounds(now)
    passed = [drill for drill in drills if drill.get("passed") and drill.get("started_at")]
    passed_this_quarter = [drill for drill in passed if start <= parse_time(drill["started_at"]) < end]
    newest = sorted(drills, key=lambda drill: drill.get("started_at") or "", reverse=True)
    newest_passed = sorted(passed, key=lambda drill: drill["started_at"], reverse=True)
    return DrillDue(done_this_quarter=bool(passed_this_quarter), last=newest[0] if newest else None,
                    quarter=quarter_of(now), due_by=end, last_passed=newest_passed[0] if newest_passed else None)


def drill_due(env: Environment, now: datetime | None = None) -> DrillDue:
    return due_from(list_drills(env), now or datetime.now(UTC))
