"""A recovery target time made reachable on a quiet source.

PostgreSQL stops a recovery to `recovery_target_time` T at the first commit after T, and fails ("recovery
ended before configured recovery target was reached") when the archive holds none: on a database nobody
wrote to since T, every recent time. So before recovering to T, when the source answers, opsbook commits an
empty transaction there (a transaction id, no rows), closes its WAL segment with pg_switch_wal() and waits
until the server reports it archived. The recovery then stops before that commit, having replayed everything
committed up to T. Nothing is claimed the archive does not hold: the catalog is read again afterwards and
must cover T, and recovery must stop at a commit after T.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ops import pg
from ops.errors import CheckFailed, ConnectionFailed, StepFailed
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    import psycopg

ARCHIVE_WAIT_SECONDS = 120
POLL_SECONDS = 0.2
APPLICATION = "opsbook pitr seal"


@dataclass(frozen=True)
class Seal:
    committed_at: datetime  # the source's clock during the empty transaction; its commit is later still
    segment: str  # the WAL segment holding the commit, archived


def reachable(url: Secret) -> bool:
    """Whether the source's server answers (a read, nothing written)."""
    try:
        with pg.connect(url, application_name=APPLICATION, autocommit=True, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except ConnectionFailed:
        return False
    return True


def seal(url: Secret, after: datetime, wait_seconds: float = ARCHIVE_WAIT_SECONDS,
         cancelled: threading.Event | None = None) -> Seal:
    """An empty commit after `after` on the source, its WAL segment closed and archived. ConnectionFailed when
    the source does not answer; CheckFailed when its clock is behind `after` or the role may not switch WAL;
    StepFailed when archiving fails, times out or `cancelled` is set."""
    with pg.connect(url, application_name=APPLICATION, autocommit=True, connect_timeout=10) as connection:
        try:
            committed_at = connection.execute("SELECT clock_timestamp() FROM pg_current_xact_id()").fetchone()[0]
            segment = connection.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        except pg.Error as error:
            raise CheckFailed(f"cannot close the source's WAL segment: {' '.join(redact(error).split())}",
                              hint="the admin role needs EXECUTE on pg_switch_wal (a superuser has it)") from None
        if committed_at <= after:
            raise CheckFailed(f"the source's clock ({committed_at.isoformat()}) is behind the target time "
                              f"{after.isoformat()}", hint="check the clocks of this machine and the database server")
        wait_archived(connection, segment, wait_seconds, cancelled)
    return Seal(committed_at, segment)


def wait_archived(connection: psycopg.Connection, segment: str, wait_seconds: float,
                  cancelled: threading.Event | None = None) -> None:
    """Until pg_stat_archiver reports `segment` (or a later one) archived; StepFailed when it fails, times out or
    `cancelled` is set."""
    cancelled = cancelled or threading.Event()
    deadline = time.monotonic() + wait_seconds
    while True:
        stats = archiver(connection)
        if (stats["last_archived_wal"] or "") >= segment:
            return
        if (stats["last_failed_wal"] or "") >= segment and failed_since(stats):
            raise StepFailed(f"archiving WAL segment {segment} failed on the source",
                             hint="`inv pitr.status` shows the archiver's failures; nothing was changed")
        if time.monotonic() > deadline:
            raise StepFailed(f"WAL segment {segment} was not archived within {wait_seconds:.0f} s",
                             hint="`inv pitr.status` shows the archive lag; nothing was changed")
        if cancelled.wait(POLL_SECONDS):  # the archiver runs the engine's command; bounded by the deadline
            raise StepFailed(f"the wait for WAL segment {segment} to be archived was cancelled")


def archiver(connection: psycopg.Connection) -> dict[str, Any]:
    """The server's pg_stat_archiver row, by column name."""
    row = connection.execute("SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
                             "last_failed_wal, last_failed_time FROM pg_stat_archiver").fetchone()
    names = ("archived_count", "last_archived_wal", "last_archived_time", "failed_count", "last_failed_wal",
             "last_failed_time")
    return dict(zip(names, row, strict=True))


def failed_since(stats: dict[str, Any]) -> bool:
    """The archiver's last attempt failed: a failure after its last success."""
    failed, archived = stats["last_failed_time"], stats["last_archived_time"]
    return failed is not None and (archived is None or failed > archived)
