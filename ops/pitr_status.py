"""`inv pitr.status`: is point-in-time recovery working, and how much would a crash now lose?

Read from the bucket (the newest archived segment, base backups, the recoverable window) and, when
the server answers, from pg_stat_archiver. The archive lag counts only while the server has written
WAL that is not archived yet: an idle server after a WAL switch loses nothing, however old its
last segment. The verdict: ok; off (archiving not configured); failing (a failed attempt after the
last success); lagging (unarchived WAL older than `targets.rpo_seconds`, default 300);
no-base-backup. All but ok exit 3.
"""

from __future__ import annotations

from dataclasses import field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ops import pg, pg_url, pitr_catalog, pitr_host
from ops.clock import iso_z_or_none, utc_now
from ops.errors import ConnectionFailed
from ops.lazy_dataclasses import dataclass
from ops.metrics import MetricFamily
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.inventory import Environment
    from ops.storage import Storage

DEFAULT_RPO_SECONDS = 300


@dataclass
class PitrStatus:
    env: str
    archive: str
    rpo_seconds: float
    verdict: str = "ok"
    reasons: list[str] = field(default_factory=list)
    archive_mode: str | None = None
    last_archived_wal: str | None = None
    last_archived_at: datetime | None = None
    unarchived_wal: bool | None = None
    archive_lag_seconds: float | None = None
    failed_count: int | None = None
    last_failed_wal: str | None = None
    last_base_backup: str | None = None
    last_base_age_seconds: float | None = None
    earliest: datetime | None = None
    latest: datetime | None = None
    server: str | None = None  # why the server's side is missing, when it is

    def to_json(self) -> dict[str, Any]:
        return {"env": self.env, "archive": self.archive, "verdict": self.verdict, "reasons": self.reasons,
                "rpo_seconds": self.rpo_seconds, "archive_mode": self.archive_mode,
                "last_archived_wal": self.last_archived_wal, "last_archived_at": iso_z_or_none(self.last_archived_at),
                "unarchived_wal": self.unarchived_wal, "archive_lag_seconds": self.archive_lag_seconds,
                "failed_count": self.failed_count, "last_failed_wal": self.last_failed_wal,
                "last_base_backup": self.last_base_backup, "last_base_age_seconds": self.last_base_age_seconds,
                "window": {"earliest": iso_z_or_none(self.earliest), "latest": iso_z_or_none(self.latest)},
                "server": self.server}


def collect(env: Environment, storage: Storage) -> PitrStatus:
    engine = pitr_host.engine_of(env)
    status = PitrStatus(env.name, engine.location, float(env.raw("targets.rpo_seconds", DEFAULT_RPO_SECONDS)))
    now = utc_now()
    catalog = pitr_catalog.read(storage, engine)
    newest = catalog.newest_segment()
    if newest:
        status.last_archived_wal, status.last_archived_at = newest
    complete = catalog.complete()
    if complete:
        last = max(complete, key=lambda item: item.backup.end_time)
        status.last_base_backup = last.backup.backup_id
        status.last_base_age_seconds = round((now - last.backup.end_time).total_seconds(), 1)
        status.earliest = min(item.earliest for item in complete if item.earliest)
        status.latest = max((item.latest for item in complete if item.latest), default=None)
    _server_side(env, status)
    if status.last_archived_at and status.unarchived_wal is not False:
        status.archive_lag_seconds = round((now - status.last_archived_at).total_seconds(), 1)
    elif status.unarchived_wal is False:
        status.archive_lag_seconds = 0.0
    _judge(status)
    return status


