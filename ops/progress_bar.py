"""The progress reporter on a terminal: a rich bar with bytes, rate and ETA (and objects for a copy).

The connector of `rich`, imported only when a bar is first drawn: `inv --list` and every run
without a terminal (cron, --json, the tests' pipes) never load it. The same calls as
ops.output.ProgressLines: bytes so far, or a count and its total with the bytes so far.
"""

from __future__ import annotations

import threading
import time
from typing import Any, TextIO

REFRESHES_PER_SECOND = 4


class ProgressBar:
    """One transfer's bar, started at its first report and stopped when it is complete or closed."""

    def __init__(self, stream: TextIO, verb: str, *, total_bytes: int | None = None):
        self._stream, self._verb, self._total_bytes = stream, verb, total_bytes or None
        self._lock = threading.Lock()
        self._progress: Any = None
        self._task: Any = None
        self._closed = False
        self._started = time.monotonic()

    def __call__(self, done: int, total: int | None = None, *, size: int | None = None) -> None:
        """`done` bytes; or `done` of `total` objects, `size` bytes of them."""
        with self._lock:
            if self._closed:
                return
            starting = self._progress is None
            if starting:
                self._make(counted=total is not None)
            moved = done if total is None else size or 0
            self._progress.update(self._task, completed=moved, done=done, of=total, rate=self._rate(moved))
            if starting:  # drawn from the first figures on
                self._progress.start()
            if self._finished(done, total):
                self._stop()

    def _rate(self, moved: int) -> str:
        """Over the whole transfer so far, as the plain lines count it (rich's own needs two samples)."""
        from rich.filesize import decimal

        return f"{decimal(int(moved / max(time.monotonic() - self._started, 1e-6)))}/s"

    def _finished(self, done: int, total: int | None) -> bool:
        if total is not None:
            return done >= total
        return self._total_bytes is not None and done >= self._total_bytes

    def _make(self, *, counted: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        columns: list[Any] = [TextColumn("     {task.description}"), BarColumn(), TaskProgressColumn()]
        if counted:
            columns.append(TextColumn("{task.fields[done]}/{task.fields[of]} objects"))
        columns += [DownloadColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
        console = Console(file=self._stream, stderr=True)
        self._progress = Progress(*columns, console=console, refresh_per_second=REFRESHES_PER_SECOND)
        self._task = self._progress.add_task(self._verb, total=self._total_bytes, done=0, of=0, rate="")

    def _stop(self) -> None:
        self._closed = True
        if self._progress is not None:
            self._progress.stop()  # draws the last state and leaves it on the screen

    def close(self) -> None:
        """The transfer ended (or failed): stop drawing, the bar as it stands stays visible."""
        with self._lock:
            if not self._closed:
                self._stop()
