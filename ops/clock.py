"""Time in one place: the current UTC moment, ISO-8601 'Z' text, and parsing it back.

Every stored or shown time is UTC. Parsing is strict about the result (always an
aware UTC datetime) and lenient about the input ('Z' or an offset; a time without
a zone is taken as UTC, never as the machine's local time).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_z(moment: datetime) -> str:
    """ISO-8601 UTC with a Z, to the second (manifests, incidents, reports)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_z_micro(moment: datetime) -> str:
    """ISO-8601 UTC with a Z, to the microsecond (journal lines, lock files)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_z_or_none(moment: datetime | None) -> str | None:
    return iso_z(moment) if moment else None


def compact_z(moment: datetime, seconds: bool = True) -> str:
    """Sortable UTC stamp for ids and names: 20261123T020000Z (or 20261123T0200Z without seconds)."""
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ" if seconds else "%Y%m%dT%H%MZ")


def as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_time(text: str) -> datetime:
    """ISO-8601 text ('Z' accepted) as an aware UTC datetime; raises ValueError when it is not a time."""
    return as_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))


def parse_time_or_none(value: Any) -> datetime | None:
    """A datetime, ISO text or nothing from a provider's API: UTC, or None when absent or unreadable."""
    if isinstance(value, datetime):
        return as_utc(value)
    if not value:
        return None
    try:
        return parse_time(str(value))
    except ValueError:
        return None
