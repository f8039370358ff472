"""The public status page: its inventory section, and a pure renderer (incidents + config + now → three files).

Only what the public audience of the incident notices reads reaches the page: an incident's title, impact,
state, its components' statuses and the message of each opened/update/resolved entry (with the cause and the
postmortem link once resolved, as the public resolved notice says). Never the incident's id, environment,
project or operators, nor its triage, notice deliveries or rollbacks; every text is redacted once more.
Incidents are named on the page by a digest of their id (a stable anchor and Atom id that says nothing).

The page's "updated" time is the newest public event, not the time of rendering, so publishing the same
state twice on one day writes the same bytes (the publish step then has nothing to do).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ops.clock import iso_z, parse_time
from ops.errors import InventoryError
from ops.incidents import COMPONENT_STATUSES
from ops.lazy_dataclasses import dataclass
from ops.render import STATE_LABELS, STATUS_LABELS, human_time, render_markup
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.incidents import Incident
    from ops.inventory import Environment
    from ops.maintenance import Window

DEFAULT_PREFIX = "status/"
DEFAULT_HISTORY_DAYS = 90
PUBLIC_KINDS = ("opened", "update", "resolved")
# (file name, content type), in the order they are written: the page last, once what it links to is there
FILES = (("index.json", "application/json"), ("feed.atom", "application/atom+xml"),
         ("index.html", "text/html; charset=utf-8"))
MAINTENANCE = "under_maintenance"  # a running maintenance window's components, unless an incident is worse
RANK = {status: rank for rank, status in enumerate((COMPONENT_STATUSES[0], MAINTENANCE, *COMPONENT_STATUSES[1:]))}
LABELS = {**STATUS_LABELS, MAINTENANCE: "Under maintenance"}
OVERALL_LABELS = {"operational": "All systems operational", MAINTENANCE: "Under maintenance",
                  "degraded_performance": "Degraded performance", "partial_outage": "Partial outage",
                  "major_outage": "Major outage"}


@dataclass(frozen=True)
class Component:
    name: str
    description: str
    group: str | None


@dataclass(frozen=True)
class StatusPageConfig:
    """The inventory's `status_page:` section: what the page shows and where it is published."""

    title: str
    components: tuple[Component, ...]
    description: str = ""
    public_base: str | None = None
    prefix: str = DEFAULT_PREFIX
    folder: Path | None = None
    history_days: int = DEFAULT_HISTORY_DAYS


def status_page_config(env: Environment) -> StatusPageConfig | None:
    """The environment's status page, or None when it has none."""
    raw = env.raw("status_page", None)
    if raw is None:
        return None
    where = env.inventory.location(f"envs.{env.name}.status_page")
    if raw.get("folder") and raw.get("prefix") is not None:
        raise InventoryError("status_page: set `prefix` (publish to the app bucket) or `folder`, not both",
                             where=where, hint="remove one of them")
    names = [item["name"] for item in raw["components"]]
    if len(set(names)) != len(names):
        raise InventoryError("status_page.components: a component is named twice", where=where,
                             hint="give each component its own name")
    if not raw.get("folder") and not env.has("storage"):
        raise InventoryError("status_page: publishing to the app bucket needs `storage`", where=where,
                             hint="add storage to the environment, or set status_page.folder")
    folder = raw.get("folder")
    path = Path(str(folder)).expanduser() if folder else None
    if path is not None and not path.is_absolute():
        path = env.inventory.file.parent / path
    prefix = str(raw.get("prefix", DEFAULT_PREFIX))
    return StatusPageConfig(
        title=str(raw["title"]), description=str(raw.get("description", "")),
        components=tuple(Component(str(c["name"]), str(c.get("description", "")), c.get("group"))
                         for c in raw["components"]),
        public_base=raw.get("public_base"), prefix=prefix if not prefix or prefix.endswith("/") else f"{prefix}/",
        folder=path, history_days=int(raw.get("history_days", DEFAULT_HISTORY_DAYS)))


# --- the public view of the incidents --------------------------------------------------------------------------


def public_id(incident: Incident) -> str:
    """A stable name for the incident on the page that reveals nothing of its id."""
    return "incident-" + hashlib.sha256(incident.id.encode()).hexdigest()[:12]


def _worst(statuses: list[str]) -> str:
    return max(statuses, key=lambda status: RANK.get(status, 0), default="operational")


def _components(components: dict[str, str] | None) -> list[dict[str, str]]:
    return [{"name": redact(name), "status": status, "status_label": LABELS[status]}
            for name, status in (components or {}).items()]


