"""Regular expressions compiled on first use, not when their module is imported.

Listing tasks imports every module; compiling their patterns there would cost start-up for
expressions most commands never run. `Pattern(...)` stands where `re.compile(...)` did and
answers the same methods (search, match, fullmatch, sub, finditer, ...).
"""

from __future__ import annotations

import re
from typing import Any, AnyStr, Generic


class Pattern(Generic[AnyStr]):
    """`re.compile(pattern, flags)`, compiled the first time one of its methods is called."""

    __slots__ = ("_compiled", "flags", "pattern")

    def __init__(self, pattern: AnyStr, flags: int = 0) -> None:
        self.pattern = pattern
        self.flags = flags
        self._compiled: re.Pattern[AnyStr] | None = None

    def compiled(self) -> re.Pattern[AnyStr]:
        if self._compiled is None:  # two threads racing compile the same pattern twice: harmless
            self._compiled = re.compile(self.pattern, self.flags)
        return self._compiled

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled(), name)

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r}, {self.flags})"