def _server_side(env: Environment, status: PitrStatus) -> None:
    try:
        with pg.connect(pg_url.with_database(env.admin_url(), "postgres"), application_name="opsbook pitr.status",
                        autocommit=True) as connection:
            status.archive_mode = connection.execute("SHOW archive_mode").fetchone()[0]
            row = connection.execute(
                "SELECT last_archived_wal, last_archived_time, failed_count, last_failed_wal, last_failed_time, "
                "pg_walfile_name(pg_current_wal_lsn()) FROM pg_stat_archiver").fetchone()
    except ConnectionFailed as error:
        status.server = redact(error.message)
        return
    archived, archived_at, status.failed_count, failed_wal, failed_at, current = row
    if archived:
        status.last_archived_wal, status.last_archived_at = archived, archived_at
        status.unarchived_wal = current > archived
    if failed_at is not None and (archived_at is None or failed_at > archived_at):
        status.last_failed_wal = failed_wal


def _judge(status: PitrStatus) -> None:
    if status.archive_mode == "off":
        status.reasons.append("archive_mode is off: run `inv pitr.setup`")
    if status.last_failed_wal:
        status.reasons.append(f"archiving {status.last_failed_wal} failed after the last success "
                              f"({status.failed_count} failed attempts): read the server's log")
    if status.archive_lag_seconds is not None and status.archive_lag_seconds > status.rpo_seconds:
        status.reasons.append(f"the newest archived WAL is {status.archive_lag_seconds:.0f} s old and newer WAL "
                              f"waits: more than targets.rpo_seconds ({status.rpo_seconds:.0f})")
    if status.last_base_backup is None:
        status.reasons.append(f"no complete base backup: run `inv pitr.base --env {status.env}`")
    verdicts = ("off", "failing", "lagging", "no-base-backup")
    checks = (status.archive_mode == "off", bool(status.last_failed_wal),
              bool(status.archive_lag_seconds and status.archive_lag_seconds > status.rpo_seconds),
              status.last_base_backup is None)
    status.verdict = next((verdict for verdict, failed in zip(verdicts, checks, strict=True) if failed), "ok")


def lines(status: PitrStatus) -> list[str]:
    lag = "-" if status.archive_lag_seconds is None else f"{status.archive_lag_seconds:.0f} s"
    age = "" if status.last_base_age_seconds is None else f", {status.last_base_age_seconds / 3600:.1f} h old"
    return [f"{status.env}: PITR {status.verdict} ({status.archive})",
            f"  archive lag {lag} (target {status.rpo_seconds:.0f} s); last segment {status.last_archived_wal or '-'} "
            f"at {iso_z_or_none(status.last_archived_at) or '-'}; failed attempts {status.failed_count}",
            f"  last base backup {status.last_base_backup or '-'}{age}",
            f"  recoverable {iso_z_or_none(status.earliest) or '-'} .. {iso_z_or_none(status.latest) or '-'}",
            *([f"  the server did not answer: {status.server}"] if status.server else []),
            *[f"  {reason}" for reason in status.reasons]]


def families(status: PitrStatus) -> list[MetricFamily]:
    labels = {"env": status.env}
    found = [MetricFamily("opsbook_pitr_ok", "1 when point-in-time recovery is working (pitr.status verdict ok)")
             .add(1 if status.verdict == "ok" else 0, **labels)]
    if status.archive_lag_seconds is not None:
        found.append(MetricFamily("opsbook_pitr_archive_lag_seconds", "age of the newest archived WAL while newer "
                                  "WAL waits").add(status.archive_lag_seconds, **labels))
    if status.failed_count is not None:
        found.append(MetricFamily("opsbook_pitr_archive_failed", "failed archive attempts (pg_stat_archiver)")
                     .add(status.failed_count, **labels))
    if status.last_base_age_seconds is not None:
        found.append(MetricFamily("opsbook_pitr_base_backup_age_seconds", "age of the newest complete base backup")
                     .add(status.last_base_age_seconds, **labels))
    if status.earliest and status.latest:
        found.append(MetricFamily("opsbook_pitr_window_seconds", "span of time recoverable from the archive")
                     .add((status.latest - status.earliest).total_seconds(), **labels))
    return found
