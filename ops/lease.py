"""Leases: a lock that holds across machines, as an object in the environment's backup bucket.

A file lock (ops/locks.py) keeps two runs on one machine apart; two machines (a cron host, a Kubernetes
CronJob, an operator's laptop) share only the backup bucket. So a mutating run also holds
`locks/<resource>.json` under the environment's backup prefix, written with conditional writes:
created with If-None-Match: * (only one creator wins), renewed every third of its time and released
with If-Match on the ETag we last wrote (only the holder can). The object names the run, operator, host,
when it was taken and until when it holds. A holder that died stops renewing: once its time is up by
the server's clock (its last write plus the holder's lease time), the next run takes it over, with
If-Match on the dead holder's ETag so that of two runs taking over only one wins.

A holder whose renewal fails (another run took the lease over, or it could not be renewed within its
time) has lost it: the run stops before its next step, so two runs never apply at once. Storage without
conditional writes (the local folder backend), environments without a backup bucket (or before
provision made it) and decommissioned ones (their keys are revoked) keep the file lock alone.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ops.archive import decommission_marker
from ops.clock import iso_z, iso_z_micro, parse_time_or_none, utc_now
from ops.errors import CheckFailed, InventoryError, LockHeld, OpsError
from ops.lazy_dataclasses import dataclass
from ops.locks import describe_holder
from ops.secrets import redact
from ops.storage import BucketNotFound, PreconditionFailed, Storage, StoredObject, open_storage

if TYPE_CHECKING:
    from ops.engine import RunContext
    from ops.inventory import Environment

DEFAULT_SECONDS = 120.0
LEASE_DIR = "locks"
CONTENT_TYPE = "application/json"
# Last-Modified and Date are whole seconds: a lease counts as expired one second late, never early.
CLOCK_GRAIN = timedelta(seconds=1)
RETRY_SECONDS = 5.0  # after a renewal that failed for another reason than losing the lease
ACQUIRE_ATTEMPTS = 3  # a lease that changes hands between our read and our write: read it again


class LeaseLost(LockHeld):
    """This run's lease was taken over or could not be renewed in time: it must not apply another step."""


def lease_key(resource: str) -> str:
    return f"{LEASE_DIR}/{resource}.json"


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object says: who holds it, since when, until when, for how long each renewal."""

    holder: dict[str, Any]  # run_id, runbook, operator, host, pid
    acquired_at: datetime
    expires_at: datetime
    seconds: float

    def to_bytes(self) -> bytes:
        return json.dumps({**self.holder, "acquired_at": iso_z_micro(self.acquired_at),
                           "expires_at": iso_z_micro(self.expires_at), "lease_seconds": self.seconds},
                          sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None when the object is not one (the lease is then judged by its age alone)."""
        try:
            fields = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(fields, dict):
            return None
        acquired, expires = parse_time_or_none(fields.pop("acquired_at", None)), \
            parse_time_or_none(fields.pop("expires_at", None))
        seconds = fields.pop("lease_seconds", None)
        if acquired is None or expires is None or not isinstance(seconds, int | float) or seconds <= 0:
            return None
        return cls(holder=fields, acquired_at=acquired, expires_at=expires, seconds=float(seconds))

    def renewed(self, now: datetime) -> LeaseRecord:
        return LeaseRecord(self.holder, self.acquired_at, now + timedelta(seconds=self.seconds), self.seconds)

    def describe(self) -> str:
        """`run X (backup) by op@host, pid N, since T`: the file lock's words for its holder."""
        return describe_holder({**self.holder, "since": iso_z(self.acquired_at)})

    def who(self) -> str:
        return f"run {self.holder.get('run_id', '?')} by {self.holder.get('operator', '?')}@" \
               f"{self.holder.get('host', '?')}"


def new_record(holder: dict[str, Any], now: datetime, seconds: float) -> LeaseRecord:
    return LeaseRecord(dict(holder), now, now + timedelta(seconds=seconds), seconds)


def expired_since(record: LeaseRecord | None, stored: StoredObject,
                  default_seconds: float = DEFAULT_SECONDS) -> datetime | None:
    """When the lease ran out, by the server's clock (its last write plus the holder's lease time), or None
    while it holds. The server's clock, not ours: the machines' clocks need not agree."""
    seconds = record.seconds if record else default_seconds
    end = stored.last_modified + timedelta(seconds=seconds)
    return end if stored.server_time >= end + CLOCK_GRAIN else None


def lease_seconds(env: Environment) -> float:
    return float(env.value("locks.lease_seconds", DEFAULT_SECONDS))


