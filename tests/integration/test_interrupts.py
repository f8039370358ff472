"""Ctrl-C (SIGINT) and SIGTERM stop a run within seconds, wherever it is: in a command on an app host
(the main thread's seed, a rolling restart's worker thread), in a local pg_dump, or waiting on a platform's
API (a Vercel build, a Neon operation). The remote command is
stopped on the host, the journal says "interrupted" at that step, the exit code is 130, and
`inv runs.resume ID` finishes the run."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from ops import processes
from ops.secrets import Secret
from tests.cli import CliResult, Opsbook, wait_for
from tests.fixtures.backups import backups_section, write_inventory
from tests.fixtures.processes import children, command_name
from tests.fixtures.shop import databases_like, make_database
from tests.fixtures.ssh import AppHost, HangOnce, hang_once, process_alive

STOPPED_WITHIN_SECONDS = 6  # "a few seconds": a hang lasts until the 300 s sleep of the remote command ends


def host_entry(host: AppHost, **app: Any) -> dict[str, Any]:
    return {"name": host.name, "address": "127.0.0.1", "user": host.host.user, "port": host.host.port,
            "key_file": host.host.key_filename,
            "app": {"dir": str(host.app_dir), "env_file": str(host.env_file), "restart": host.restart_command,
                    "health_url": host.health_url, "ready_url": host.ready_url, "health_timeout": 15, **app}}


def set_hosts(opsbook: Opsbook, hosts: list[dict[str, Any]], **settings: Any) -> None:
    inventory = yaml.safe_load(opsbook.inventory.read_text())
    inventory["envs"]["staging"].update(hosts=hosts, **settings)
    opsbook.write_inventory(inventory)


def interrupt_when(opsbook: Opsbook, args: tuple[str, ...], ready: Callable[[subprocess.Popen], Any], signum: int,
                   hang: HangOnce | None = None, then: Callable[[], Any] | None = None
                   ) -> tuple[CliResult, float, list[int]]:
    """Start `inv ARGS`, send `signum` once `ready(process)` (and call `then()` right after); (result, seconds from
    the signal to the exit, the hanging command's processes still running when the CLI had exited)."""
    process = opsbook.start(*args)
    try:
        wait_for(lambda: ready(process) or process.poll() is not None, timeout=90, interval=0.05,
                 what="the step to hang")
        assert process.poll() is None, opsbook.collect(process)
        process.send_signal(signum)
        signalled = time.monotonic()
        if then is not None:
            then()
        try:
            result = opsbook.collect(process, timeout=STOPPED_WITHIN_SECONDS * 5)
        except Exception:
            process.kill()
            raise
        return result, time.monotonic() - signalled, hang.running() if hang else []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if hang:
            hang.kill()


def assert_interrupted_at(opsbook: Opsbook, run_id: str, step: str) -> None:
    journal = opsbook.journal(run_id)
    assert journal[-1]["event"] == "finished", journal[-1]
    assert (journal[-1]["status"], journal[-1]["exit_code"], journal[-1]["stopped_at"]) == ("interrupted", 130, step)
    assert {"step": step, "state": "failed", "reason": "interrupted"}.items() <= journal[-2].items(), journal[-2]


def assert_stopped_then_resumed(opsbook: Opsbook, result: CliResult, seconds: float, step: str) -> None:
    """Exit 130 within seconds, journaled "interrupted" at `step`, and `inv runs.resume` finishes the run."""
    assert result.exit_code == 130, result
    assert seconds < STOPPED_WITHIN_SECONDS, (seconds, result)
    assert "Traceback" not in result.output and "runs.resume" in result.stderr, result
    run_id = opsbook.latest_run_id()
    assert_interrupted_at(opsbook, run_id, step)
    resumed = opsbook.run("runs.resume", run_id, "--json")
    assert resumed.exit_code == 0, resumed
    assert resumed.json()["status"] == "succeeded", resumed


@pytest.fixture
def web_hosts(opsbook: Opsbook, staging: dict[str, Any], app_host_factory: Callable[..., list[AppHost]]) -> Any:
    """`staging` (conftest) on app hosts of the session's sshd: make(names, **app) -> the hosts."""

    def make(names: tuple[str, ...], **app: Any) -> list[AppHost]:
        hosts = app_host_factory(names)
        for host in hosts:
            (host.app_dir / "prisma" / "migrations").mkdir(parents=True)  # the release has no migrations yet
        set_hosts(opsbook, [host_entry(host, **app) for host in hosts])
        return hosts

    return make


def test_ctrl_c_during_the_seed_on_a_host_stops_it_there_and_the_run_resumes(
        opsbook: Opsbook, web_hosts: Any, tmp_path: Path) -> None:
    hang = hang_once(tmp_path / "seed")
    (host,) = web_hosts(("web1",), seed=hang.command)

    result, seconds, left = interrupt_when(opsbook, ("provision", "--env", "staging"),
                                           lambda _: len(hang.running()) == 3, signal.SIGINT, hang)
    assert result.exit_code == 130, result
    assert seconds < STOPPED_WITHIN_SECONDS, (seconds, result)
    assert left == [], f"the seed's processes {left} still run on the host after the CLI exited"
    assert "Traceback" not in result.output and "runs.resume" in result.stderr, result
    run_id = opsbook.latest_run_id()
    assert_interrupted_at(opsbook, run_id, "seed")
    assert host.pid() is None  # the restart after the seed never ran

    resumed = opsbook.run("runs.resume", run_id)
    assert resumed.exit_code == 0, resumed
    assert host.pid() is not None and "seed" in resumed.stderr


def test_sigterm_during_a_rolling_restart_stops_the_remote_command_and_the_run_resumes(
        opsbook: Opsbook, web_hosts: Any, staging: dict[str, Any], postgres_server: Any, s3_server: Any,
        tmp_path: Path) -> None:
    hang = hang_once(tmp_path / "restart")
    web1, web2 = web_hosts(("web1", "web2"))
    opsbook.environ["APP_DATABASE_URL"] = postgres_server.create_database().reveal()  # what the apps can use
    s3_server.client().create_bucket(Bucket=staging["bucket"])
    set_hosts(opsbook, [host_entry(web1, restart=f"{hang.command} && {web1.restart_command}"), host_entry(web2)],
              database={"url": "${env:APP_DATABASE_URL}"})
    pushed = opsbook.run("deploy.push-env", "--env", "staging")
    assert pushed.exit_code == 0, pushed

    result, seconds, left = interrupt_when(opsbook, ("deploy.restart", "--env", "staging"),
                                           lambda _: len(hang.running()) == 3, signal.SIGTERM, hang)
    assert result.exit_code == 130, result
    assert seconds < STOPPED_WITHIN_SECONDS, (seconds, result)
    assert left == [], f"the restart's processes {left} still run on the host after the CLI exited"
    run_id = opsbook.latest_run_id()
    assert_interrupted_at(opsbook, run_id, "restart")
    assert web1.pid() is None and web2.pid() is None

    resumed = opsbook.run("runs.resume", run_id)
    assert resumed.exit_code == 0, resumed
    assert web1.pid() is not None and web2.pid() is not None


def started(opsbook: Opsbook, step: str) -> bool:
    journal = opsbook.journal(opsbook.latest_run_id())
    return any(entry.get("step") == step and entry.get("state") == "started" for entry in journal)


def test_ctrl_c_during_a_local_pg_dump_stops_it_and_the_backup_resumes(
        opsbook: Opsbook, postgres_server: Any, s3_server: Any) -> None:
    database_url = postgres_server.create_database()
    with psycopg.connect(database_url.reveal(), autocommit=True) as connection:
        connection.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 100) g")
    bucket = s3_server.make_bucket()
    opsbook.environ.update({"DB_URL": database_url.reveal(), "S3_SECRET": s3_server.secret_access_key.reveal()})
    opsbook.write_inventory({"project": "interrupttest", "default_env": "staging", "envs": {"staging": {
        "database": {"url": "${env:DB_URL}"},
        "backups": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": bucket.bucket, "prefix": "staging/", "access_key_id": s3_server.access_key_id,
                    "secret_access_key": "${env:S3_SECRET}"}}}})
    # A table locked by another session makes pg_dump wait for its lock: a deterministic pause in the dump step.
    blocker = psycopg.connect(database_url.reveal())
    blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    seen: list[int] = []

    def dumping(process: subprocess.Popen) -> bool:
        if not (opsbook.journals() and started(opsbook, "dump")):
            return False
        seen[:] = children(process.pid)
        return any(command_name(pid) == "pg_dump" for pid in seen)

    try:
        result, seconds, _ = interrupt_when(opsbook, ("backup", "--env", "staging"), dumping, signal.SIGINT)
    finally:
        blocker.rollback()
        blocker.close()
    assert result.exit_code == 130, result
    assert seconds < STOPPED_WITHIN_SECONDS, (seconds, result)
    left = [pid for pid in seen if process_alive(pid)]
    assert left == [], f"child processes {left} ({[command_name(p) for p in left]}) outlived the CLI"
    run_id = opsbook.latest_run_id()
    assert_interrupted_at(opsbook, run_id, "dump")

    resumed = opsbook.run("runs.resume", run_id, "--json")
    assert resumed.exit_code == 0, resumed
    assert resumed.json()["status"] == "succeeded" and "stored" in resumed.stderr, resumed



