"""Maintenance windows: the record, its states, its notices, and where it is kept.

States: scheduled → in_progress → completed; a scheduled or running window may be cancelled; completed and
cancelled are final (changing one again is refused, exit 3). Kept as `<state>/maintenance/<id>.json`,
copied to the backups bucket under `maintenance/` (a failed copy warns and never loses the local record).
While a window is in progress the status page shows its components "under maintenance".
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ops.clock import iso_z, parse_time, utc_now
from ops.errors import CheckFailed, OpsError, UsageError
from ops.incidents import new_incident_id, parse_duration
from ops.lazy_dataclasses import dataclass
from ops.notify import Notice
from ops.render import human_time, render_json, render_template
from ops.secrets import masked, redact
from ops.storage import ObjectNotFound, open_storage

if TYPE_CHECKING:
    from ops.inventory import Environment

STATES = ("scheduled", "in_progress", "completed", "cancelled")
FINAL = ("completed", "cancelled")
NEXT = {"in_progress": ("scheduled",), "completed": ("in_progress",), "cancelled": ("scheduled", "in_progress")}
STATE_LABELS = {"scheduled": "Scheduled", "in_progress": "In progress", "completed": "Completed",
                "cancelled": "Cancelled"}
BUCKET_DIR = "maintenance/"
FORMATS = {"status_page": "md", "webhook": "json", "email": "txt"}


@dataclass
class Window:
    """A maintenance window: what, when, which components, its state and its timeline."""

    id: str
    env: str
    title: str
    start: str
    end: str
    components: list[str]
    operator: str
    state: str = "scheduled"
    message: str = ""
    timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ("scheduled", "in_progress")

    def record(self) -> dict[str, Any]:
        return masked(asdict(self))


def parse_start(text: str | None) -> datetime:
    try:
        return parse_time((text or "").strip().replace(" ", "T"))
    except ValueError:
        raise UsageError(f"--start {text!r} is not a time", hint="use UTC, e.g. 2026-12-02T02:00Z") from None


def new_window(env: Environment, *, title: str, start: str | None, duration: str | None, components: str | None,
               message: str | None, operator: str, now: datetime | None = None) -> Window:
    now = now or utc_now()
    if not (title or "").strip():
        raise UsageError("--title is required: what the maintenance is, e.g. \"Database upgrade\"")
    names = [name.strip() for name in (components or "").split(",") if name.strip()]
    if not names:
        raise UsageError("--components is required: the parts it takes down, e.g. --components api,uploads")
    begins = parse_start(start) if start else now
    try:
        length = parse_duration(duration or "")
    except UsageError:
        raise UsageError(f"--duration {duration!r} is not a duration", hint="use e.g. 30m, 2h or 1h30m") from None
    window = Window(id=new_incident_id(now), env=env.name, title=redact(title.strip()), start=iso_z(begins),
                    end=iso_z(begins + length), components=names, operator=operator,
                    message=redact(message or "We will carry out planned maintenance."))
    window.timeline.append({"at": iso_z(now), "state": "scheduled", "message": window.message, "operator": operator})
    return window


def transition(window: Window, state: str, *, message: str | None, operator: str, now: datetime | None = None) -> None:
    if window.state not in NEXT[state]:
        raise CheckFailed(f"maintenance {window.id} is {window.state}: it cannot be {STATE_LABELS[state].lower()}",
                          hint="`inv maintenance.list` shows each window's state")
    now = now or utc_now()
    window.state = state
    window.message = redact(message) if message else {
        "in_progress": "The maintenance has started.", "completed": "The maintenance is complete.",
        "cancelled": "The maintenance has been cancelled."}[state]
    window.timeline.append({"at": iso_z(now), "state": state, "message": window.message, "operator": operator})


def notices(window: Window) -> list[Notice]:
    """Every format for every audience for the window's current state (templates in ops/templates/maintenance/)."""
    context = {"window": {"title": window.title, "state": window.state, "state_label": STATE_LABELS[window.state],
                          "start": human_time(window.start), "end": human_time(window.end),
                          "components": window.components, "message": window.message, "id": window.id,
                          "env": window.env, "operator": window.timeline[-1]["operator"]}}
    found = []
    for notice_format, extension in FORMATS.items():
        for audience in ("public", "internal"):
            name = f"maintenance/{notice_format}.{extension}.j2"
            subject = f"[Maintenance {STATE_LABELS[window.state].lower()}] {window.title}"
            if notice_format == "webhook":
                body = json.dumps(render_json(name, {**context, "audience": audience}))
            else:
                body = render_template(name, {**context, "audience": audience})
            found.append(Notice(notice_format, audience, subject, redact(body).strip("\n") + "\n", window.state))
    return found


class MaintenanceStore:
    """Local folder first, copied to the backups bucket (as incidents are)."""

    def __init__(self, env: Environment):
        self.env = env
        self.root = env.inventory.state_dir / "maintenance"

    def save(self, window: Window) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f".{window.id}.json.tmp-{os.getpid()}"
        temporary.write_text(json.dumps(window.record(), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, self.root / f"{window.id}.json")

    def recorded(self, window_id: str) -> int:
        path = self.root / f"{window_id}.json"
        return len(json.loads(path.read_text(encoding="utf-8"))["timeline"]) if path.exists() else 0

    def load(self, window_id: str) -> Window:
        path = self.root / f"{os.path.basename(window_id)}.json"
        if not path.exists() and self.env.has("backups"):
            try:
                data = open_storage(self.env.storage_config("backups")).get_bytes(f"{BUCKET_DIR}{window_id}.json")
            except ObjectNotFound:
                data = None
            if data:
                self.root.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        if not path.exists():
            raise UsageError(f"no maintenance window {window_id} on {self.env.name}",
                             hint="`inv maintenance.list` shows the windows")
        window = Window(**json.loads(path.read_text(encoding="utf-8")))
        if window.env != self.env.name:
            raise UsageError(f"maintenance {window_id} belongs to {window.env}, not {self.env.name}")
        return window

    def list(self) -> list[Window]:
        found = []
        for path in sorted(self.root.glob("*.json"), reverse=True) if self.root.exists() else []:
            try:
                found.append(self.load(path.stem))
            except (OpsError, ValueError, TypeError, OSError):
                continue
        return found

    def upload(self, window: Window) -> str | None:
        if not self.env.has("backups"):
            return f"{self.env.name} has no backups bucket: the window is not copied off this machine"
        try:
            open_storage(self.env.storage_config("backups")).put_bytes(
                f"{BUCKET_DIR}{window.id}.json", (self.root / f"{window.id}.json").read_bytes(),
                content_type="application/json")
        except (OpsError, OSError) as error:
            return redact(f"the window was not copied to the backups bucket: {error}")
        return None
