"""Pure parts of the Neon provider: the history window, the nearest manifest, a branch fit to restore."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from ops import neon, neon_restore
from ops.errors import CheckFailed, UsageError

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("moment", "inside"), [
    (NOW, True), (NOW - timedelta(hours=24), True), (NOW - timedelta(hours=24, seconds=1), False),
    (NOW + timedelta(seconds=1), False),
])
def test_history_window(moment: datetime, inside: bool) -> None:
    assert neon.in_history_window(moment, NOW, 86400) is inside


def test_a_time_outside_the_window_is_refused_naming_the_window() -> None:
    with pytest.raises(CheckFailed) as refused:
        neon.refuse_outside_window(NOW - timedelta(days=2), NOW, 86400, "calm-sky")
    assert refused.value.exit_code == 3
    assert "2026-11-29T12:00:00Z is outside Neon project calm-sky's history window" in refused.value.message
    assert "2026-11-30T12:00:00Z to now" in refused.value.message


def manifest(hours_ago: float) -> SimpleNamespace:
    return SimpleNamespace(id=f"b{hours_ago}", finished=NOW - timedelta(hours=hours_ago))


def test_the_nearest_manifest_is_the_newest_before_else_the_oldest_after() -> None:
    manifests = [manifest(1), manifest(5), manifest(30)]
    assert neon_restore.nearest_manifest(manifests, NOW - timedelta(hours=4)).id == "b5"
    assert neon_restore.nearest_manifest(manifests, NOW - timedelta(hours=48)).id == "b30"
    assert neon_restore.nearest_manifest([], NOW) is None


def test_branch_problems_name_missing_and_emptied_tables_only() -> None:
    expected = {"public.Brand": 20, "public.Image": 0, "public.User": 3}
    assert neon_restore.branch_problems(expected, {"public.Brand": 25, "public.Image": 0, "public.User": 1}) == []
    assert neon_restore.branch_problems(expected, {"public.Brand": 0, "public.Image": 0}) == [
        "public.User: missing", "public.Brand: empty (the backup had 20 rows)"]


def test_to_time_parses_iso_times_and_refuses_others() -> None:
    assert neon_restore.target_time("2026-11-23T17:00:00Z") == datetime(2026, 11, 23, 17, 0, tzinfo=UTC)
    with pytest.raises(UsageError):
        neon_restore.target_time("yesterday")