def lease_storage(env: Environment) -> Callable[[], Storage] | None:
    """Opens the backup storage anew for each call (so a renewal uses the keys of the moment, a rotated
    pair included), or None when there is no lease for this environment: no backup bucket, a backend
    without conditional writes, or the environment is decommissioned."""
    if not env.has("backups") or env.decommissioned or decommission_marker(env.inventory.state_dir, env.name):
        return None  # a decommissioned environment's keys are revoked: its bucket takes no lease

    def opener() -> Storage:
        return open_storage(env.storage_config("backups"))

    try:
        return opener if opener().conditional_writes else None
    except InventoryError:  # `backups` from the defaults, without a bucket here: nothing to lease in
        return None


@dataclass(frozen=True)
class Takeover:
    previous: LeaseRecord | None
    expired_since: datetime
    died_here: bool = False  # its holder's file lock on this machine was left: it died, whatever the time

    def message(self) -> str:
        who = self.previous.who() if self.previous else "an unknown run"
        if self.died_here:
            return f"took over the lease of {who}, which died on this machine " \
                   f"(last renewed {iso_z(self.expired_since)})"
        return f"took over the lease of {who}, expired since {iso_z(self.expired_since)}"


class Lease:
    """A lease this run holds: renewed from a thread, checked between steps, released at the end."""

    def __init__(self, storage: Callable[[], Storage], resource: str, record: LeaseRecord, etag: str,
                 *, sent_at: float):
        self._storage = storage
        self.resource = resource
        self.key = lease_key(resource)
        self.record = record
        self.etag = etag
        self._held_until = sent_at + record.seconds  # monotonic; others may take it over from then on
        self._lost: str | None = None
        self.released = False
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"opsbook-lease-{resource}", daemon=True)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        interval = self.record.seconds / 3
        pause = interval
        while not self._stop.wait(pause):
            pause = self._renew_once(interval)

    def _renew_once(self, interval: float) -> float:
        sent = time.monotonic()
        record = self.record.renewed(utc_now())
        try:
            etag = self._storage().put_if_match(self.key, record.to_bytes(), self.etag, content_type=CONTENT_TYPE)
        except PreconditionFailed:
            self._lose(f"another run took it over ({self._current_holder()})")
            return interval
        except (OpsError, OSError) as error:
            if time.monotonic() >= self._held_until:
                self._lose(f"it could not be renewed within {self.record.seconds:g}s "
                           f"({redact(getattr(error, 'message', str(error)))})")
            return min(interval, RETRY_SECONDS)
        with self._guard:
            self.record, self.etag, self._held_until = record, etag, sent + record.seconds
        return interval

    def _current_holder(self) -> str:
        try:
            stored = self._storage().get_with_etag(self.key)
        except OpsError:
            return "holder unknown"
        record = LeaseRecord.from_bytes(stored.data) if stored else None
        return record.describe() if record else "gone" if stored is None else "holder unknown"

    def _lose(self, reason: str) -> None:
        with self._guard:
            self._lost = self._lost or reason
        self._stop.set()

    def lost(self) -> str | None:
        """Why this run no longer holds the lease, or None while it does."""
        with self._guard:
            if self._lost is None and time.monotonic() >= self._held_until:
                self._lost = f"it was not renewed within {self.record.seconds:g}s"
            return self._lost

    def ensure_held(self) -> None:
        """Between steps: LeaseLost (exit 75) once this run lost the lease."""
        reason = self.lost()
        if reason is not None:
            raise LeaseLost(f"this run lost the lease on {self.resource} ({self.key} in the backup bucket): "
                            f"{reason}; it stopped before its next step so that two runs never apply at once",
                            hint="see what the other run did (`inv runs.list`), then run this again if still needed")

    def release(self) -> str | None:
        """Stop renewing and delete the lease if it is still ours; a warning when it could not be."""
        if self.released:
            return None
        self.released = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        try:  # even when lost by time alone: If-Match deletes it only if nobody took it over since
            self._storage().delete_if_match(self.key, self.etag)
        except PreconditionFailed:
            if self.lost() is not None:
                return None  # not ours any more: it belongs to whoever took it over
            return f"the lease {self.key} changed hands before it was released; left to its holder"
        except OpsError as error:
            return (f"the lease {self.key} could not be released ({redact(error.message)}); "
                    f"it expires by {iso_z(self.record.expires_at)}")
        return None


def held_by_other(resource: str, record: LeaseRecord | None, stored: StoredObject, where: str,
                  default_seconds: float) -> LockHeld:
    """Exit 75, naming the holder and since when, like the file lock's message."""
    holder = record.describe() if record else describe_holder(None)
    until = record.expires_at if record else stored.last_modified + timedelta(seconds=default_seconds)
    return LockHeld(f"{resource} is locked by {holder} (lease {lease_key(resource)} in {where}, "
                    f"held until {iso_z(until)} unless renewed)",
                    hint="wait for that run to finish; a lease whose holder died is taken over once it expires")