def public_updates(incident: Incident) -> list[dict[str, Any]]:
    """The incident's public updates, oldest first."""
    return [{"at": entry.at, "at_label": human_time(entry.at), "state": entry.state,
             "state_label": STATE_LABELS.get(entry.state or "", entry.state), "message": redact(entry.message or ""),
             "components": _components(entry.components)}
            for entry in incident.timeline if entry.kind in PUBLIC_KINDS]


def public_incident(incident: Incident) -> dict[str, Any]:
    updates = public_updates(incident)
    view = {"id": public_id(incident), "title": redact(incident.title), "impact": incident.impact,
            "state": incident.state, "state_label": STATE_LABELS[incident.state],
            "started_at": incident.opened_at, "started_label": human_time(incident.opened_at),
            "resolved_at": incident.resolved_at, "resolved_label": human_time(incident.resolved_at),
            "components": _components(incident.components), "updates": updates,
            "severity": _worst(list(_affected(incident).values())),
            "updated_at": updates[-1]["at"] if updates else incident.opened_at,
            # as the public resolved notice says them; while open, a cause is not yet for customers
            "cause": redact(incident.cause) if incident.cause and not incident.open else None,
            "postmortem": redact(incident.postmortem) if incident.postmortem and not incident.open else None}
    return view


def _affected(incident: Incident) -> dict[str, str]:
    """Each component the incident ever named, with the worst status it gave it."""
    worst: dict[str, str] = {}
    for entry in incident.timeline:
        if entry.kind in PUBLIC_KINDS:
            for name, status in (entry.components or {}).items():
                worst[name] = _worst([worst.get(name, "operational"), status])
    return worst


def _history(config: StatusPageConfig, incidents: list[Incident], today: datetime) -> dict[str, list[dict[str, Any]]]:
    """Per component, the worst status of each of the last `history_days` days (oldest first)."""
    days = [(today - timedelta(days=back)).date() for back in range(config.history_days - 1, -1, -1)]
    history = {c.name: {day: "operational" for day in days} for c in config.components}
    for incident in incidents:
        first = parse_time(incident.opened_at).date()
        last = parse_time(incident.resolved_at).date() if incident.resolved_at else today.date()
        for name, status in _affected(incident).items():
            for day in (d for d in days if first <= d <= last and name in history):
                history[name][day] = _worst([history[name][day], status])
    return {name: [{"date": day.isoformat(), "status": status, "status_label": LABELS[status]}
                   for day, status in per_day.items()] for name, per_day in history.items()}


def public_window(window: Window) -> dict[str, Any]:
    """A maintenance window as the page shows it: no id, environment or operator."""
    return {"id": "maintenance-" + hashlib.sha256(window.id.encode()).hexdigest()[:12], "title": redact(window.title),
            "state": window.state, "state_label": window.state.replace("_", " ").capitalize(),
            "start": window.start, "end": window.end, "start_label": human_time(window.start),
            "end_label": human_time(window.end), "components": [redact(name) for name in window.components],
            "message": redact(window.message),
            "updates": [{"at": entry["at"], "state": entry["state"], "message": redact(entry["message"])}
                        for entry in window.timeline]}


def page_model(config: StatusPageConfig, incidents: list[Incident], now: datetime,
               windows: list[Window] | tuple[Window, ...] = ()) -> dict[str, Any]:
    """Everything the three files show, built from public fields only."""
    since = now - timedelta(days=config.history_days)
    recent = [i for i in incidents if i.open or (i.resolved_at and parse_time(i.resolved_at) >= since)]
    open_incidents = sorted((i for i in recent if i.open), key=lambda i: i.opened_at, reverse=True)
    past = sorted((i for i in recent if not i.open), key=lambda i: i.resolved_at or "", reverse=True)
    current: dict[str, list[str]] = {}
    for incident in open_incidents:
        for name, status in incident.components.items():
            current.setdefault(name, []).append(status)
    running = [w for w in windows if w.state == "in_progress"]
    upcoming = sorted((w for w in windows if w.state == "scheduled" and parse_time(w.end) > now), key=lambda w: w.start)
    for window in running:
        for name in window.components:
            current.setdefault(name, []).append(MAINTENANCE)
    overall = _worst([status for statuses in current.values() for status in statuses])
    history = _history(config, recent, now)
    components = [{"name": c.name, "description": c.description, "group": c.group,
                   "status": (status := _worst(current.get(c.name, []))), "status_label": LABELS[status],
                   "history": history[c.name],
                   "history_summary": _summary(history[c.name], config.history_days)} for c in config.components]
    views = [public_incident(i) for i in (*open_incidents, *past)]
    recent_windows = [public_window(w) for w in windows if parse_time(w.end) >= since or w.active]
    updated = max([*(view["updated_at"] for view in views),
                   *(w["updates"][-1]["at"] for w in recent_windows if w["updates"])], default=None)
    return {"title": redact(config.title), "description": redact(config.description),
            "public_base": config.public_base, "status": overall, "status_label": OVERALL_LABELS[overall],
            "updated_at": updated, "updated_label": human_time(updated), "history_days": config.history_days,
            "components": components, "groups": _groups(components),
            "open_incidents": views[:len(open_incidents)], "past_incidents": views[len(open_incidents):],
            "maintenance": [public_window(w) for w in (*running, *upcoming)], "recent_maintenance": recent_windows,
            "feed_updated": updated or iso_z(now.replace(hour=0, minute=0, second=0, microsecond=0))}


