"""The lock across machines: a lease object in the backup bucket (moto's S3, with its conditional writes).

Two "machines" are two workspaces with their own OPS_HOME (so no file lock is shared) on the same bucket
and database. While the first run holds the environment, paused in its dump on a locked table, the second
exits 75 naming the holder; once the first is killed (SIGKILL: no release) and its lease expired, the
second takes the lease over, says so, and succeeds. A run whose lease was taken over stops before its
next step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.cli import Opsbook, wait_for
from tests.fixtures.processes import children

LEASE_SECONDS = 3  # renewed every second; a dead holder's lease is taken over 4 s after its last renewal
LEASE_KEY = "staging/locks/environment.json"


@pytest.fixture
def machines(tmp_path: Path, postgres_server: Any, s3_server: Any) -> Iterator[dict[str, Any]]:
    """Two workspaces on one database and one backup bucket, and a session that locks the table the dump
    needs (so a backup waits in its dump step until `unblock()`)."""
    database_url = postgres_server.create_database()
    with psycopg.connect(database_url.reveal(), autocommit=True) as connection:
        connection.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 100) g")
    bucket = s3_server.make_bucket()
    inventory = {"project": "leasetest", "default_env": "staging", "envs": {"staging": {
        "database": {"url": "${env:DB_URL}"},
        "backups": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": bucket.bucket, "prefix": "staging/", "access_key_id": s3_server.access_key_id,
                    "secret_access_key": "${env:S3_SECRET}"},
        "locks": {"lease_seconds": LEASE_SECONDS}}}}
    workspaces = []
    for name in ("first", "second"):
        workspace = Opsbook(tmp_path / name)
        workspace.root.mkdir()
        workspace.environ.update({"DB_URL": database_url.reveal(), "S3_SECRET": s3_server.secret_access_key.reveal()})
        workspace.write_inventory(inventory)
        workspaces.append(workspace)
    blocker = psycopg.connect(database_url.reveal())
    blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    try:
        yield {"first": workspaces[0], "second": workspaces[1], "bucket": bucket.bucket,
               "s3": s3_server.client(), "unblock": blocker.rollback}
    finally:
        blocker.close()


def dumping(workspace: Opsbook, process: subprocess.Popen) -> bool:
    """The backup holds its lease and waits in its dump step (or ended: the caller checks)."""
    if process.poll() is not None:
        return True
    if not workspace.journals():
        return False
    journal = workspace.journal(workspace.latest_run_id())
    return any(e.get("step") == "dump" and e.get("state") == "started" for e in journal)


def kill_machine(process: subprocess.Popen) -> None:
    """The machine dies: the CLI and its children (pg_dump) get SIGKILL, nothing is released."""
    for pid in children(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.kill()
    process.wait()


def times(journal: list[dict[str, Any]], **match: Any) -> list[str]:
    return [e["time"] for e in journal if match.items() <= e.items()]


def test_a_second_machine_is_refused_then_takes_over_the_lease_of_a_killed_holder(machines: dict[str, Any]) -> None:
    first, second = machines["first"], machines["second"]
    holder = first.start("backup", "--env", "staging")
    try:
        wait_for(lambda: dumping(first, holder), timeout=60, what="the first backup to wait in its dump")
        assert holder.poll() is None, first.collect(holder)
        holder_run = first.latest_run_id()

        refused = second.run("backup", "--env", "staging")
        assert refused.exit_code == 75, refused
        assert (f"environment is locked by run {holder_run} (backup) by tester@{socket.gethostname()}, pid "
                f"{holder.pid}, since ") in refused.stderr, refused
        assert "locks/environment.json" in refused.stderr and "Traceback" not in refused.output, refused
        refused_journal = second.journal(second.latest_run_id())
        assert times(refused_journal, state="started") == [], refused_journal
        assert refused_journal[-1]["exit_code"] == 75, refused_journal[-1]

        kill_machine(holder)
    finally:
        if holder.poll() is None:
            kill_machine(holder)
        machines["unblock"]()
    killed_journal = first.journal(holder_run)
    assert killed_journal[-1]["state"] == "started" and killed_journal[-1]["step"] == "dump", killed_journal[-1]
    lease = json.loads(machines["s3"].get_object(Bucket=machines["bucket"], Key=LEASE_KEY)["Body"].read())
    assert (lease["run_id"], lease["operator"], lease["host"]) == (holder_run, "tester", socket.gethostname())

    time.sleep(LEASE_SECONDS + 2)  # its last renewal was at most a second before the kill
    taken_over = second.run("backup", "--env", "staging", "--json")
    assert taken_over.exit_code == 0, taken_over
    assert taken_over.json()["status"] == "succeeded", taken_over
    assert (f"took over the lease of run {holder_run} by tester@{socket.gethostname()}, expired since "
            in taken_over.stderr), taken_over
    journal = second.journal(second.latest_run_id())
    (takeover,) = [e for e in journal if e["event"] == "lease_taken_over"]
    assert takeover["previous"]["run_id"] == holder_run, takeover
    shown = second.run("runs.show", second.latest_run_id())
    assert f"lease_taken_over — took over the lease of run {holder_run}" in shown.stderr, shown

    # no overlap: every step of the second began after the killed run's last word and the takeover
    began = times(journal, state="started")
    assert began and max(e["time"] for e in killed_journal) < takeover["time"] < min(began), (killed_journal, journal)
    listed = machines["s3"].list_objects_v2(Bucket=machines["bucket"], Prefix="staging/locks/")
    assert listed.get("KeyCount") == 0, listed  # released


def test_a_run_whose_lease_was_taken_over_stops_before_its_next_step(machines: dict[str, Any]) -> None:
    first, s3, bucket = machines["first"], machines["s3"], machines["bucket"]
    run = first.start("backup", "--env", "staging")
    try:
        wait_for(lambda: dumping(first, run), timeout=60, what="the backup to wait in its dump")
        assert run.poll() is None, first.collect(run)
        # Another machine takes the lease over (as after a pause longer than the lease: a suspended laptop).
        current = s3.head_object(Bucket=bucket, Key=LEASE_KEY)["ETag"]
        s3.put_object(Bucket=bucket, Key=LEASE_KEY, Body=b'{"run_id": "other"}', IfMatch=current)
        time.sleep(LEASE_SECONDS * 2 / 3 + 0.5)  # a renewal has tried and failed
        machines["unblock"]()
        result = first.collect(run, timeout=60)
    finally:
        if run.poll() is None:
            kill_machine(run)
    assert result.exit_code == 75, result
    assert "this run lost the lease on environment" in result.stderr and "another run took it over" in result.stderr
    assert "Traceback" not in result.output, result
    journal = first.journal(first.latest_run_id())
    assert times(journal, step="globals", state="started") == [], journal  # stopped at the step boundary
    assert {"step": "globals", "state": "failed"}.items() <= journal[-2].items(), journal[-2:]
    assert "lost the lease" in journal[-2]["reason"] and journal[-1]["exit_code"] == 75, journal[-2:]
    assert times(journal, state="undone") == [], journal  # the other run may be applying: nothing is undone
    # the lease is left to the run that took it over
    assert s3.get_object(Bucket=bucket, Key=LEASE_KEY)["Body"].read() == b'{"run_id": "other"}'


def test_on_the_same_machine_the_lease_of_a_killed_run_is_taken_over_at_once(machines: dict[str, Any]) -> None:
    """Its file lock, left by the dead run, proves that run dead: its resume need not wait for the lease to expire."""
    first = machines["first"]
    holder = first.start("backup", "--env", "staging")
    try:
        wait_for(lambda: dumping(first, holder), timeout=60, what="the backup to wait in its dump")
        assert holder.poll() is None, first.collect(holder)
    finally:
        kill_machine(holder)
        machines["unblock"]()
    killed = first.latest_run_id()
    resumed = first.run("runs.resume", killed)
    assert resumed.exit_code == 0, resumed
    assert (f"took over the lease of run {killed} by tester@{socket.gethostname()}, which died on this machine"
            in resumed.stderr), resumed
