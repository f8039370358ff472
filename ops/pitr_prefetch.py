"""Fetching archived WAL ahead of a scratch cluster's recovery: PostgreSQL asks its restore_command for one
segment at a time and waits for each, and barman-cloud-wal-restore is a new Python process per segment. The
segments recovery will read are fetched beforehand by the engine's own command, several at once and while
the base backup is being restored, into a spool folder beside the cluster; restore_command takes a segment
from there when it is present and otherwise asks the engine as before, so a segment not fetched ahead (or
whose fetch failed) is read as it always was, and every check of the recovery stays as it is.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ops import pitr_engine
from ops.pitr_engine import Engine

JOBS = 3  # concurrent fetches: each is mostly a Python start-up and a round trip to the bucket
LIMIT = 32  # segments fetched ahead at most (16 MB each): the spool's disk use is bounded
PART = ".part"


def restore_command(spool: Path, engine_command: str) -> str:
    """restore_command (with %f and %p): the segment from the spool folder when it was fetched ahead, else the
    engine's own command."""
    folder = shlex.quote(str(spool))
    return f"if [ -f {folder}/%f ]; then mv {folder}/%f %p; else {engine_command}; fi"


class Prefetch:
    """The fetches of one recovery; stop() ends those still running (their partial files are never used)."""

    def __init__(self, spool: Path, engine: Engine, os_user: str):
        self.spool = spool
        self.engine = engine
        self.os_user = os_user
        self.fetched: list[str] = []
        self._running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def fetch(self, segment: str) -> None:
        command = self.engine.wal_fetch_command(segment, segment + PART)
        base = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "PG"))}
        with self._lock:
            if self._stopping or command is None:
                return
            process = subprocess.Popen(pitr_engine.as_user(command, self.os_user), cwd=self.spool,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env={**base, **self.engine.credentials()}, start_new_session=True)
            self._running.add(process)
        try:
            fetched = process.wait() == 0
        finally:
            with self._lock:
                self._running.discard(process)
        if fetched and not self._stopping:  # a stopped fetch's file may be partial
            os.replace(self.spool / (segment + PART), self.spool / segment)
            self.fetched.append(segment)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            running = list(self._running)
        for process in running:
            pitr_engine.stop_group(process)


@contextlib.contextmanager
def fetching_ahead(directory: Path, engine: Engine, os_user: str, segments: list[str]) -> Iterator[Prefetch | None]:
    """Fetches `segments` into `directory`/wal-spool while the block runs (the base backup's restore and the
    recovery); what still runs when the block ends is stopped. None: the engine offers no command to fetch
    with, or there is nothing to fetch."""
    if not segments or engine.wal_fetch_command(segments[0], segments[0]) is None:
        yield None
        return
    spool = directory / "wal-spool"
    spool.mkdir(mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(spool, os_user, os_user)
    prefetch = Prefetch(spool, engine, os_user)
    pool = ThreadPoolExecutor(max_workers=JOBS, thread_name_prefix="wal-prefetch")
    try:
        for segment in segments:
            pool.submit(prefetch.fetch, segment)
        yield prefetch
    finally:
        prefetch.stop()
        pool.shutdown(wait=True, cancel_futures=True)