class _SignalAfterStart(threading.Thread):
    """The snapshot reader's thread; once it waits inside its savepoint, Ctrl-C reaches the main thread
    while it is still in `Thread.start()`: where a real signal lands most often, since start() waits."""

    def start(self) -> None:
        super().start()
        wait_for(lambda: _waiting_for_lock(self.probe_url), timeout=30, interval=0.02, what="the reader to wait")
        os.kill(os.getpid(), signal.SIGINT)


def _held_or_raised(signum: int, frame: Any) -> None:
    """The CLI's handler (ops/cli.py `_interrupt`) less its process-wide marks, which would outlive this test
    in this process (remote commands would refuse to start in the tests after it)."""
    if not processes.interrupt_held():
        raise KeyboardInterrupt


def _waiting_for_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                  "AND query LIKE 'SELECT count(*)%'").fetchone()[0] > 0


def test_ctrl_c_while_the_snapshot_reader_starts_ends_the_dump_step_as_an_interrupt(
        opsbook: Opsbook, postgres_server: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dump's row counts run in a thread on the snapshot's connection, inside a savepoint. Ctrl-C as that
    thread starts must stop it before the snapshot's transaction ends, and surface as the interrupt it is,
    not as psycopg's "transaction rollback at the wrong nesting level"."""
    from ops import backup_steps
    from ops.engine import RunContext
    from ops.inventory import load
    from ops.output import Output

    database_url = postgres_server.create_database()
    with psycopg.connect(database_url.reveal(), autocommit=True) as connection:
        connection.execute("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 100) g")
    bucket = s3_server.make_bucket()
    monkeypatch.setenv("DB_URL", database_url.reveal())
    monkeypatch.setenv("S3_SECRET", s3_server.secret_access_key.reveal())
    monkeypatch.setenv("OPS_HOME", str(opsbook.state_dir))
    opsbook.write_inventory({"project": "interrupttest", "default_env": "staging", "envs": {"staging": {
        "database": {"url": "${env:DB_URL}"},
        "backups": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": bucket.bucket, "prefix": "staging/", "access_key_id": s3_server.access_key_id,
                    "secret_access_key": "${env:S3_SECRET}"}}}})
    _SignalAfterStart.probe_url = database_url.reveal()
    monkeypatch.setattr(backup_steps, "threading", type("threading", (), {"Thread": _SignalAfterStart}))
    previous = signal.signal(signal.SIGINT, _held_or_raised)
    blocker = psycopg.connect(database_url.reveal())
    blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")  # the reader (and pg_dump) wait for it
    release = threading.Timer(2, blocker.rollback)  # so that a snapshot waiting for its reader is not stuck
    release.start()
    ctx = RunContext(load(opsbook.inventory).environment("staging"), output=Output())
    try:
        step = backup_steps.DumpStep("20261201T000000Z")
        change = step.check(ctx)
        with pytest.raises(KeyboardInterrupt):
            step.apply(ctx, change)
    finally:
        signal.signal(signal.SIGINT, previous)
        release.cancel()
        blocker.rollback()
        blocker.close()
        ctx.close()


