"""What the archive holds for point-in-time recovery: base backups with their recoverable range, read
from one listing of the engine's folder (ops/pitr_barman.py and ops/pitr_pgbackrest.py have the layouts).

A base backup is recoverable from its end (the first consistent moment) to the newest WAL segment
reached without a gap from its first segment. The newest moment is the time that segment reached
the bucket (an upper bound: it holds WAL written before it was archived; archive_timeout bounds
how much before). A gap names the first missing segment and the times between which nothing later
can be recovered from that backup.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from ops import pitr_engine
from ops.clock import iso_z_or_none
from ops.errors import CheckFailed
from ops.lazy_dataclasses import dataclass

if TYPE_CHECKING:
    from ops.pitr_engine import BaseBackup, Continuity, Engine
    from ops.storage import Storage


@dataclass(frozen=True)
class Recoverable:
    """A base backup and the span it can be recovered to."""

    backup: BaseBackup
    earliest: datetime | None  # None: not complete
    latest: datetime | None  # None: its own WAL is not all archived
    wal: Continuity | None

    def to_json(self) -> dict[str, Any]:
        gap = self.wal.missing if self.wal else None
        return {"backup_id": self.backup.backup_id, "status": self.backup.status, "complete": self.backup.complete,
                "begin_time": iso_z_or_none(self.backup.begin_time), "end_time": iso_z_or_none(self.backup.end_time),
                "begin_wal": self.backup.begin_wal, "end_wal": self.backup.end_wal,
                "earliest": iso_z_or_none(self.earliest), "latest": iso_z_or_none(self.latest),
                "last_wal": self.wal.last if self.wal else None, "gap": gap_json(self.wal) if gap else None}

    def covers(self, moment: datetime) -> bool:
        return self.earliest is not None and self.latest is not None and self.earliest <= moment <= self.latest


def gap_json(wal: Continuity) -> dict[str, Any]:
    return {"missing": wal.missing, "after": iso_z_or_none(wal.last_archived_at), "resumes": wal.resumes,
            "resumes_at": iso_z_or_none(wal.resumes_at)}


@dataclass(frozen=True)
class Catalog:
    backups: list[Recoverable]  # oldest first
    segments: dict[str, datetime]

    def complete(self) -> list[Recoverable]:
        return [item for item in self.backups if item.backup.complete]

    def newest_segment(self) -> tuple[str, datetime] | None:
        if not self.segments:
            return None
        name = max(self.segments, key=lambda key: self.segments[key])
        return name, self.segments[name]


def read(storage: Storage, engine: Engine) -> Catalog:
    """One listing of the engine's folder, and its base backups (barman-cloud: each backup.info; pgBackRest:
    its info command)."""
    objects = list(storage.list(engine.root))
    segments = engine.wal_segments(objects)
    return Catalog([recoverable(info, segments) for info in engine.backups(objects, storage.get_bytes)], segments)


def recoverable(backup: BaseBackup, segments: dict[str, datetime]) -> Recoverable:
    if not backup.complete or backup.begin_wal is None:
        return Recoverable(backup, None, None, None)
    wal = pitr_engine.continuity(segments, backup.begin_wal, backup.segment_size)
    reached = wal.last is not None and backup.end_wal is not None and wal.last >= backup.end_wal
    latest = max(wal.last_archived_at, backup.end_time) if reached and wal.last_archived_at else None
    return Recoverable(backup, backup.end_time, latest, wal)


def choose(catalog: Catalog, moment: datetime | None, source: str) -> Recoverable:
    """The newest complete base backup that recovers to `moment` (None: the latest point); CheckFailed naming
    the recoverable range, or the WAL gap, otherwise."""
    complete = catalog.complete()
    if not complete:
        raise CheckFailed(f"{source} has no complete base backup in its PITR archive",
                          hint=f"take one: `inv pitr.base --env {source}`")
    if moment is None:
        usable = [item for item in complete if item.latest is not None]
        if usable:
            return max(usable, key=lambda item: (item.latest, item.backup.backup_id))
        raise _gap_error(complete[-1], None, source)
    started = [item for item in complete if item.earliest is not None and item.earliest <= moment]
    for item in reversed(started):
        if item.covers(moment):
            return item
    if not started:
        first = min(item.earliest for item in complete if item.earliest)
        raise CheckFailed(f"{iso_z_or_none(moment)} is before {source}'s earliest recoverable point "
                          f"{iso_z_or_none(first)}",
                          hint=f"`inv pitr.list --env {source}` shows each base backup's range")
    raise _gap_error(started[-1], moment, source)


def _gap_error(item: Recoverable, moment: datetime | None, source: str) -> CheckFailed:
    wal = item.wal
    target = iso_z_or_none(moment) if moment else "the latest point"
    if wal is not None and wal.missing and wal.resumes:
        return CheckFailed(f"WAL segment {wal.missing} is missing from {source}'s archive: from "
                           f"{iso_z_or_none(wal.last_archived_at)} to {iso_z_or_none(wal.resumes_at)} (segment "
                           f"{wal.resumes} on) nothing is recoverable from base backup {item.backup.backup_id}, "
                           f"so {target} is not",
                       hint="nothing was changed; restore to a time before the gap, or take a new base backup "
                            f"(`inv pitr.base --env {source}`) for later times")
    latest = iso_z_or_none(item.latest) if item.latest else "(its WAL is not archived yet)"
    return CheckFailed(f"{target} is not recoverable from {source}: base backup {item.backup.backup_id} reaches "
                       f"from {iso_z_or_none(item.earliest)} to {latest}",
                       hint="nothing was changed; the newest WAL reaches the bucket within archive_timeout: choose "
                            "an earlier time or wait a minute")
