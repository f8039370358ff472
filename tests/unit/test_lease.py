"""The lease's pure parts: its record, when it counts as expired, and what a refused or taking-over run says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ops.errors import LockHeld
from ops.lease import (
    DEFAULT_SECONDS,
    LeaseLost,
    LeaseRecord,
    Takeover,
    expired_since,
    held_by_other,
    lease_key,
    new_record,
)
from ops.storage import StoredObject

HOLDER = {"run_id": "20261201T020000Z-ab12", "runbook": "backup", "operator": "ops", "host": "cron1", "pid": 4242}
TAKEN = datetime(2026, 12, 1, 2, 0, 0, 250000, tzinfo=UTC)


def stored(record: LeaseRecord | None, *, written: datetime, now: datetime) -> StoredObject:
    data = record.to_bytes() if record else b"not a lease"
    return StoredObject(key=lease_key("environment"), data=data, etag="e1", last_modified=written, server_time=now)


def test_the_record_names_run_operator_host_and_both_times_and_reads_back():
    record = new_record(HOLDER, TAKEN, 120)
    assert record.expires_at == TAKEN + timedelta(seconds=120)
    text = record.to_bytes().decode()
    for expected in ('"run_id": "20261201T020000Z-ab12"', '"operator": "ops"', '"host": "cron1"',
                     '"acquired_at": "2026-12-01T02:00:00.250000Z"', '"expires_at": "2026-12-01T02:02:00.250000Z"'):
        assert expected in text, text
    assert LeaseRecord.from_bytes(record.to_bytes()) == record


def test_a_renewal_keeps_the_holder_and_since_when_and_moves_the_expiry():
    record = new_record(HOLDER, TAKEN, 30)
    later = TAKEN + timedelta(seconds=10)
    renewed = record.renewed(later)
    assert (renewed.holder, renewed.acquired_at, renewed.seconds) == (record.holder, record.acquired_at, 30)
    assert renewed.expires_at == later + timedelta(seconds=30)


def test_an_object_that_is_not_a_lease_reads_as_none():
    for data in (b"", b"not json", b"[1, 2]", b'{"run_id": "x"}', b'{"acquired_at": "x", "expires_at": "y"}',
                 b"\xff\xfe"):
        assert LeaseRecord.from_bytes(data) is None, data


def test_a_lease_holds_until_its_last_write_plus_its_time_by_the_servers_clock_one_second_late():
    record = new_record(HOLDER, TAKEN, 10)
    written = datetime(2026, 12, 1, 2, 0, 20, tzinfo=UTC)  # its last renewal, by the server's clock
    assert expired_since(record, stored(record, written=written, now=written + timedelta(seconds=10))) is None
    # the object's own expires_at (the writer's clock) plays no part: the machines' clocks need not agree
    at = written + timedelta(seconds=11)
    assert expired_since(record, stored(record, written=written, now=at)) == written + timedelta(seconds=10)


def test_an_unreadable_lease_expires_by_its_age_and_the_default_time():
    written = TAKEN
    assert expired_since(None, stored(None, written=written, now=written + timedelta(seconds=60))) is None
    since = expired_since(None, stored(None, written=written, now=written + timedelta(seconds=DEFAULT_SECONDS + 1)))
    assert since == written + timedelta(seconds=DEFAULT_SECONDS)


def test_a_refused_run_names_the_holder_and_since_when_and_exits_75():
    record = new_record(HOLDER, TAKEN, 120)
    error = held_by_other("environment", record, stored(record, written=TAKEN, now=TAKEN), "s3 bucket b/prod/", 120)
    assert isinstance(error, LockHeld) and error.exit_code == 75
    assert error.message.startswith("environment is locked by run 20261201T020000Z-ab12 (backup) by ops@cron1, "
                                    "pid 4242, since 2026-12-01T02:00:00Z (lease locks/environment.json in "
                                    "s3 bucket b/prod/"), error.message


def test_a_takeover_says_whose_lease_and_since_when_it_had_expired():
    record = new_record(HOLDER, TAKEN, 120)
    message = Takeover(record, TAKEN + timedelta(seconds=120)).message()
    assert message == ("took over the lease of run 20261201T020000Z-ab12 by ops@cron1, "
                       "expired since 2026-12-01T02:02:00Z")
    assert Takeover(None, TAKEN).message().startswith("took over the lease of an unknown run")


def test_a_lost_lease_is_a_lock_error():
    assert LeaseLost("lost").exit_code == 75 and issubclass(LeaseLost, LockHeld)


def test_a_takeover_of_a_run_that_died_here_says_so_rather_than_expired():
    record = new_record(HOLDER, TAKEN, 120)
    message = Takeover(record, TAKEN, died_here=True).message()
    assert message == ("took over the lease of run 20261201T020000Z-ab12 by ops@cron1, which died on this machine "
                       "(last renewed 2026-12-01T02:00:00Z)")