def test_ctrl_c_while_a_vercel_redeploy_builds_stops_the_wait_and_the_run_resumes(
        opsbook: Opsbook, postgres_server: Any, s3_server: Any, vercel_api: Any) -> None:
    database_url = postgres_server.create_database()
    project = vercel_api.new_project({"DATABASE_URL": database_url.reveal()}, deployments=1)
    serving = project.production
    opsbook.environ.update({"VERCEL_TOKEN": project.token, "DB_URL": database_url.reveal(),
                            "S3_SECRET": s3_server.secret_access_key.reveal()})
    opsbook.write_inventory({"project": "interrupttest", "default_env": "prod", "envs": {"prod": {
        "database": {"url": "${env:DB_URL}"},
        "backups": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": s3_server.make_bucket().bucket, "prefix": "prod/",
                    "access_key_id": s3_server.access_key_id, "secret_access_key": "${env:S3_SECRET}"},
        "app": {"platform": "vercel", "health_timeout": 10,
                "vercel": {"project_id": project.id, "team_id": project.team_id, "token": "${env:VERCEL_TOKEN}",
                           "api": vercel_api.base_url, "build_timeout": 60},
                "health_url": vercel_api.url(project, "/api/health"),
                "ready_url": vercel_api.url(project, "/api/ready")}}}})
    project.hold_builds = True
    try:
        result, seconds, _ = interrupt_when(
            opsbook, ("deploy.restart", "--env", "prod"),
            lambda _: len(project.deployments) == 2 and project.deployments[-1].state == "BUILDING", signal.SIGINT)
    finally:
        project.hold_builds = False
    assert_stopped_then_resumed(opsbook, result, seconds, "restart")
    assert project.production != serving and project.serving().state == "READY"


