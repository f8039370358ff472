"""Locks: one run per environment and resource at a time.

File locks use flock(2): the kernel releases them when the holder dies, so a lock
left by a killed run is taken over safely by the next one. The file also holds the
holder's identity so a refused run can name who holds it since when. Database work
also takes a PostgreSQL advisory lock (ops.pg.advisory_lock), which the server
releases when the holder's connection dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ops.errors import LockHeld


@contextlib.contextmanager
def file_lock(path: Path, holder: dict[str, Any], *, on_takeover: Callable[[dict[str, Any]], None] | None = None
              ) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(path, _read_holder(descriptor)) from None
        previous = _read_holder(descriptor)
        if previous and on_takeover:
            on_takeover(previous)  # its holder died without releasing: we now own it
        _write_holder(descriptor, holder)
        try:
            yield
        finally:
            _write_holder(descriptor, None)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _read_holder(descriptor: int) -> dict[str, Any] | None:
    os.lseek(descriptor, 0, os.SEEK_SET)
    raw = os.read(descriptor, 65536)
    try:
        return json.loads(raw) if raw.strip() else None
    except json.JSONDecodeError:
        return None


def _write_holder(descriptor: int, holder: dict[str, Any] | None) -> None:
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    if holder:
        os.write(descriptor, json.dumps(holder).encode())


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run (holder unknown)"
    return (f"run {holder.get('run_id', '?')} ({holder.get('runbook', '?')}) by "
            f"{holder.get('operator', '?')}@{holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('since', '?')}")


def _held(path: Path, holder: dict[str, Any] | None) -> LockHeld:
    resource = path.stem
    return LockHeld(f"{resource} is locked by {describe_holder(holder)}",
                    hint="wait for that run to finish (`inv runs.show ID` follows it); a lock whose holder "
                         "died is taken over automatically")
