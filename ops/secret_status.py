"""`inv secrets.status`: every secret an environment uses, where it comes from, when it last changed, which
rotation covers it and whether it is past its `secrets.max_age_days`; never a value.

Two kinds of entry: the inventory's references (`${env:…}`, `${file:…}`, `${cmd:…}`, `${aws-sm:…}`, by
their dotted path) and what the secret store keeps (by key). When a secret changed comes from the rotation
records (keys.rotate, secrets.rotate), else from the source itself where it can tell (a file's mtime, a
Secrets Manager secret's last change, the store's last write).
"""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ops import keys
from ops.clock import iso_z_or_none, parse_time_or_none
from ops.errors import OpsError
from ops.lazy_dataclasses import dataclass
from ops.references import REFERENCE_PATTERN, Reference, aws_settings
from ops.secret_managers import aws_last_changed, parse_aws_reference

if TYPE_CHECKING:
    from ops.inventory import Environment

MARKERS = {"APP_SEEDED"}  # kept in the store, not secrets
STORE_ROTATIONS = {
    keys.KEY_ID: "keys.rotate", keys.SECRET: "keys.rotate",
    keys.NEXT_KEY_ID: "keys.rotate (in progress)", keys.NEXT_SECRET: "keys.rotate (in progress)",
    keys.PREVIOUS_KEY_ID: "keys.rotate (in progress)", keys.PREVIOUS_SECRET: "keys.rotate (in progress)",
    "ADMIN_PASSWORD_HASH": "secrets.rotate --name ADMIN_PASSWORD",
    "AUTH_SECRET": "secrets.rotate --name AUTH_SECRET",
}
ROTATED_AS = {"ADMIN_PASSWORD_HASH": "ADMIN_PASSWORD", "AUTH_SECRET": "AUTH_SECRET"}  # secrets.rotate's names
STORAGE_KEY_PATHS = {"storage.access_key_id", "storage.secret_access_key"}


@dataclass
class SecretEntry:
    name: str
    source: str
    changed_at: datetime | None
    rotation: str | None
    max_age_days: int | None
    overdue: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "changed_at": iso_z_or_none(self.changed_at),
                "rotation": self.rotation, "max_age_days": self.max_age_days, "overdue": self.overdue}

    def line(self, now: datetime) -> str:
        age = f" ({(now - self.changed_at).days} days ago)" if self.changed_at else ""
        changed = f"changed {iso_z_or_none(self.changed_at)}{age}" if self.changed_at else "changed: unknown"
        limit = f", every {self.max_age_days} days" if self.max_age_days else ""
        rotation = f"rotate: inv {self.rotation}{limit}" if self.rotation else f"rotate: by hand{limit}"
        return f"  {self.name}: from {self.source}; {changed}; {rotation}" + ("  OVERDUE" if self.overdue else "")


@dataclass
class SecretsStatus:
    env: str
    store: str
    location: str
    entries: list[SecretEntry]

    @property
    def overdue(self) -> list[str]:
        return [entry.name for entry in self.entries if entry.overdue]

    def to_json(self) -> dict[str, Any]:
        return {"env": self.env, "store": {"kind": self.store, "location": self.location},
                "secrets": [entry.to_json() for entry in self.entries], "overdue": self.overdue}

    def lines(self, now: datetime) -> list[str]:
        return [f"secrets of {self.env}: the store is {self.store} ({self.location})",
                *(entry.line(now) for entry in self.entries)]


def secrets_status(env: Environment, now: datetime | None = None) -> SecretsStatus:
    now = now or datetime.now(UTC)
    store = env.secret_store()
    stored = store.read()
    limits = {str(k): int(v) for k, v in (env.raw("secrets.max_age_days", None) or {}).items()}
    history = keys.read_history(env)
    entries = [*_reference_entries(env, bool(stored.get(keys.KEY_ID)))]
    entries += _store_entries(env, stored, store.label, store.last_changed(), history)
    for entry in entries:
        entry.max_age_days = entry.max_age_days or limits.get(entry.name) or limits.get(ROTATED_AS.get(entry.name, ""))
        if entry.max_age_days and not entry.overdue:
            entry.overdue = entry.changed_at is None or (now - entry.changed_at).days >= entry.max_age_days
    return SecretsStatus(env.name, store.kind, store.location, entries)


def _references(node: Any, path: str = "") -> list[tuple[str, Reference]]:
    if isinstance(node, dict):
        return [found for key, value in node.items() for found in _references(value, f"{path}.{key}" if path else key)]
    if isinstance(node, list):
        return [found for index, value in enumerate(node) for found in _references(value, f"{path}.{index}")]
    return [(path, node)] if isinstance(node, Reference) else []


def _reference_entries(env: Environment, store_has_key: bool) -> list[SecretEntry]:
    entries = []
    for path, reference in _references(env.data):
        if store_has_key and path in STORAGE_KEY_PATHS:
            continue  # replaced by the store's key (the storage key entry below)
        rotation = "keys.rotate" if path in STORAGE_KEY_PATHS and env.has("keys") else None
        entries.append(SecretEntry(path, reference.template, _reference_changed(env, reference), rotation,
                                   None, False))
    return entries


def _reference_changed(env: Environment, reference: Reference) -> datetime | None:
    """The latest change its sources can tell of; None when one of them cannot (a variable, a command)."""
    moments = []
    for match in REFERENCE_PATTERN.finditer(reference.template):
        moment = None
        if match["kind"] == "file":
            with contextlib.suppress(OSError):
                moment = datetime.fromtimestamp(os.stat(os.path.expanduser(match["body"])).st_mtime, UTC)
        elif match["kind"] == "aws-sm":
            with contextlib.suppress(OpsError):  # an unresolvable manager setting: unknown
                moment = aws_last_changed(aws_settings(reference.managers), parse_aws_reference(match["body"])[0])
        if moment is None:
            return None
        moments.append(moment)
    return max(moments) if moments else None


def _store_entries(env: Environment, stored: dict[str, Any], label: str, store_changed: datetime | None,
                   history: list[dict[str, Any]]) -> list[SecretEntry]:
    entries = []
    storage_key = _storage_key_status(env) if stored.get(keys.KEY_ID) or env.has("keys") else None
    for name in sorted(stored):
        if name in MARKERS or not stored[name]:
            continue
        changed, max_age, overdue = _recorded_change(name, history) or store_changed, None, False
        if name in (keys.KEY_ID, keys.SECRET) and storage_key is not None:
            changed, max_age, overdue = storage_key.created_at or changed, storage_key.max_age_days, storage_key.overdue
        entries.append(SecretEntry(name, f"the store ({label})", changed, STORE_ROTATIONS.get(name), max_age, overdue))
    if storage_key is not None and not stored.get(keys.KEY_ID):
        entries.append(SecretEntry("storage key", "the inventory (storage.access_key_id)", storage_key.created_at,
                                   "keys.rotate", storage_key.max_age_days, storage_key.overdue))
    return entries


def _recorded_change(name: str, history: list[dict[str, Any]]) -> datetime | None:
    rotated = ROTATED_AS.get(name)
    if rotated is None:
        return None
    times = [parse_time_or_none(e.get("at")) for e in history if e.get("kind") == "secret" and e.get("name") == rotated]
    return max((t for t in times if t), default=None)


def _storage_key_status(env: Environment) -> keys.KeyStatus | None:
    if not env.has("storage"):
        return None
    try:
        return keys.key_status(env)
    except OpsError:
        return None  # no key to judge (no credentials given): nothing to rotate