def acquire(storage: Callable[[], Storage], resource: str, holder: dict[str, Any], seconds: float,
            *, dead_run: str | None = None) -> tuple[Lease, Takeover | None]:
    """Take the lease on `resource`, or take over an expired one, or one of `dead_run` (a run whose file lock
    this run took over: it died on this machine); LockHeld when another run holds it. BucketNotFound (the
    bucket is not made yet) and connection errors go to the caller."""
    key = lease_key(resource)
    bucket = storage()
    for _attempt in range(ACQUIRE_ATTEMPTS):
        record, sent = new_record(holder, utc_now(), seconds), time.monotonic()
        try:
            etag = bucket.put_if_absent(key, record.to_bytes(), content_type=CONTENT_TYPE)
            return Lease(storage, resource, record, etag, sent_at=sent), None
        except PreconditionFailed:
            pass
        stored = bucket.get_with_etag(key)
        if stored is None:
            continue  # released between our two requests: create it again
        previous = LeaseRecord.from_bytes(stored.data)
        died_here = bool(dead_run) and previous is not None and previous.holder.get("run_id") == dead_run
        since = stored.last_modified if died_here else expired_since(previous, stored, seconds)
        if since is None:
            raise held_by_other(resource, previous, stored, bucket.describe(), seconds)
        record, sent = new_record(holder, utc_now(), seconds), time.monotonic()
        try:
            etag = bucket.put_if_match(key, record.to_bytes(), stored.etag, content_type=CONTENT_TYPE)
        except PreconditionFailed:
            continue  # another run renewed or took it over first: look again
        return Lease(storage, resource, record, etag, sent_at=sent), Takeover(previous, since, died_here)
    raise LockHeld(f"{resource}: its lease {key} in {bucket.describe()} changed hands {ACQUIRE_ATTEMPTS} times "
                   "while this run tried to take it", hint="another run is starting: retry in a minute")


@contextlib.contextmanager
def held(ctx: RunContext, resource: str, holder: dict[str, Any], *, dead_run: str | None = None) -> Iterator[None]:
    """Hold the lease on `resource` for the run of `ctx`, when its environment has one (see lease_storage);
    `dead_run`: the run whose file lock this run took over (its lease is taken over at once)."""
    storage = lease_storage(ctx.env)
    lease = takeover = None
    if storage is not None:
        lease, takeover = _take(storage, resource, holder, lease_seconds(ctx.env), dead_run)
    if lease is None:
        if storage is not None:
            ctx.journal.write("lease_skipped", resource=resource,
                              reason="the backup bucket does not exist yet: the file lock alone holds")
        yield
        return
    ctx.journal.write("lease_acquired", resource=resource, key=lease.key,
                      expires_at=iso_z_micro(lease.record.expires_at), lease_seconds=lease.record.seconds)
    if takeover is not None:
        ctx.journal.write("lease_taken_over", resource=resource, message=takeover.message(),
                          previous=takeover.previous.holder if takeover.previous else None,
                          expired_since=iso_z_micro(takeover.expired_since))
        ctx.output.warn(f"{resource}: {takeover.message()}")
    lease.start()
    ctx.guards.append(lease.ensure_held)
    ctx.once("leases", list).append(lease)
    try:
        yield
    finally:  # after the journal's last line (how the run ended): a release problem is only shown
        _let_go(ctx, lease)


def _let_go(ctx: RunContext, lease: Lease) -> None:
    if lease.ensure_held in ctx.guards:
        ctx.guards.remove(lease.ensure_held)
    warning = lease.release()
    if warning:
        ctx.output.warn(warning)


def release_now(ctx: RunContext, why: str) -> None:
    """Release the run's leases before its end: before a step revokes the keys they are written with
    (decommission), after which they could be neither renewed nor released. The run goes on without them."""
    for lease in ctx.once("leases", list):
        if not lease.released:
            _let_go(ctx, lease)
            ctx.journal.write("lease_released", resource=lease.resource, reason=why)


def _take(storage: Callable[[], Storage], resource: str, holder: dict[str, Any], seconds: float,
          dead_run: str | None) -> tuple[Lease | None, Takeover | None]:
    """acquire(), with no lease (None) while the backup bucket does not exist yet (`inv provision` makes it)."""
    try:
        return acquire(storage, resource, holder, seconds, dead_run=dead_run)
    except BucketNotFound:
        return None, None
    except LockHeld:
        raise
    except OpsError as error:  # met before the plan, like the database lock: a failed precondition
        raise CheckFailed(f"the run cannot start: it could not take its lease on {resource}: {error.message}",
                          where=error.where, hint=error.hint) from None
