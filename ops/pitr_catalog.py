"""What the archive holds for point-in-time recovery: base backups with their recoverable range, read
from one listing of the engine's folder (ops/pitr_barman.py and ops/pitr_pgbackrest.py have the layouts).

A base backup is recoverable from its end (the first consistent moment) to the newest WAL segment
reached without a gap from its first segment. The newest moment is the time that segment reached
the bucket (an upper bound: it holds WAL written before it was archived; archive_timeout bounds
how much before). A gap names the first missing segment and the times between which nothing later
can be recovered from that backup.

In LSNs (`restore --to-lsn`) the same span runs from the backup's end LSN to the end of that newest
segment, exactly: an archived segment holds all WAL before its end.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from ops import pitr_engine, pitr_lsn
from ops.clock import iso_z_or_none
from ops.errors import CheckFailed
from ops.lazy_dataclasses import dataclass

if TYPE_CHECKING:
    from ops.pitr_engine import BaseBackup, Continuity, Engine
    from ops.pitr_lsn import Lsn
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
                "earliest_lsn": _text(self.earliest_lsn), "latest_lsn": _text(self.latest_lsn),
                "last_wal": self.wal.last if self.wal else None, "gap": gap_json(self.wal) if gap else None}

    @property
    def earliest_lsn(self) -> Lsn | None:
        return pitr_lsn.parse_or_none(self.backup.end_lsn) if self.earliest is not None else None

    @property
    def latest_lsn(self) -> Lsn | None:
        """The end of the newest segment reached without a gap (exclusive)."""
        if self.latest is None or self.wal is None or self.wal.last is None:
            return None
        return pitr_lsn.segment_end(self.wal.last, self.backup.segment_size)

    def covers_lsn(self, lsn: Lsn) -> bool:
        return (self.earliest_lsn is not None and self.latest_lsn is not None
                and self.earliest_lsn <= lsn < self.latest_lsn)

    def covers(self, moment: datetime) -> bool:
        return self.earliest is not None and self.latest is not None and self.earliest <= moment <= self.latest


def _text(lsn: Lsn | None) -> str | None:
    return str(lsn) if lsn is not None else None


def gap_json(wal: Continuity) -> dict[str, Any]:
    return {"missing": wal.missing, "after": iso_z_or_none(wal.last_archived_at), "resumes": wal.resumes,
            "resumes_at": iso_z_or_none(wal.resumes_at)}


@dataclass(frozen=True)
class Catalog:
    backups: list[Recoverable]  # oldest first
    segments: dict[str, datetime]
    history: frozenset[str] = frozenset()  # the timeline history files archived

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
    return Catalog([recoverable(info, segments) for info in engine.backups(objects, storage.get_bytes)], segments,
                   frozenset(engine.history_files(objects)))


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


def reaching_the_end(catalog: Catalog, moment: datetime) -> Recoverable | None:
    """The newest complete base backup that ended by `moment` and whose WAL runs without a gap to the newest
    archived segment: `moment`, past that segment, becomes recoverable from it once a later commit is archived
    (ops/pitr_seal.py)."""
    for item in reversed(catalog.complete()):
        wal = item.wal
        if item.earliest is not None and item.earliest <= moment and item.latest is not None \
                and wal is not None and wal.missing is None:
            return item
    return None


def _gap_error(item: Recoverable, moment: datetime | None, source: str, target: str | None = None) -> CheckFailed:
    wal = item.wal
    target = target or (iso_z_or_none(moment) if moment else "the latest point")
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


def choose_lsn(catalog: Catalog, lsn: Lsn, source: str) -> Recoverable:
    """The newest complete base backup whose end is at or before `lsn` and whose WAL reaches past it; CheckFailed
    naming the recoverable range in LSNs, or the WAL gap, otherwise."""
    complete = [item for item in catalog.complete() if item.earliest_lsn is not None]
    if not complete:
        raise CheckFailed(f"{source} has no complete base backup in its PITR archive",
                          hint=f"take one: `inv pitr.base --env {source}`")
    started = [item for item in complete if item.earliest_lsn is not None and item.earliest_lsn <= lsn]
    for item in reversed(started):
        if item.covers_lsn(lsn):
            return item
    span = lsn_range(complete)
    if not started:
        raise CheckFailed(f"LSN {lsn} is before {source}'s earliest recoverable point (the end of its earliest base "
                          f"backup); recoverable: {span}",
                          hint=f"nothing was changed; `inv pitr.list --env {source} --json` shows each base backup's "
                               "earliest_lsn and latest_lsn")
    newest = started[-1]
    if newest.wal is not None and newest.wal.missing and newest.wal.resumes:
        raise _gap_error(newest, None, source, target=f"LSN {lsn}")
    raise CheckFailed(f"LSN {lsn} is beyond {source}'s archived WAL; recoverable: {span}",
                      hint="nothing was changed; WAL reaches the bucket when its segment is archived (archive_timeout, "
                           "or SELECT pg_switch_wal() on the source): choose an earlier LSN or wait")


def lsn_range(items: list[Recoverable]) -> str:
    """`0/2000100 to 0/5000000` over the base backups' spans (the end excluded)."""
    earliest = min(item.earliest_lsn for item in items if item.earliest_lsn is not None)
    ends = [item.latest_lsn for item in items if item.latest_lsn is not None]
    return f"{earliest} to {max(ends)} (exclusive)" if ends else f"from {earliest}, once its WAL is archived"


def segments_to_replay(segments: dict[str, datetime], item: Recoverable, moment: datetime | None, lsn: Lsn | None,
                       limit: int) -> list[str]:
    """The archived WAL segments recovering `item` to `moment` or `lsn` (both None: the latest point) reads, in
    order, at most `limit`: from the backup's first segment through the first one archived at or after
    `moment` (it holds the WAL written until then) and one more, or through the one holding `lsn`. A guess
    for fetching ahead, never a check: recovery asks for every segment itself."""
    if item.backup.begin_wal is None or item.wal is None or item.wal.last is None:
        return []
    chosen, current, extra = [], item.backup.begin_wal, 1
    while len(chosen) < limit and current in segments and current <= item.wal.last:
        chosen.append(current)
        reached = (lsn is not None and pitr_lsn.segment_end(current, item.backup.segment_size) > lsn) or (
            lsn is None and moment is not None and segments[current] >= moment)
        if reached:
            if extra == 0 or lsn is not None:
                break
            extra -= 1
        current = pitr_engine.next_segment(current, item.backup.segment_size)
    return chosen