def test_ctrl_c_while_neon_creates_a_branch_stops_the_wait_and_provision_resumes(
        opsbook: Opsbook, s3_server: Any, neon_api: Any) -> None:
    project = neon_api.new_project(dbname="held")
    opsbook.environ.update({"NEON_API_KEY": project.api_key.reveal(),
                            "S3_SECRET": s3_server.secret_access_key.reveal()})
    opsbook.write_inventory({"project": "interrupttest", "default_env": "staging", "envs": {"staging": {
        "database": {"provider": "neon", "project_id": project.id, "api_key": "${env:NEON_API_KEY}",
                     "api_base": neon_api.base_url, "branch": "staging", "role": f"held_{project.id[5:]}",
                     "name": f"held_{project.id[5:]}"},
        "backups": {"provider": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
                    "bucket": s3_server.make_bucket().bucket, "prefix": "staging/",
                    "access_key_id": s3_server.access_key_id, "secret_access_key": "${env:S3_SECRET}"}}}})
    project.hold_operations = True
    try:
        result, seconds, _ = interrupt_when(
            opsbook, ("provision", "--env", "staging"),
            lambda _: sum(call.startswith("GET /operations/") for call in neon_api.calls(project)) >= 2,
            signal.SIGINT)
    finally:
        project.hold_operations = False
    roles_posted = [call for call in neon_api.calls(project) if call.endswith("/roles") and call.startswith("POST")]
    assert_stopped_then_resumed(opsbook, result, seconds, "neon-branch")
    assert roles_posted == []  # stopped at the branch: the role step had not begun
    branch = project.branch("staging")
    assert f"held_{project.id[5:]}" in branch.databases
    assert neon_api.calls(project).count("POST /branches") == 1  # the branch made before the interrupt is used


