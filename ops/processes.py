"""Local child processes (pg_dump, pg_restore) that never outlive the run that started them.

SIGINT and SIGTERM unwind a run as KeyboardInterrupt (ops.cli installs the handler). One that lands
while a child is being started — after the fork, before the caller holds the Popen object — would
leave the child running with nobody to stop it; so the interrupt is held for that moment and raised
right after, where the caller's clean-up can see the child.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class CannotStart(Exception):
    """The command could not be started (not found, not executable); `error` says why."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.error = error


class _Held:
    depth = 0
    pending = False


def interrupt_held() -> bool:
    """Called by the signal handler: whether to hold this interrupt (it is raised when the section ends)."""
    if _Held.depth:
        _Held.pending = True
        return True
    return False


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM's KeyboardInterrupt until the block ends (signals reach the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        if not _Held.depth and _Held.pending:
            _Held.pending = False
            raise KeyboardInterrupt


@contextmanager
def child_process(command: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Start `command`; if the block is left by any exception, an interrupt included, kill and reap it.

    A command that cannot be started raises CannotStart, for the caller to explain."""
    process: subprocess.Popen[bytes] | None = None
    try:
        with interrupts_held():
            try:
                process = subprocess.Popen(command, **popen)
            except OSError as error:
                raise CannotStart(error) from None
        yield process
    except BaseException:
        if process is not None:
            stop(process)
        raise


def stop(process: subprocess.Popen[bytes], seconds: float = 10) -> None:
    """Kill `process` if it still runs and reap it, so no zombie or orphan is left."""
    if process.poll() is None:
        with contextlib.suppress(OSError):
            process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=seconds)
