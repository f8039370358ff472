"""WAL positions (LSNs) for `inv restore --to-lsn`: PostgreSQL's `X/Y` text, and the span of WAL a segment
file holds, so a target can be checked against the archive before anything changes (pure)."""

from __future__ import annotations

from ops.lazy_dataclasses import dataclass
from ops.patterns import Pattern

_LSN = Pattern(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_LOG_SIZE = 0x100000000  # bytes of WAL per "log" (the middle 8 hex digits of a segment's name)


@dataclass(frozen=True, order=True)
class Lsn:
    """A position in the WAL, in bytes."""

    value: int

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """`16/B374D848` as pg_current_wal_lsn() prints it; ValueError otherwise."""
        match = _LSN.search(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not an LSN")
        return cls(int(match[1], 16) * _LOG_SIZE + int(match[2], 16))

    def __str__(self) -> str:
        return f"{self.value // _LOG_SIZE:X}/{self.value % _LOG_SIZE:X}"


def parse_or_none(text: str | None) -> Lsn | None:
    if not text:
        return None
    try:
        return Lsn.parse(text)
    except ValueError:
        return None


def segment_start(name: str, segment_size: int) -> Lsn:
    """Where the WAL segment file `name` (timeline, log, segment in hex) begins."""
    return Lsn(int(name[8:16], 16) * _LOG_SIZE + int(name[16:24], 16) * segment_size)


def segment_end(name: str, segment_size: int) -> Lsn:
    """The first position after segment `name`: everything before it is in that file or an earlier one."""
    return Lsn(segment_start(name, segment_size).value + segment_size)