# --- restores of part of a backup, their diff, the roles --------------------------------------------------------


def waiting_on_a_lock(url: Secret, query: str, database: str | None = None) -> bool:
    """Whether a session (of `database`) waits for a lock in a statement matching the LIKE pattern `query`."""
    with psycopg.connect(url.reveal(), autocommit=True) as connection:
        return connection.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                  "AND query LIKE %s AND (%s::text IS NULL OR datname = %s)",
                                  (query, database, database)).fetchone()[0] > 0


def backed_up(opsbook: Opsbook, postgres_server: Any, s3_server: Any) -> tuple[str, Secret]:
    """A shop database on the session's server (staging) and one backup of it."""
    name, url = make_database(postgres_server)
    write_inventory(opsbook, s3_server, {"staging": {"backups": backups_section(
        s3_server.endpoint, s3_server.make_bucket().bucket, "staging/")}}, {"staging": url})
    made = opsbook.run("backup", "--env", "staging")
    assert made.exit_code == 0, made
    return name, url


def test_an_interrupted_table_restore_leaves_no_half_made_scratch_database_and_runs_again(
        opsbook: Opsbook, postgres_server: Any, s3_server: Any) -> None:
    """Stopped between creating the scratch database and marking it as opsbook's (a database opsbook would
    then refuse to replace), and again in pg_restore: the database is dropped each time, and the restore
    resumes, or simply runs again."""
    name, _url = backed_up(opsbook, postgres_server, s3_server)
    into = f"{name}_users"
    restore = ("restore", "--env", "staging", "--table", "User", "--into", into)
    admin = psycopg.connect(postgres_server.url().reveal())
    admin.execute("LOCK TABLE pg_catalog.pg_shdescription IN SHARE MODE")  # the scratch's mark (a COMMENT) waits
    try:
        result, seconds, _ = interrupt_when(opsbook, restore, lambda _: waiting_on_a_lock(
            postgres_server.url(), "COMMENT ON DATABASE%"), signal.SIGINT, then=admin.rollback)
    finally:
        admin.close()
    assert databases_like(postgres_server, into) == [], "the unmarked scratch database was left behind"
    assert_stopped_then_resumed(opsbook, result, seconds, "load")
    assert databases_like(postgres_server, into) == [into]
    with psycopg.connect(postgres_server.url().reveal(), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE "{into}"')  # done with it (its drop would wait for the lock below)

    admin = psycopg.connect(postgres_server.url().reveal())
    admin.execute("LOCK TABLE pg_catalog.pg_shdescription IN SHARE MODE")
    table = None

    def restoring() -> bool:  # the new scratch exists, unmarked yet: a table of its name makes pg_restore wait
        nonlocal table
        if table is None and waiting_on_a_lock(postgres_server.url(), "COMMENT ON DATABASE%"):
            table = psycopg.connect(postgres_server.url(into).reveal())
            table.execute('CREATE TABLE public."User" (id int)')
            admin.rollback()
        return table is not None and waiting_on_a_lock(postgres_server.url(), "CREATE TABLE%", into)

    try:
        result, seconds, _ = interrupt_when(opsbook, restore, lambda _: restoring(), signal.SIGTERM)
    finally:
        admin.close()
        if table is not None:
            table.close()  # ended by the drop of its database
    assert result.exit_code == 130 and seconds < STOPPED_WITHIN_SECONDS, result
    assert databases_like(postgres_server, into) == [], "the interrupted pg_restore's scratch database was kept"
    again = opsbook.run(*restore)
    assert again.exit_code == 0 and "User (50 rows)" in again.stderr, again


def test_an_interrupted_restore_diff_apply_changes_nothing_and_resumes_to_the_backups_rows(
        opsbook: Opsbook, postgres_server: Any, s3_server: Any, tmp_path: Path) -> None:
    _name, url = backed_up(opsbook, postgres_server, s3_server)
    with psycopg.connect(url.reveal(), autocommit=True) as connection:
        before = connection.execute('SELECT md5(string_agg(t::text, \',\' ORDER BY id)) FROM "User" t').fetchone()
        connection.execute("""DELETE FROM "User" WHERE email IN ('user1@example.com', 'user2@example.com');
                              UPDATE "User" SET email = 'changed ' || email WHERE email = 'user3@example.com'""")
    holder = psycopg.connect(url.reveal())  # the changed row's lock holds the file's UPDATE, after its INSERTs
    holder.execute("""SELECT 1 FROM "User" WHERE email = 'changed user3@example.com' FOR UPDATE""")
    try:
        result, seconds, _ = interrupt_when(
            opsbook, ("restore.diff", "--env", "staging", "--table", "User", "--restore-changed", "--apply",
                      "--out", str(tmp_path / "user.sql")),
            lambda _: waiting_on_a_lock(postgres_server.url(), "%COMMIT;%"), signal.SIGINT)
        with psycopg.connect(url.reveal()) as connection:
            assert connection.execute('SELECT count(*) FROM "User"').fetchone() == (48,), "half applied"
    finally:
        holder.close()
    assert_stopped_then_resumed(opsbook, result, seconds, "apply")
    with psycopg.connect(url.reveal()) as connection:
        assert connection.execute('SELECT md5(string_agg(t::text, \',\' ORDER BY id)) FROM "User" t'
                                  ).fetchone() == before


def test_an_interrupted_roles_step_creates_none_of_them_and_the_restore_resumes(
        opsbook: Opsbook, postgres_server: Any, s3_server: Any, second_postgres_server: Any) -> None:
    suffix = uuid.uuid4().hex[:6]
    owner, reader = f"own_{suffix}", f"read_{suffix}"
    name, url = make_database(postgres_server)
    with psycopg.connect(postgres_server.url().reveal(), autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {reader} NOLOGIN; CREATE ROLE {owner} LOGIN")
    with psycopg.connect(url.reveal(), autocommit=True) as connection:
        connection.execute(f'ALTER TABLE "Brand" OWNER TO {owner}; GRANT SELECT ON "Image" TO {reader}')
    fresh = Secret(second_postgres_server.url(name).reveal())
    write_inventory(opsbook, s3_server, {
        "staging": {"backups": backups_section(s3_server.endpoint, s3_server.make_bucket().bucket, "staging/")},
        "fresh": {}}, {"staging": url, "fresh": fresh})
    assert opsbook.run("backup", "--env", "staging").exit_code == 0
    holder = psycopg.connect(second_postgres_server.url().reveal())  # a role of that name, not committed yet:
    holder.execute(f"CREATE ROLE {owner}")  # the restore's CREATE ROLE waits for this transaction
    try:
        result, seconds, _ = interrupt_when(
            opsbook, ("restore", "--env", "fresh", "--from", "staging", "--with-globals"),
            lambda _: waiting_on_a_lock(second_postgres_server.url(), "CREATE ROLE%"), signal.SIGINT,
            then=holder.rollback)
    finally:
        holder.close()
    with psycopg.connect(second_postgres_server.url().reveal()) as connection:
        assert connection.execute("SELECT rolname FROM pg_roles WHERE rolname IN (%s, %s)",
                                  (owner, reader)).fetchall() == [], "some roles were created, not all"
        assert connection.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                  (f"{name}%",)).fetchall() == []
    assert_stopped_then_resumed(opsbook, result, seconds, "roles")
    with psycopg.connect(fresh.reveal()) as connection:
        assert connection.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'Brand'"
                                  ).fetchone() == (owner,)
        assert connection.execute("""SELECT has_table_privilege(%s, '"Image"', 'SELECT')""", (reader,)
                                  ).fetchone() == (True,)
