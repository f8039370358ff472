"""Secret values that never print themselves, and redaction of known secrets.

Every `Secret` registers its value with the process-wide `REDACTOR`, so any text
about to leave the process (log line, journal entry, error, JSON) can be passed
through `redact()` and loses every secret value we have seen, whatever its origin.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from ops.patterns import Pattern

MASK = "***"
# Shorter values would mask innocent words ("on", "app"); such values are weak
# secrets anyway and preflight warns about them.
MIN_REDACTED_LENGTH = 4

# scheme://user:PASSWORD@host — also the libpq keyword form password=...
# The lookbehind anchors the scheme at its start: without it a long run of letters is quadratic.
_URL_PASSWORD = Pattern(r"(?<![a-zA-Z0-9+.-])(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s/]+)(?P<tail>@)")
_KEYWORD_PASSWORD = Pattern(r"(?P<head>\bpassword\s*=\s*)(?P<secret>'[^']*'|\S+)", re.IGNORECASE)


class Secret:
    """A string that shows as *** in str, repr, format, f-strings and JSON."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        if isinstance(value, Secret):
            value = value.reveal()
        self._value = str(value)
        REDACTOR.add(self._value)

    def reveal(self) -> str:
        """The real value: only for handing to a library or a child process."""
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self):
        raise TypeError("a Secret cannot be pickled or serialised")


class Redactor:
    """The set of secret values seen in this process; removes them from text."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if len(value) < MIN_REDACTED_LENGTH:
            return
        with self._lock:
            if value not in self._values:
                self._values.add(value)
                self._pattern = None

    def _compiled(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._pattern is None and self._values:
                # Longest first so a secret containing another is masked whole.
                ordered = sorted(self._values, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
            return self._pattern

    def redact(self, text: str) -> str:
        pattern = self._compiled()
        if pattern is not None:
            text = pattern.sub(MASK, text)
        text = mask_url_passwords(text)
        return _KEYWORD_PASSWORD.sub(lambda m: m["head"] + MASK, text)


REDACTOR = Redactor()


def mask_url_passwords(text: str) -> str:
    """Only the password part of each URL in `text`: user, host and database stay readable."""
    return _URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["tail"], text)


def redact(text: Any) -> str:
    """`text` as a string with every known secret and URL password masked."""
    return REDACTOR.redact(str(text))


def reveal(value: Any) -> Any:
    """The real value of a Secret, or the value itself when it is not one."""
    return value.reveal() if isinstance(value, Secret) else value


def masked(value: Any) -> Any:
    """A JSON-safe copy of `value` with Secrets replaced by the mask and text redacted."""
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, dict):
        return {str(k): masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def mask_identifier(value: str, visible: int = 4) -> str:
    """Key ids and the like: enough to tell them apart, not enough to use them."""
    if len(value) <= visible * 2:
        return MASK
    return f"{value[:visible]}…{value[-visible:]}"
