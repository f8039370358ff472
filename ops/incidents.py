"""Incidents: the record, its timeline, the status-page state machine, and where they are kept.

States follow status-page conventions: investigating → identified → monitoring → resolved.
Any open state may move to any other (a fix that did not hold goes back to identified or
investigating); resolved is final — updating or resolving a resolved incident is refused
with CheckFailed (exit 3: the request is well-formed, the incident's state refuses it).
Open a new incident when a problem comes back.

Kept under `<state>/incidents/<id>/`: incident.json (the current state, rewritten
atomically), timeline.jsonl (append-only, one entry per event), triage.md/.json; each
change is copied to the environment's backups bucket under `incidents/<id>/` — a failed
copy warns and never loses the local record. Timeline times never go backwards: an entry
is stamped max(now, last entry) so a skewed clock cannot reorder the story.
"""

from __future__ import annotations

import json
import os
import secrets as random_tokens
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.clock import compact_z, iso_z, iso_z_micro, parse_time, utc_now
from ops.errors import CheckFailed, OpsError, UsageError
from ops.journal import host_name, operator_name
from ops.lazy_dataclasses import dataclass
from ops.locks import file_lock
from ops.patterns import Pattern
from ops.secrets import masked, redact
from ops.storage import ObjectNotFound, open_storage

if TYPE_CHECKING:
    from ops.inventory import Environment

STATES = ("investigating", "identified", "monitoring", "resolved")
OPEN_STATES = STATES[:-1]
COMPONENT_STATUSES = ("operational", "degraded_performance", "partial_outage", "major_outage")
IMPACTS = ("none", "minor", "major", "critical")
# The status a component gets when it is named without one, from the incident's impact.
IMPACT_STATUS = {"none": "operational", "minor": "degraded_performance", "major": "partial_outage",
                 "critical": "major_outage"}
BUCKET_DIR = "incidents/"
FILES = ("incident.json", "timeline.jsonl", "triage.md", "triage.json")
_ID = Pattern(r"^\d{8}T\d{4}Z-[0-9a-f]{4}$")
_DURATION = Pattern(r"(\d+)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def new_incident_id(moment: datetime | None = None) -> str:
    """UTC minute plus a short random suffix, e.g. 20261123T0200Z-ab12."""
    return f"{compact_z(moment or utc_now(), seconds=False)}-{random_tokens.token_hex(2)}"


def lock_resource(incident_id: str) -> str:
    """The lock one operator at a time holds to change an incident (a runbook's `locks`, IncidentStore.lock)."""
    return f"incident-{check_id(incident_id)}"


def check_id(incident_id: str) -> str:
    if not _ID.match(incident_id or ""):
        raise UsageError(f"{incident_id!r} is not an incident id (like 20261123T0200Z-ab12)",
                         hint="`inv incident.list` shows the incidents")
    return incident_id


def parse_duration(text: str) -> timedelta:
    """"30m", "1h", "1h30m", "90s", "2d" → timedelta; UsageError otherwise."""
    compact = (text or "").strip().lower()
    parts = _DURATION.findall(compact)
    if not parts or _DURATION.sub("", compact).strip():
        raise UsageError(f"--next-update {text!r} is not a duration", hint="use e.g. 30m, 1h or 1h30m")
    delta = sum((timedelta(**{_UNITS[unit]: int(amount)}) for amount, unit in parts), timedelta())
    if delta <= timedelta(0):
        raise UsageError(f"--next-update {text!r} must be in the future")
    return delta


def parse_components(text: str | None, default_status: str, current: dict[str, str] | None = None
                     ) -> dict[str, str]:
    """"api,uploads" or "api=major_outage,uploads=degraded_performance" (spaces and "-" allowed in statuses)."""
    components = dict(current or {})
    for item in (text or "").split(","):
        name, _, status = (part.strip() for part in item.partition("="))
        if not name:
            continue
        status = status.replace(" ", "_").replace("-", "_").lower() or components.get(name) or default_status
        if status not in COMPONENT_STATUSES:
            raise UsageError(f"component status {status!r} for {name!r} is not one of {', '.join(COMPONENT_STATUSES)}",
                             hint="e.g. --components api=partial_outage,uploads")
        components[name] = status
    return components


@dataclass
class TimelineEntry:
    """One event of an incident's timeline (opened, updated, resolved)."""

    at: str
    kind: str  # opened | triage | update | resolved | notice | rollback
    operator: str
    state: str | None = None
    message: str | None = None
    components: dict[str, str] | None = None
    next_update: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return masked({k: v for k, v in asdict(self).items() if v not in (None, {}, [])})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TimelineEntry:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Incident:
    """An incident's record: its state now and its timeline."""

    id: str
    env: str
    project: str
    title: str
    impact: str
    operator: str
    opened_at: str
    state: str = "investigating"
    components: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    next_update: str | None = None
    resolved_at: str | None = None
    cause: str | None = None
    postmortem: str | None = None
    triage_failing: list[str] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.state != "resolved"

    def record(self) -> dict[str, Any]:
        """incident.json: the current state (the timeline lives in its own file)."""
        data = asdict(self)
        data.pop("timeline")
        return masked(data)

    @classmethod
    def from_record(cls, data: dict[str, Any], timeline: list[TimelineEntry]) -> Incident:
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "timeline"}
        return cls(**values, timeline=timeline)

    def last_time(self) -> datetime | None:
        return parse_time(self.timeline[-1].at) if self.timeline else None