def _summary(days: list[dict[str, Any]], count: int) -> str:
    bad = sum(1 for day in days if day["status"] != "operational")
    return (f"last {count} days: no incidents" if not bad else
            f"last {count} days: {count - bad} days operational, {bad} with an incident")


def _groups(components: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Components by group, in the order the inventory names them (ungrouped ones under no heading)."""
    groups: list[dict[str, Any]] = []
    for component in components:
        if not groups or groups[-1]["name"] != component["group"]:
            groups.append({"name": component["group"], "components": []})
        groups[-1]["components"].append(component)
    return groups


# --- the three files -------------------------------------------------------------------------------------------


def index_json(model: dict[str, Any]) -> dict[str, Any]:
    """index.json: the current state, for embedding elsewhere (its schema: ops/templates/status_page/)."""
    def incident(view: dict[str, Any]) -> dict[str, Any]:
        keep = ("id", "title", "impact", "state", "started_at", "resolved_at", "updated_at")
        return {**{k: view[k] for k in keep},
                "components": [{"name": c["name"], "status": c["status"]} for c in view["components"]],
                "updates": [{"at": u["at"], "state": u["state"], "message": u["message"]} for u in view["updates"]]}

    return {"schema_version": 1, "title": model["title"], "updated_at": model["updated_at"],
            "page": _link(model["public_base"], "index.html"),
            "status": {"indicator": model["status"], "description": model["status_label"]},
            "components": [{"name": c["name"], "description": c["description"], "group": c["group"],
                            "status": c["status"]} for c in model["components"]],
            "incidents": [incident(view) for view in model["open_incidents"]],
            "maintenance": [{k: w[k] for k in ("id", "title", "state", "start", "end", "components", "message")}
                            for w in model["maintenance"]],
            "recent_incidents": [incident(view) for view in model["past_incidents"]]}


def _link(public_base: str | None, name: str) -> str | None:
    return f"{public_base.rstrip('/')}/{name}" if public_base else None


def feed_entries(model: dict[str, Any]) -> list[dict[str, Any]]:
    """One Atom entry per public update, newest first."""
    entries = []
    for view in (*model["open_incidents"], *model["past_incidents"]):
        for number, update in enumerate(view["updates"], start=1):
            entries.append({"id": f"{view['id']}-{number}", "number": number, "anchor": view["id"], "at": update["at"],
                            "title": f"{update['state_label']}: {view['title']}", "message": update["message"],
                            "components": update["components"]})
    for window in model["recent_maintenance"]:
        for number, update in enumerate(window["updates"], start=1):
            entries.append({"id": f"{window['id']}-{number}", "number": number, "anchor": "maintenance",
                            "at": update["at"],
                            "title": f"Maintenance {update['state'].replace('_', ' ')}: {window['title']}",
                            "message": update["message"], "components": []})
    # Times are to the second: updates made within one keep their order by number.
    return sorted(entries, key=lambda entry: (entry["at"], entry["number"]), reverse=True)


def render_files(config: StatusPageConfig, incidents: list[Incident], now: datetime,
                 windows: list[Window] | tuple[Window, ...] = ()) -> dict[str, bytes]:
    """index.json, feed.atom and index.html for `incidents` and maintenance `windows` as they stand at `now`."""
    model = page_model(config, incidents, now, windows)
    host = urlsplit(config.public_base).hostname if config.public_base else None
    context = {"page": model, "entries": feed_entries(model), "feed_id": _feed_id(config, host),
               "page_url": _link(config.public_base, "index.html"),
               "feed_url": _link(config.public_base, "feed.atom")}
    return {"index.json": (json.dumps(index_json(model), indent=2) + "\n").encode(),
            "feed.atom": render_markup("status_page/feed.atom.j2", context).encode(),
            "index.html": render_markup("status_page/index.html.j2", context).encode()}


def _feed_id(config: StatusPageConfig, host: str | None) -> str:
    digest = hashlib.sha256(config.title.encode()).hexdigest()[:12]
    return f"tag:{host},2026:status" if host else f"urn:opsbook:status:{digest}"
