"""Human lines on stderr, one JSON result on stdout with --json; all redacted."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

from ops.progress_bar import ProgressBar
from ops.secrets import Secret, masked, redact

_printed_results = 0  # a task prints one JSON object: the error report is skipped after a result
_captured: list[dict[str, Any]] | None = None  # results kept, not printed (one environment of several)

SYMBOLS = {"pass": "ok  ", "fail": "FAIL", "warn": "warn", "skip": "skip", "info": "    "}


class Output:
    def __init__(self, *, json_mode: bool = False, stream: TextIO | None = None, result_stream: TextIO | None = None):
        self.json_mode = json_mode
        self._stream = stream
        self._result_stream = result_stream

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def line(self, text: str = "") -> None:
        print(redact(text), file=self.stream, flush=True)

    def reveal_once(self, heading: str, secret: Secret) -> None:
        """The one place a secret is shown unmasked (a generated password the operator must keep)."""
        print(f"\n{heading}\n\n    {secret.reveal()}\n", file=self.stream, flush=True)

    def document(self, text: str, end: str = "\n") -> None:
        """What the command exists to print (merged YAML, a checklist): on stdout, redacted, with or without --json."""
        print(redact(text), end=end, file=self._result_stream or sys.stdout, flush=True)

    def info(self, text: str) -> None:
        self.line(text)

    def warn(self, text: str) -> None:
        self.line(f"warning: {text}")

    def check(self, status: str, name: str, detail: str = "") -> None:
        self.line(f"{SYMBOLS.get(status, status):4} {name}" + (f" — {detail}" if detail else ""))

    def result(self, payload: dict[str, Any]) -> None:
        """The machine-readable result: printed on stdout only with --json."""
        global _printed_results
        if self.json_mode:
            _printed_results += 1
            if _captured is not None:
                _captured.append(masked(payload))
                return
            stream = self._result_stream or sys.stdout
            print(json.dumps(masked(payload), indent=2, default=str), file=stream, flush=True)

    def progress(self, log: Callable[[str], None], verb: str, *, total_bytes: int | None = None) -> Progress:
        """The reporter of one long transfer: a bar when a person watches stderr (a terminal, no --json),
        otherwise the plain periodic lines in `log` that cron logs and tests read."""
        if not self.json_mode and _is_terminal(self.stream):
            return ProgressBar(self.stream, verb, total_bytes=total_bytes)
        return ProgressLines(log, verb)

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        cells = [[redact(str(cell)) for cell in row] for row in rows]
        widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
        self.line("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        for row in cells:
            self.line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def results_printed() -> int:
    return _printed_results


@contextmanager
def captured_results() -> Iterator[list[dict[str, Any]]]:
    """The JSON results meanwhile are kept in the list it yields instead of printed: a run over several
    environments prints one object holding each environment's result."""
    global _captured
    outer, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = outer


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream: no bar
        return False


class Progress(Protocol):
    """The progress reporter of long transfers: bytes so far, or a count done of its total
    (`size`: the bytes of those done); `close` when the transfer ends, however it ends."""

    def __call__(self, done: int, total: int | None = None, *, size: int | None = None) -> None: ...

    def close(self) -> None: ...


class ProgressLines:
    """The progress reporter without a terminal: plain lines in the run's log, never a flood.

    Called with bytes so far ("uploaded 512 MiB (95 MiB/s)"), it writes at most every `every` seconds;
    called with a count and its total ("120/400 objects copied"), once per tenth done, for 20 items or more.
    """

    def __init__(self, log: Callable[[str], None], verb: str, every: float = 10.0):
        self._log, self._verb, self._every = log, verb, every
        self._started = self._last = time.monotonic()
        self._tenth = 0

    def __call__(self, done: int, total: int | None = None, *, size: int | None = None) -> None:
        if total is not None:
            self._count(done, total)
            return
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            rate = done / max(now - self._started, 1e-6)
            self._log(f"{self._verb} {human_size(done)} ({human_size(int(rate))}/s)")

    def _count(self, done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth > self._tenth and total >= 20:
            self._tenth = tenth
            self._log(f"{done}/{total} {self._verb}")

    def close(self) -> None:
        """Nothing is pending: every line is written when it is due."""