def stamp(incident: Incident, now: datetime | None = None) -> datetime:
    """The time for the next timeline entry: never before the last one."""
    now = now or utc_now()
    last = incident.last_time()
    return max(now, last) if last else now


def new_incident(env: Environment, *, title: str, impact: str, components: str | None, message: str | None,
                 operator: str, next_update: str | None = "30m", now: datetime | None = None) -> Incident:
    title = (title or "").strip()
    if not title:
        raise UsageError("--title is required: name the whole problem, e.g. \"Uploads failing\"")
    if impact not in IMPACTS:
        raise UsageError(f"--impact {impact!r} is not one of {', '.join(IMPACTS)}")
    parsed = parse_components(components, IMPACT_STATUS[impact])
    if not parsed:
        raise UsageError("--components is required: the affected parts, e.g. --components api,uploads")
    now = now or utc_now()
    incident = Incident(id=new_incident_id(now), env=env.name, project=env.inventory.project, title=redact(title),
                        impact=impact, operator=operator, opened_at=iso_z(now), components=parsed,
                        message=redact(message or "We are investigating reports of this problem."))
    incident.next_update = _next_update(now, next_update)
    incident.timeline.append(TimelineEntry(iso_z(now), "opened", operator, state=incident.state,
                                           message=incident.message, components=dict(parsed),
                                           next_update=incident.next_update,
                                           detail={"title": incident.title, "impact": impact}))
    return incident


def _next_update(now: datetime, text: str | None) -> str | None:
    return iso_z(now + parse_duration(text)) if text else None


def refuse_if_resolved(incident: Incident, verb: str) -> None:
    if not incident.open:
        raise CheckFailed(f"incident {incident.id} was resolved at {incident.resolved_at}; it cannot be {verb}",
                          hint="open a new incident (`inv incident.open`) if the problem is back")


def apply_update(incident: Incident, *, state: str, message: str | None, components: str | None,
                 next_update: str | None, operator: str, now: datetime | None = None) -> TimelineEntry:
    """Move an open incident to `state` (any open state) and append the update to its timeline."""
    refuse_if_resolved(incident, "updated")
    if state not in OPEN_STATES:
        hint = "use `inv incident.resolve` to resolve" if state == "resolved" else None
        raise UsageError(f"--status {state!r} is not one of {', '.join(OPEN_STATES)}", hint=hint)
    moment = stamp(incident, now)
    incident.components = parse_components(components, IMPACT_STATUS[incident.impact], incident.components)
    incident.state = state
    incident.message = redact(message) if message else incident.message
    incident.next_update = _next_update(moment, next_update)
    entry = TimelineEntry(iso_z(moment), "update", operator, state=state, message=incident.message,
                          components=dict(incident.components), next_update=incident.next_update)
    incident.timeline.append(entry)
    return entry


def apply_resolve(incident: Incident, *, message: str, cause: str | None, postmortem: str | None, operator: str,
                  now: datetime | None = None) -> TimelineEntry:
    refuse_if_resolved(incident, "resolved again")
    if not (message or "").strip():
        raise UsageError("--message is required to resolve: say what happened and what fixed it")
    moment = stamp(incident, now)
    incident.state = "resolved"
    incident.components = dict.fromkeys(incident.components, "operational")
    incident.message, incident.next_update = redact(message), None
    incident.resolved_at = iso_z(moment)
    incident.cause = redact(cause) if cause else None
    incident.postmortem = postmortem or None
    entry = TimelineEntry(iso_z(moment), "resolved", operator, state="resolved", message=incident.message,
                          components=dict(incident.components),
                          detail={k: v for k, v in (("cause", incident.cause), ("postmortem", postmortem)) if v})
    incident.timeline.append(entry)
    return entry


def add_entry(incident: Incident, kind: str, operator: str, *, message: str | None = None,
              detail: dict[str, Any] | None = None, now: datetime | None = None) -> TimelineEntry:
    entry = TimelineEntry(iso_z(stamp(incident, now)), kind, operator, state=incident.state,
                          message=redact(message) if message else None, detail=masked(detail or {}))
    incident.timeline.append(entry)
    return entry


