"""`inv status --html FILE`: the operator's dashboard, built from facts by pure functions (the task writes it).

The same facts `status` prints, as pictures: backups over the last 90 days (size and duration, verified or
not), what retention keeps of them and why (ops/retention.py's plan), the storage key's age against its
rotation due date, and the last drills' RTO against the target. Self-contained like the drill report
(ops/templates/reports/): inline CSS and SVG, no scripts, light and dark, readable on a phone.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ops.clock import iso_z, parse_time
from ops.drills import duration_text
from ops.output import human_size
from ops.render import human_time, render_markup
from ops.svg_chart import BYTES, SECONDS, Axes, Point, bar_chart, line_chart

TEMPLATE = "reports/status.html.j2"
WINDOW = timedelta(days=90)
DRILLS_SHOWN = 12


def render_dashboard(status: dict[str, Any], history: dict[str, Any] | None, drills: list[dict[str, Any]],
                     now: datetime, *, history_error: str | None = None) -> str:
    """The page, from `status`'s JSON, backup_history's facts (None: no backups section or unreadable,
    `history_error` says why), the drills of the environment (newest first) and the time of collection."""
    backups = _in_window(history["backups"] if history else [], now)
    return render_markup(TEMPLATE, {
        "env": status["env"], "collected": human_time(iso_z(now)), "ok": status["ok"],
        "facts": facts_shown(status), "notes": status.get("notes") or {}, "errors": status.get("errors") or {},
        "backups": {"count": len(backups), "verified": sum(1 for b in backups if b["verified_at"]),
                    "error": history_error, "charts": _backup_charts(backups, now) if backups else None},
        "retention": _retention(history), "key": _key(status.get("keys")), "drills": _drills(drills)})


def facts_shown(status: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, text, CSS class) of each part `status` prints, in its order."""
    shown = []
    database = status.get("database")
    if database:
        shown.append(("database", f"{human_size(database['size_bytes'])}; {database['connections_total']} of "
                                  f"{database['max_connections']} connections; deadlocks {database['deadlocks']}",
                      ""))
    for section in ("storage", "backups"):
        usage = status.get(f"{section}_bucket")
        if usage:
            more = "" if usage["complete"] else "+"
            shown.append((f"{section} bucket", f"{usage['objects']}{more} objects, {human_size(usage['bytes'])}", ""))
    backup = status.get("last_backup")
    if backup:
        verified = (backup.get("newest_verified") or {}).get("id") == backup["id"]
        shown.append(("last backup", f"{backup['age_seconds'] / 3600:.1f} h ago, {human_size(backup['size_bytes'])}, "
                                     f"{'verified' if verified else 'not verified'}",
                      "verified" if verified else "unverified"))
    keys = status.get("keys")
    if keys:
        age = f"{keys['age_days']:.0f} days old" if keys.get("age_days") is not None else "age unknown"
        shown.append(("storage key", age + (" (OVERDUE)" if keys.get("overdue") else ""),
                      "overdue" if keys.get("overdue") else ""))
    migrations = status.get("migrations")
    if migrations:
        shown.append(("migrations", migrations["verdict"], "" if migrations["up_to_date"] else "unverified"))
    incidents = status.get("incidents")
    if incidents is not None:
        shown.append(("incidents", f"{incidents['open']} open", "failed" if incidents["open"] else ""))
    return shown


def _in_window(backups: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    start = now - WINDOW
    return sorted((b for b in backups if parse_time(b["finished_at"]) >= start), key=lambda b: b["finished_at"])


def _x_ticks(now: datetime) -> list[tuple[float, str]]:
    start = now - WINDOW
    return [(part / 3, (start + WINDOW * part / 3).strftime("%b %d")) for part in range(4)]


def _backup_charts(backups: list[dict[str, Any]], now: datetime) -> dict[str, str]:
    start = now - WINDOW

    def points(field: str) -> list[Point]:
        return [Point(b["finished_at"][:16].replace("T", " "), b[field],
                      x=(parse_time(b["finished_at"]) - start) / WINDOW,
                      kind="verified" if b["verified_at"] else "unverified",
                      note=f"backup {b['id']}, {human_size(b['size_bytes'])} in {duration_text(b['seconds'])}, "
                           + ("verified" if b["verified_at"] else "not verified")) for b in backups]

    ticks = _x_ticks(now)
    return {"size": bar_chart("backup-size-chart", "Size of each backup, last 90 days (green: verified)",
                              points("size_bytes"), Axes(human_size, BYTES, ticks)),
            "duration": line_chart("backup-duration-chart", "Duration of each backup, last 90 days",
                                   points("seconds"), Axes(duration_text, SECONDS, ticks))}


def _retention(history: dict[str, Any] | None) -> dict[str, Any] | None:
    if not history:
        return None
    plan = history["retention"]
    rows = [{"id": d["id"], "finished": human_time(d["finished_at"]), "size": human_size(d["size"]),
             "decision": d["decision"], "reasons": "; ".join(d["reasons"])} for d in plan["decisions"]]
    return {"policy": plan["policy"], "refused": plan["refused"], "rows": rows, "kept": len(plan["keep"]),
            "deleted": len(plan["delete"])}


def _key(keys: dict[str, Any] | None) -> dict[str, Any] | None:
    if not keys or keys.get("age_days") is None:
        return None

    def days(value: float) -> str:
        return f"{value:.0f} days" if value >= 10 or value == 0 else f"{value:.1f} days"

    chart = bar_chart("key-age-chart", "Storage key age against its rotation", [
        Point(str(keys.get("key_id")), float(keys["age_days"]), kind="overdue" if keys.get("overdue") else "ok",
              note=f"rotate every {keys['max_age_days']} days")],
        Axes(days), target=float(keys["max_age_days"]), target_label="rotate by")
    return {"chart": chart, "due": human_time(keys.get("due_at")), "overdue": keys.get("overdue"),
            "key_id": keys.get("key_id")}


def _drills(drills: list[dict[str, Any]]) -> dict[str, Any]:
    shown = list(reversed(drills[:DRILLS_SHOWN]))  # oldest first
    rows = [{"id": d.get("id"), "started": human_time(d.get("started_at")), "target": d.get("target_env"),
             "passed": bool(d.get("passed")), "rto": duration_text(d.get("rto_seconds")),
             "rpo": duration_text(d.get("rpo_seconds"))} for d in drills[:5]]
    if not shown:
        return {"rows": [], "chart": None, "count": 0}
    target = ((drills[0].get("targets") or {}).get("rto_minutes"))
    points = [Point((d.get("started_at") or "")[5:16].replace("T", " "), d.get("rto_seconds"),
                    kind="passed" if d.get("passed") else "failed",
                    note=f"drill {d.get('id')} {'passed' if d.get('passed') else 'failed'}") for d in shown]
    chart = line_chart("drill-rto-chart", f"RTO of the last {len(shown)} drills", points,
                       Axes(duration_text, SECONDS), target=target * 60 if target is not None else None,
                       target_label="RTO target")
    return {"rows": rows, "chart": chart, "count": len(shown)}
