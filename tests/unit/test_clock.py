from datetime import UTC, datetime, timedelta, timezone

import pytest

from ops.clock import compact_z, iso_z, iso_z_micro, parse_time, parse_time_or_none

MOMENT = datetime(2026, 11, 23, 2, 30, 5, 123456, tzinfo=UTC)


def test_formats_are_utc_with_a_z():
    east = MOMENT.astimezone(timezone(timedelta(hours=2)))
    assert iso_z(east) == "2026-11-23T02:30:05Z"
    assert iso_z_micro(east) == "2026-11-23T02:30:05.123456Z"
    assert compact_z(east) == "20261123T023005Z"
    assert compact_z(east, seconds=False) == "20261123T0230Z"


@pytest.mark.parametrize("text", ["2026-11-23T02:30:05Z", "2026-11-23T04:30:05+02:00", "2026-11-23T02:30:05"])
def test_parse_gives_aware_utc_and_takes_naive_text_as_utc(text):
    moment = parse_time(text)
    assert moment == MOMENT.replace(microsecond=0)
    assert moment.tzinfo is UTC


def test_parse_round_trips_the_formats():
    assert parse_time(iso_z_micro(MOMENT)) == MOMENT
    assert parse_time_or_none(datetime(2026, 1, 2)) == datetime(2026, 1, 2, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_time("yesterday")
