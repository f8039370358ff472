"""Fetching archived WAL ahead of a scratch cluster's recovery: PostgreSQL asks its restore_command for one
file at a time and waits for each, and barman-cloud-wal-restore is a new Python process per segment. The
segments recovery will read are fetched beforehand by the engine's own code, while the base backup is being
restored, into a spool folder beside the cluster: by one engine process for them all where the engine offers
that, else several of its per-segment commands at once. restore_command takes a segment from the spool when
it is there and otherwise asks the engine as before, so a segment not fetched ahead (or whose fetch failed)
is read as it always was, and every check of the recovery stays as it is.

Timeline history files the archive's listing does not hold are answered "absent" at once: recovery probes
for the next timeline's (and its parent's) when it promotes, and each probe would start the engine.
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

JOBS = 3  # concurrent per-segment fetches: each is mostly a Python start-up and a round trip to the bucket
LIMIT = 32  # segments fetched ahead at most (16 MB each): the spool's disk use is bounded
PART = ".part"
ARCHIVED_HISTORY = "archived-history"  # the history files the archive's listing holds, one name a line


def restore_command(spool: Path, engine_command: str) -> str:
    """restore_command (with %f and %p): a history file the archive does not hold is absent; a file fetched
    ahead comes from the spool (copied: recovery asks again for the last segment when it ends); anything else
    from the engine's own command. A fetched file that cannot be copied exits 126, which PostgreSQL takes as
    a failure of the command, not as the end of the archive: the recovery fails instead of ending early."""
    folder = shlex.quote(str(spool))
    return (f"case %f in *.history) grep -qxF %f {folder}/{ARCHIVED_HISTORY} || exit 1;; esac; "
            f"if [ -f {folder}/%f ]; then cp {folder}/%f %p || exit 126; else {engine_command}; fi")


class Prefetch:
    """The fetches of one recovery; stop() ends those still running (their partial files are never used)."""

    def __init__(self, spool: Path, engine: Engine, os_user: str, pool: ThreadPoolExecutor):
        self.spool = spool
        self._pool = pool
        self.engine = engine
        self.os_user = os_user
        self.fetched: list[str] = []
        self._running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def _start(self, command: list[str]) -> subprocess.Popen[bytes] | None:
        base = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "PG"))}
        with self._lock:
            if self._stopping:
                return None
            process = subprocess.Popen(pitr_engine.as_user(command, self.os_user), cwd=self.spool,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       env={**base, **self.engine.credentials()}, start_new_session=True)
            self._running.add(process)
        return process

    def _done(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._running.discard(process)

    def fetch(self, segment: str) -> None:
        """One segment by the engine's per-segment command, renamed into the spool once complete."""
        command = self.engine.wal_fetch_command(segment, segment + PART)
        process = self._start(command) if command is not None else None
        if process is None:
            return
        try:
            process.communicate()
            fetched = process.returncode == 0
        finally:
            self._done(process)
        if fetched and not self._stopping:  # a stopped fetch's file may be partial
            os.replace(self.spool / (segment + PART), self.spool / segment)
            self.fetched.append(segment)

    def fetch_all(self, command: list[str]) -> None:
        """Every segment by one engine process, which renames each into the spool and prints its name."""
        process = self._start(command)
        if process is None:
            return
        try:
            for line in process.stdout or ():
                self.fetched.append(line.decode(errors="replace").strip())
            process.wait()
        finally:
            self._done(process)

    def add(self, segments: list[str]) -> None:
        """More segments, found after the fetches began (the seal's), fetched the same way."""
        batch = self.engine.wal_batch_fetch_command(segments)
        if batch is not None:
            self._pool.submit(self.fetch_all, batch)
        else:
            for segment in segments:
                self._pool.submit(self.fetch, segment)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            running = list(self._running)
        for process in running:
            pitr_engine.stop_group(process)


@contextlib.contextmanager
def fetching_ahead(directory: Path, engine: Engine, os_user: str, segments: list[str],
                   history: frozenset[str]) -> Iterator[Prefetch | None]:
    """Fetches `segments` into `directory`/wal-spool while the block runs (the base backup's restore and the
    recovery); what still runs when the block ends is stopped. `history`: the timeline history files the
    archive holds. None: the engine offers no command to fetch with, or there is nothing to fetch."""
    batch = engine.wal_batch_fetch_command(segments) if segments else None
    if not segments or (batch is None and engine.wal_fetch_command(segments[0], segments[0]) is None):
        yield None
        return
    spool = directory / "wal-spool"
    spool.mkdir(mode=0o700)
    (spool / ARCHIVED_HISTORY).write_text("".join(f"{name}\n" for name in sorted(history)))
    if os.geteuid() == 0:
        for path in (spool, spool / ARCHIVED_HISTORY):
            shutil.chown(path, os_user, os_user)
    pool = ThreadPoolExecutor(max_workers=1 if batch else JOBS, thread_name_prefix="wal-prefetch")
    prefetch = Prefetch(spool, engine, os_user, pool)
    try:
        prefetch.add(segments)
        yield prefetch
    finally:
        prefetch.stop()
        pool.shutdown(wait=True, cancel_futures=True)
