"""Pings to the environment's monitor (healthchecks.io protocol) around real task runs, through the real CLI, on
real PostgreSQL and moto S3, received by a local HTTP server that records every request."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from ops.locks import file_lock
from tests.cli import REPOSITORY, Opsbook, wait_for
from tests.fixtures.backups import backups_section, write_inventory
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.shop import make_database, unprivileged_url
from tests.fixtures.ssh import free_port

T = TypeVar("T")
TOKEN = "5f0c1d2e-ping-token-9a8b"  # the ping URL's path: a credential, never shown


def pings(receiver: Any) -> list[tuple[str, str, str]]:
    """(path without the token's prefix, rid, body) of every request the receiver got, in order."""
    seen = []
    for request in receiver.requests:
        parts = urlsplit(request.path)
        seen.append((parts.path.removeprefix(f"/ping/{TOKEN}"), parse_qs(parts.query)["rid"][0],
                     request.body.decode()))
    return seen


@pytest.fixture
def pinged(opsbook: Opsbook, postgres_server: Any, s3_server: Any, webhook_receiver: Any) -> dict[str, Any]:
    """`staging` backs up a real database to moto, its monitor is the local receiver (its URL an ${env:…})."""
    name, url = make_database(postgres_server)
    bucket = s3_server.make_bucket().bucket
    opsbook.environ["PING_URL"] = webhook_receiver.url(f"/ping/{TOKEN}")

    def write(**monitor_section: Any) -> None:
        write_inventory(opsbook, s3_server, {"staging": {
            "backups": backups_section(s3_server.endpoint, bucket, "staging/"),
            "monitor": monitor_section or {"url": "${env:PING_URL}", "timeout": 2}}}, {"staging": url})

    write()
    return {"database": name, "url": url, "write": write,
            "secrets": [postgres_server.password.reveal(), s3_server.secret_access_key.reveal(), TOKEN]}


def assert_nothing_leaked(opsbook: Opsbook, receiver: Any, secrets: list[str]) -> None:
    assert_no_secret(opsbook, *secrets)
    assert_no_secret("\n".join(body for _path, _rid, body in pings(receiver)), *secrets)


def test_a_successful_backup_pings_start_then_success_with_its_run_id(opsbook, pinged, webhook_receiver):
    dry = opsbook.run("backup", "--env", "staging", "--dry-run")
    assert dry.exit_code == 0, dry
    assert webhook_receiver.requests == []  # dry runs do not ping

    made = opsbook.run("backup", "--env", "staging", "--json")
    assert made.exit_code == 0, made
    run_id = made.json()["run_id"]
    (start, start_rid, start_body), (end, end_rid, end_body) = pings(webhook_receiver)
    assert (start, end) == ("/start", "") and start_rid == end_rid
    assert f"run {run_id}" in start_body and f"run {run_id}" in end_body  # the journal's run: `inv runs.show ID`
    assert "backup on staging: succeeded (exit 0)" in end_body
    assert all(r.headers["Content-Type"].startswith("text/plain") for r in webhook_receiver.requests)
    assert "warning" not in made.stderr
    assert_nothing_leaked(opsbook, webhook_receiver, pinged["secrets"])

    listed = opsbook.run("backup.list", "--env", "staging")  # not a scheduled job: monitor.url is not its check
    assert listed.exit_code == 0 and len(webhook_receiver.requests) == 2, listed


def test_a_failing_step_pings_exit_1_and_a_refused_check_exit_3(opsbook, pinged, postgres_server,
                                                                webhook_receiver):
    opsbook.environ["DB_URL_STAGING"], password = unprivileged_url(postgres_server, pinged["database"])
    failed = opsbook.run("backup", "--env", "staging")
    assert failed.exit_code == 1, failed
    (start, _, _), (end, _, body) = pings(webhook_receiver)
    assert (start, end) == ("/start", "/1")
    assert "backup on staging: failed (exit 1)" in body and "permission denied" in body

    webhook_receiver.reset()
    opsbook.environ["DB_URL_STAGING"] = f"postgresql://nobody:{password}@127.0.0.1:{free_port()}/nowhere"
    unreachable = opsbook.run("backup", "--env", "staging")
    assert unreachable.exit_code == 3, unreachable
    assert [path for path, _rid, _body in pings(webhook_receiver)] == ["/start", "/3"]
    assert "check failed (exit 3)" in pings(webhook_receiver)[1][2]
    assert_nothing_leaked(opsbook, webhook_receiver, [password, *pinged["secrets"]])


def interrupted_mid_dump(url: Any, start: Callable[[], subprocess.Popen], finish: Callable[[subprocess.Popen], T]) -> T:
    """Starts a backup with `start()` while a lock makes its pg_dump wait, sends it SIGINT once it waits, and returns
    what `finish(process)` makes of it."""
    with psycopg.connect(url.reveal(), autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS items AS SELECT g AS id FROM generate_series(1, 100) g")
    blocker = psycopg.connect(url.reveal())
    blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")  # pg_dump waits for it: the backup is mid-dump
    process = start()
    try:
        wait_for(lambda: dump_waiting(url) or process.poll() is not None, timeout=60,
                 what="the backup to wait for the table's lock")
        assert process.poll() is None, finish(process)
        process.send_signal(signal.SIGINT)
        return finish(process)
    finally:
        blocker.rollback()
        blocker.close()
        if process.poll() is None:
            process.kill()


def test_an_interrupted_backup_pings_exit_130(opsbook, pinged, webhook_receiver):
    result = interrupted_mid_dump(pinged["url"], lambda: opsbook.start("backup", "--env", "staging"),
                                  lambda process: opsbook.collect(process, timeout=60))
    assert result.exit_code == 130, result
    (start, rid, _), (end, end_rid, body) = pings(webhook_receiver)
    assert (start, end, rid) == ("/start", "/130", end_rid)
    assert "backup on staging: interrupted (exit 130)" in body
    assert_nothing_leaked(opsbook, webhook_receiver, pinged["secrets"])


def dump_waiting(url: Any) -> bool:
    with psycopg.connect(url.reveal(), autocommit=True) as connection:
        return bool(connection.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                       "AND wait_event_type = 'Lock'").fetchone()[0])


def test_an_unreachable_monitor_warns_once_per_ping_and_the_run_still_succeeds(opsbook, pinged, webhook_receiver):
    port = free_port()
    opsbook.environ["DEAD_PING_URL"] = f"http://127.0.0.1:{port}/ping/{TOKEN}"
    pinged["write"](jobs={"backup.list": "${env:DEAD_PING_URL}"}, timeout=1)
    listed = opsbook.run("backup.list", "--env", "staging", "--json")
    assert listed.exit_code == 0, listed
    assert listed.json()["backups"] == []
    warnings = [line for line in listed.stderr.splitlines() if line.startswith("warning: could not ping")]
    assert len(warnings) == 2, listed.stderr  # the start and the end, each after its retry
    assert f"http://127.0.0.1:{port}/…" in warnings[0] and "(start)" in warnings[0] and "(end)" in warnings[1]
    assert "2 attempt(s)" in warnings[0] and "the run goes on" in warnings[0]
    assert_no_secret(opsbook, *pinged["secrets"])


def test_a_job_of_its_own_and_a_job_turned_off(opsbook, pinged, webhook_receiver):
    pinged["write"](url="${env:PING_URL}", jobs={"backup.list": webhook_receiver.url(f"/ping/{TOKEN}/list"),
                                                 "backup": False})
    assert opsbook.run("backup.list", "--env", "staging").exit_code == 0
    assert [path for path, _rid, _body in pings(webhook_receiver)] == ["/list/start", "/list"]
    shown = opsbook.run("inventory.show", "--env", "staging")  # a literal ping URL is masked like any credential
    assert shown.exit_code == 0 and "backup.list" in shown.output, shown
    webhook_receiver.reset()
    assert opsbook.run("backup", "--env", "staging", "--no-prune").exit_code == 0
    assert webhook_receiver.requests == []
    assert_no_secret(opsbook, *pinged["secrets"])


def test_the_console_tool_as_a_scheduler_runs_it_pings_too(opsbook, pinged, webhook_receiver, tmp_path):
    """`opsbook --inventory FILE backup --env E`, from another directory: the command line a timer runs."""
    environ = {k: v for k, v in opsbook.process_environment().items() if k != "OPS_INVENTORY"}
    program = "import sys; from runbooks.program import main; sys.argv[0] = 'opsbook'; main()"
    completed = subprocess.run([sys.executable, "-c", program, "--inventory", str(opsbook.inventory),
                                "backup", "--env", "staging", "--no-prune"], capture_output=True, text=True,
                               env={**environ, "PYTHONPATH": str(REPOSITORY)}, cwd=tmp_path, timeout=180)
    assert completed.returncode == 0, completed.stderr
    assert [path for path, _rid, _body in pings(webhook_receiver)] == ["/start", ""]
    assert "backup on staging: succeeded (exit 0)" in pings(webhook_receiver)[1][2]
    assert_no_secret(completed.stdout + completed.stderr, *pinged["secrets"])


def test_a_held_lock_pings_exit_75_and_a_refused_confirmation_exit_2(opsbook, pinged, webhook_receiver):
    with file_lock(opsbook.state_dir / "locks" / "staging.environment.lock",
                   {"run_id": "20261201T000000Z-0000", "runbook": "backup"}):
        held = opsbook.run("backup", "--env", "staging")
    assert held.exit_code == 75, held
    assert [path for path, _rid, _body in pings(webhook_receiver)] == ["/start", "/75"]
    assert "not run (lock held) (exit 75)" in pings(webhook_receiver)[1][2]

    webhook_receiver.reset()
    refused = opsbook.run("backup", "--env", "staging", "--confirm", "prod")
    assert refused.exit_code == 2, refused
    assert [path for path, _rid, _body in pings(webhook_receiver)] == ["/start", "/2"]
    assert_nothing_leaked(opsbook, webhook_receiver, pinged["secrets"])


def test_the_systemd_units_own_command_line_pings_success_failure_and_interrupt(opsbook, pinged, webhook_receiver):
    """The exact ExecStart `schedule.show --format systemd` renders for the nightly backup, run as a timer runs
    it (no terminal, another directory, the inventory named on the command line): each outcome is pinged."""
    shown = opsbook.run("schedule.show", "--env", "staging", "--format", "systemd", "--json")
    assert shown.exit_code == 0, shown
    command = next(job["command"] for job in shown.json()["jobs"] if job["task"] == "backup")
    service = next(text for name, text in shown.json()["files"].items() if name == "opsbook-staging-backup.service")
    assert f"ExecStart={' '.join(command)}" in service
    environ = {k: v for k, v in opsbook.process_environment().items() if k != "OPS_INVENTORY"}

    def run_unit(**changes: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=180, env={**environ, **changes},
                              cwd="/", stdin=subprocess.DEVNULL)

    webhook_receiver.reset()
    succeeded = run_unit()
    assert succeeded.returncode == 0, succeeded.stderr
    assert [path for path, _rid, _body in pings(webhook_receiver)] == ["/start", ""]

    webhook_receiver.reset()
    unreachable = run_unit(DB_URL_STAGING=f"postgresql://nobody:x@127.0.0.1:{free_port()}/nowhere")
    assert unreachable.returncode == 3, unreachable.stderr
    assert [path for path, _rid, _body in pings(webhook_receiver)] == ["/start", "/3"]

    webhook_receiver.reset()
    err, code = interrupted_mid_dump(pinged["url"], lambda: subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd="/",
        stdin=subprocess.DEVNULL), lambda process: (process.communicate(timeout=60)[1], process.returncode))
    assert code == 130, err
    (start, rid, _), (end, end_rid, _body) = pings(webhook_receiver)
    assert (start, end, rid) == ("/start", "/130", end_rid)
    for output in (succeeded.stdout + succeeded.stderr, unreachable.stdout + unreachable.stderr, err):
        assert_no_secret(output, *pinged["secrets"])