# --- the store ------------------------------------------------------------------------------------


class IncidentStore:
    """Local folder first (the record of truth on this machine), copied to the backups bucket."""

    def __init__(self, env: Environment):
        self.env = env
        self.root = env.inventory.state_dir / "incidents"

    def folder(self, incident_id: str) -> Path:
        return self.root / check_id(incident_id)

    def save(self, incident: Incident) -> None:
        """incident.json rewritten atomically; timeline lines appended (never rewritten)."""
        folder = self.folder(incident.id)
        folder.mkdir(parents=True, exist_ok=True)
        timeline_file = folder / "timeline.jsonl"
        written = len(_read_lines(timeline_file))
        with timeline_file.open("a", encoding="utf-8") as handle:
            for entry in incident.timeline[written:]:
                handle.write(json.dumps(entry.to_json()) + "\n")
        _write_atomic(folder / "incident.json", json.dumps(incident.record(), indent=2) + "\n")

    def recorded(self, incident_id: str) -> int:
        """How many of the incident's timeline entries are recorded here (0: not recorded at all)."""
        return len(_read_lines(self.folder(incident_id) / "timeline.jsonl"))

    def save_triage(self, incident: Incident, markdown: str, data: dict[str, Any]) -> None:
        folder = self.folder(incident.id)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / "triage.md", redact(markdown).rstrip("\n") + "\n")
        _write_atomic(folder / "triage.json", json.dumps(masked(data), indent=2, default=str) + "\n")

    def triage_markdown(self, incident_id: str) -> str | None:
        path = self.folder(incident_id) / "triage.md"
        return path.read_text(encoding="utf-8") if path.exists() else None

    def load(self, incident_id: str) -> Incident:
        """From this machine, else fetched from the bucket (another operator opened it)."""
        folder = self.folder(incident_id)
        if not (folder / "incident.json").exists():
            self._fetch(incident_id)
        data = json.loads((folder / "incident.json").read_text(encoding="utf-8"))
        if data.get("env") != self.env.name:
            raise UsageError(f"incident {incident_id} belongs to {data.get('env')}, not {self.env.name}",
                             hint=f"add --env {data.get('env')}")
        timeline = [TimelineEntry.from_json(line) for line in _read_lines(folder / "timeline.jsonl")]
        return Incident.from_record(data, timeline)

    def list(self, *, open_only: bool = False) -> list[Incident]:
        """This environment's incidents known here, newest first."""
        found = []
        for path in sorted(self.root.glob("*/incident.json"), reverse=True) if self.root.exists() else []:
            try:
                incident = self.load(path.parent.name)
            except (OpsError, ValueError, OSError):
                continue  # another environment's, or a damaged folder: not this list's business
            if not open_only or incident.open:
                found.append(incident)
        return found

    @contextmanager
    def lock(self, incident_id: str) -> Iterator[None]:
        """One operator at a time changes an incident; a second one is told who holds it (exit 75)."""
        holder = {"incident": incident_id, "operator": operator_name(), "host": host_name(), "pid": os.getpid(),
                  "since": iso_z_micro(utc_now())}
        with file_lock(self.env.inventory.state_dir / "locks" / f"{self.env.name}.{lock_resource(incident_id)}.lock",
                       holder):
            yield

    def upload(self, incident: Incident) -> str | None:
        """Copies the incident's files to the backups bucket; the reason as text when it could not."""
        if not self.env.has("backups"):
            return f"{self.env.name} has no backups bucket: the incident is not copied off this machine"

        folder = self.folder(incident.id)
        try:
            storage = open_storage(self.env.storage_config("backups"))
            for name in FILES:
                path = folder / name
                if path.exists():
                    kind = "application/x-ndjson" if name.endswith(".jsonl") else (
                        "application/json" if name.endswith(".json") else "text/markdown")
                    storage.put_bytes(f"{BUCKET_DIR}{incident.id}/{name}", path.read_bytes(), content_type=kind)
        except (OpsError, OSError) as error:
            return redact(f"the incident was not copied to the backups bucket: {error}")
        return None

    def _fetch(self, incident_id: str) -> None:
        folder = self.folder(incident_id)
        hint = "`inv incident.list` shows the incidents known here"
        if not self.env.has("backups"):
            raise UsageError(f"no incident {incident_id} in {self.root}", hint=hint)

        storage = open_storage(self.env.storage_config("backups"))
        try:
            files = {name: storage.get_bytes(f"{BUCKET_DIR}{incident_id}/{name}") for name in FILES[:2]}
        except ObjectNotFound:
            raise UsageError(f"no incident {incident_id} on {self.env.name}, here or in {storage.describe()}",
                             hint=hint) from None
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            _write_atomic(folder / name, data.decode())


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a write cut short leaves a partial last line; what came before stands
    return entries


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
