"""The embedded sandbox for real: its own PostgreSQL cluster, folder buckets and demo app."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import psycopg
import pytest

from ops.clock import parse_time
from ops.demo import seed
from ops.errors import OpsError
from ops.sandbox import APP_BUCKET, BACKUP_BUCKET, Sandbox, find_server_bindir
from tests.cli import CliResult, Opsbook, wait_for
from tests.fixtures.processes import descendants
from tests.fixtures.secrets import assert_no_secret
from tests.fixtures.ssh import free_port


@dataclass
class UpResult:
    sandbox: Sandbox
    first_lines: list[str]


@pytest.fixture(scope="module")
def made() -> Iterator[UpResult]:
    # Not pytest's tmp_path: its parents are 0700, and as root the cluster runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="opsbook-sandbox-"))
    base.chmod(0o755)
    sandbox = Sandbox(base / "workspace" / ".ops" / "sandbox")  # the one `workspace` (below) drives through the CLI
    lines: list[str] = []
    try:
        sandbox.up(log=lines.append)
        yield UpResult(sandbox, lines)
    finally:
        sandbox.destroy()  # stops the cluster whatever happened
        shutil.rmtree(base, ignore_errors=True)


def app_conn(sandbox: Sandbox):
    return psycopg.connect(sandbox.info().database_url.reveal(), autocommit=True)


def test_up_from_nothing(made: UpResult):
    sandbox, lines = made.sandbox, made.first_lines
    assert len(lines) == 7 and not any("already" in line for line in lines)
    info = sandbox.info()
    assert info.running and info.port
    assert info.database_url == info.direct_url and str(info.database_url) == "***"
    password = json.loads((sandbox.home / "credentials.json").read_text())["password"]
    assert stat.S_IMODE((sandbox.home / "credentials.json").stat().st_mode) == 0o600
    assert not any(password in line for line in lines)
    assert (info.app_dir / "prisma" / "migrations" / "migration_lock.toml").is_file()

    with app_conn(sandbox) as conn:
        counts = {table: conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
                  for table in ("Brand", "Image", "NavigationDraft", "User")}
        assert counts == {"Brand": seed.BRAND_COUNT, "Image": seed.IMAGE_COUNT,
                          "NavigationDraft": seed.DRAFT_COUNT, "User": seed.USER_COUNT}
        images = conn.execute('SELECT "storageKey", "sizeBytes" FROM "Image" ORDER BY id LIMIT %s',
                              (seed.IMAGE_OBJECT_COUNT,)).fetchall()
        # Sequences were moved past the copied ids: the app can insert.
        conn.execute('INSERT INTO "Brand" (slug, name, "updatedAt") VALUES (%s, %s, now())', ("new", "New"))
        conn.execute("DELETE FROM \"Brand\" WHERE slug = 'new'")
        # The passwords are hashed, never stored as given.
        assert conn.execute("""SELECT count(*) FROM "User" WHERE "passwordHash" LIKE 'scrypt$%'""").fetchone()[0] \
            == seed.USER_COUNT
        # Prisma's bookkeeping is real.
        rows = conn.execute("SELECT migration_name, checksum FROM _prisma_migrations ORDER BY migration_name")
        for name, checksum in rows.fetchall():
            script = info.app_dir / "prisma" / "migrations" / name / "migration.sql"
            assert checksum == hashlib.sha256(script.read_bytes()).hexdigest()

    bucket = info.storage_path / APP_BUCKET
    for key, size in images:  # every one of the first images has its object, with the recorded size
        assert (bucket / key).stat().st_size == size
    assert sum(1 for path in (bucket / "images").rglob("*.jpg")) == seed.IMAGE_OBJECT_COUNT
    first = (bucket / images[0][0]).read_bytes()
    assert first.startswith(b"\xff\xd8\xff") and first.endswith(b"\xff\xd9")
    assert (info.storage_path / BACKUP_BUCKET).is_dir()


def test_second_up_is_a_noop_and_says_so(made: UpResult):
    sandbox = made.sandbox
    port = sandbox.info().port
    lines: list[str] = []
    info = sandbox.up(log=lines.append)
    assert len(lines) == 7
    assert all("already" in line for line in lines), lines
    assert info.port == port
    with app_conn(sandbox) as conn:
        assert conn.execute('SELECT count(*) FROM "Image"').fetchone()[0] == seed.IMAGE_COUNT
        assert conn.execute("SELECT count(*) FROM _prisma_migrations").fetchone()[0] == 4


def test_status(made: UpResult):
    status = made.sandbox.status()
    assert status["running"] is True and status["port"] == made.sandbox.info().port
    assert status["tables"]["public.Image"] == seed.IMAGE_COUNT
    assert status["demo_images"] == seed.IMAGE_OBJECT_COUNT
    assert status["migrations"]["up_to_date"] is True and len(status["migrations"]["applied"]) == 4
    assert status["database_size_bytes"] > 0
    json.dumps(status)  # ready for --json
    assert json.loads((made.sandbox.home / "credentials.json").read_text())["password"] not in json.dumps(status)


def test_down_then_ensure_running_restarts_it(made: UpResult):
    sandbox = made.sandbox
    sandbox.down()
    assert not sandbox.is_running()
    stopped = sandbox.status()
    assert stopped["running"] is False and "tables" not in stopped
    lines: list[str] = []
    info = sandbox.ensure_running(log=lines.append)
    assert info.running and len(lines) == 1 and "started" in lines[0]
    with app_conn(sandbox) as conn:  # the data survived
        assert conn.execute('SELECT count(*) FROM "Brand"').fetchone()[0] == seed.BRAND_COUNT
    quiet: list[str] = []
    sandbox.ensure_running(log=quiet.append)
    assert quiet == []  # already running: nothing to say


def test_taken_port_is_replaced_and_remembered(made: UpResult):
    sandbox = made.sandbox
    old_port = sandbox.info().port
    sandbox.down()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the old port may be in TIME_WAIT
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        info = sandbox.ensure_running(log=lambda line: None)
    assert info.running and info.port != old_port
    assert json.loads((sandbox.home / "sandbox.json").read_text())["port"] == info.port
    with app_conn(sandbox) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to another user")
def test_home_the_server_user_cannot_reach_is_refused_clearly():
    base = Path(tempfile.mkdtemp(prefix="opsbook-sandbox-private-"))  # 0700: postgres cannot enter
    try:
        with pytest.raises(OpsError, match="cannot reach") as refused:
            Sandbox(base / "sandbox").up(log=lambda line: None)
        assert "chmod o+x" in refused.value.hint
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- point-in-time recovery on the sandbox, through the CLI (pgBackRest, its repository in the backup folder) ---


@pytest.fixture(scope="module")
def workspace(made: UpResult) -> Opsbook:
    """A CLI workspace whose `local` is the module's sandbox (its state dir holds it)."""
    opsbook = Opsbook(made.sandbox.home.parent.parent)
    opsbook.write_inventory({"project": "sandboxtest", "default_env": "local", "envs": {"local": {"sandbox": True}}})
    return opsbook


def ok(result: CliResult) -> CliResult:
    assert result.exit_code == 0, str(result)
    return result


def switch_and_wait(sandbox: Sandbox) -> str:
    """The current WAL segment closed and archived: what was committed so far is in the repository."""
    with psycopg.connect(sandbox.info().database_url.reveal(), autocommit=True) as conn:
        conn.execute("SELECT pg_logical_emit_message(false, 'test', 'x')")  # something to switch away from
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        wait_for(lambda: conn.execute("SELECT last_archived_wal >= %s FROM pg_stat_archiver", (segment,)).fetchone()[0],
                 timeout=30, what=f"{segment} archived")
    return segment


def next_second() -> None:
    """Wait into the next whole second of the clock."""
    time.sleep(1.02 - time.time() % 1)


def brands(sandbox: Sandbox, slug: str) -> int:
    with app_conn(sandbox) as conn:
        return conn.execute('SELECT count(*) FROM "Brand" WHERE slug = %s', (slug,)).fetchone()[0]


def repository(sandbox: Sandbox) -> Path:
    return sandbox.storage_path / BACKUP_BUCKET / "local" / "pitr"


def passphrase(workspace: Opsbook) -> str:
    """The repository's cipher passphrase, from the environment's secret store (the file backend)."""
    lines = (workspace.state_dir / "secrets" / "local.env").read_text().splitlines()
    return next(line.split("=", 1)[1] for line in lines if line.startswith("PITR_CIPHER_PASS="))


@pytest.mark.skipif(shutil.which("pgbackrest") is None, reason="pgBackRest (pgbackrest) is not installed")
def test_pitr_on_the_sandbox_setup_base_list_status_restore_to_a_time_and_an_lsn(made: UpResult, workspace: Opsbook):
    sandbox = made.sandbox
    password = json.loads((sandbox.home / "credentials.json").read_text())["password"]
    done = ok(workspace.run("pitr.setup", "--env", "local", "--json")).json()
    segment = done["archive"]["segment"]
    assert done["archive"]["engine"] == "pgbackrest"
    assert list((repository(sandbox) / "archive" / "local").glob(f"*/*/{segment}-*")), "archived into the folder"
    config = sandbox.home / "opsbook-pitr-local" / "pgbackrest.conf"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and f"repo1-path={repository(sandbox)}" in config.read_text()
    cipher = passphrase(workspace)
    assert len(cipher) == 64 and f"repo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass={cipher}\n" in config.read_text()
    if os.geteuid() == 0:
        assert config.owner() == "postgres" and repository(sandbox).owner() == "postgres", "the server's user's"
    assert ok(workspace.run("pitr.setup", "--env", "local", "--json")).json()["status"] == "nothing to do"

    backup_id = ok(workspace.run("pitr.base", "--env", "local", "--json")).json()["base"]["backup_id"]
    manifest = repository(sandbox) / "backup" / "local" / backup_id / "backup.manifest"
    assert manifest.read_bytes().startswith(b"Salted__"), "encrypted in the repository (aes-256-cbc)"
    assert all(path.read_bytes().startswith(b"Salted__")
               for path in (repository(sandbox) / "archive" / "local").glob(f"*/*/{segment}-*")), "the WAL too"
    # pgBackRest's times are whole seconds: the backup's end counts from the next second (its earliest), and the
    # repository's file times end the recoverable range; T lies after the first and before the second
    next_second()
    with app_conn(sandbox) as conn:
        conn.execute("""INSERT INTO "Brand" (slug, name, "updatedAt") VALUES ('pitr-kept', 'kept', now())""")
        moment = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # after the insert's commit, before the delete
        position = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]  # the insert is before it
        conn.execute("""DELETE FROM "Brand" WHERE slug = 'pitr-kept'""")
    next_second()
    switch_and_wait(sandbox)  # the deletion archived
    at = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")

    listed = ok(workspace.run("pitr.list", "--env", "local", "--json")).json()
    assert listed["engine"] == "pgbackrest" and [item["backup_id"] for item in listed["backups"]] == [backup_id]
    newest = listed["backups"][0]
    assert newest["complete"] and newest["gap"] is None
    assert newest["earliest_lsn"] and newest["latest_lsn"], "the LSN range, read from pgBackRest's backup stop"
    assert parse_time(newest["earliest"]) <= moment.replace(microsecond=0) <= parse_time(newest["latest"]), newest
    status = ok(workspace.run("pitr.status", "--env", "local", "--json")).json()
    assert status["verdict"] == "ok" and status["last_base_backup"] == backup_id and status["failed_count"] == 0

    assert brands(sandbox, "pitr-kept") == 0
    restored = ok(workspace.run("restore", "--env", "local", "--to-time", at, "--json")).json()["restored"]
    assert brands(sandbox, "pitr-kept") == 1, "the deleted row is back"
    assert restored["base_backup"] == backup_id and restored["stopped_before"], "stopped before the deletion"
    assert list((workspace.state_dir / "pitr" / "scratch").glob("*")) == [], "the scratch cluster is gone"
    with app_conn(sandbox) as conn:  # deleted again: a WAL position before the first deletion brings it back too
        conn.execute("""DELETE FROM "Brand" WHERE slug = 'pitr-kept'""")
    by_lsn = ok(workspace.run("restore", "--env", "local", "--to-lsn", position, "--json")).json()["restored"]
    assert brands(sandbox, "pitr-kept") == 1 and by_lsn["base_backup"] == backup_id, by_lsn
    # every output and journal (the state dir also holds the sandbox itself, its credentials.json included)
    journals = [path.read_text() for path in workspace.journals()]
    assert_no_secret("\n".join([*workspace.transcript, *journals]), password, cipher)


def readme_lines(marker: str) -> list[list[str]]:
    """The indented `./opsbook inv` lines after `marker` in the README, split as a shell would."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert text.count(marker) == 1
    commands = []
    for line in text.split(marker, 1)[1].split("-->", 1)[1].lstrip("\n").splitlines():
        if not line.startswith("    "):
            break
        words = shlex.split(line, comments=True)
        assert words[:2] == ["./opsbook", "inv"], line
        commands.append(words[2:])
    return commands


@pytest.mark.skipif(shutil.which("pgbackrest") is None, reason="pgBackRest (pgbackrest) is not installed")
def test_the_readme_pitr_lines_for_the_sandbox_run_as_written(made: UpResult, workspace: Opsbook):
    lines = readme_lines("<!-- pitr-sandbox:")
    assert [words[0] for words in lines] == ["pitr.setup", "pitr.base", "pitr.list", "pitr.status", "restore"]
    assert lines[-1] == ["restore", "--env", "local", "--to-time", "latest"]
    results = [ok(workspace.run(*words)) for words in lines[:2]]
    with app_conn(made.sandbox) as conn:  # after the base backup: only the archived WAL brings it back
        conn.execute("""INSERT INTO "Brand" (slug, name, "updatedAt") VALUES ('readme-latest', 'latest', now())""")
    switch_and_wait(made.sandbox)
    results += [ok(workspace.run(*words)) for words in lines[2:]]
    listed = json.loads(results[2].stdout)
    assert listed["backups"] and all(item["earliest"] and item["latest"] for item in listed["backups"]), listed
    assert "app now holds local as of the latest recoverable point" in results[-1].stderr, str(results[-1])
    assert brands(made.sandbox, "readme-latest") == 1, "replayed from the archive"


@pytest.mark.skipif(shutil.which("pgbackrest") is None, reason="pgBackRest (pgbackrest) is not installed")
def test_restore_to_a_time_on_an_idle_database_closes_the_source_wal_first(made: UpResult, workspace: Opsbook):
    """Nothing committed after T: PostgreSQL reaches a recovery_target_time only at a later commit, so opsbook
    commits an empty transaction on the source and waits for its archiving before recovering."""
    sandbox = made.sandbox
    if not list(repository(sandbox).glob("backup/*/*F")):
        ok(workspace.run("pitr.setup", "--env", "local"))  # this test alone
        ok(workspace.run("pitr.base", "--env", "local"))
    next_second()  # after the backup's end, in whole seconds
    with app_conn(sandbox) as conn:
        conn.execute("""INSERT INTO "Brand" (slug, name, "updatedAt") VALUES ('idle-kept', 'idle', now())""")
        inside = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    switch_and_wait(sandbox)  # archived, with no commit after `inside`
    with app_conn(sandbox) as conn:
        beyond = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # after the newest archived segment
    for moment in (inside, beyond):
        at = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
        restored = ok(workspace.run("restore", "--env", "local", "--to-time", at, "--json")).json()["restored"]
        assert restored["stopped_before"] and parse_time(restored["stopped_before"]) > moment, restored
        assert brands(sandbox, "idle-kept") == 1


def backup_connected(sandbox: Sandbox) -> bool:
    """pgBackRest's backup session is on the server: pg_backup_start has run, files are being copied."""
    with app_conn(sandbox) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgBackRest%backup%'"
                            ).fetchone()[0] > 0


def complete_labels(workspace: Opsbook) -> set[str]:
    listed = ok(workspace.run("pitr.list", "--env", "local", "--json")).json()["backups"]
    return {item["backup_id"] for item in listed if item["complete"]}


@pytest.mark.skipif(shutil.which("pgbackrest") is None, reason="pgBackRest (pgbackrest) is not installed")
def test_a_sandbox_base_backup_killed_half_way_is_not_listed_complete_and_the_next_succeeds(made: UpResult,
                                                                                            workspace: Opsbook):
    sandbox = made.sandbox
    if not list(repository(sandbox).glob("backup/*/*F")):
        ok(workspace.run("pitr.setup", "--env", "local"))  # this test alone
    before = complete_labels(workspace)
    running = workspace.start("pitr.base", "--env", "local")
    engine = wait_for(lambda: [pid for pid, command in descendants(running.pid) if command.startswith("pgbackrest ")
                               and " backup" in command and "--process=" not in command],
                      timeout=30, interval=0.05, what="pgbackrest backup running")
    wait_for(lambda: backup_connected(sandbox), timeout=60, interval=0.05, what="pgbackrest backup connected")
    cipher = passphrase(workspace)  # the repository is encrypted: its passphrase is on no command line
    assert all(cipher not in command for _pid, command in descendants(running.pid))
    os.kill(engine[0], signal.SIGKILL)
    killed = workspace.collect(running)
    assert killed.exit_code == 1 and "pgbackrest failed" in killed.stderr, str(killed)
    assert complete_labels(workspace) == before, "the killed backup is not listed"

    ok(workspace.run("pitr.base", "--env", "local"))
    after = complete_labels(workspace)
    assert len(after - before) == 1, (before, after)
    labels = {path.name for path in (repository(sandbox) / "backup" / "local").glob("*F")}
    assert labels <= after | before, "nothing of the killed backup is left in the repository"


def readme_block(marker: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert text.count(marker) == 1
    found = re.search(r"```sh\n(.*?)\n```", text.split(marker, 1)[1], flags=re.DOTALL)
    assert found, f"no ```sh block after {marker}"
    return found.group(1) + "\n"


@pytest.mark.skipif(shutil.which("pgbackrest") is None, reason="pgBackRest (pgbackrest) is not installed")
def test_the_readme_break_glass_recovery_of_a_folder_repository_runs_with_pgbackrest_alone(made: UpResult,
                                                                                          workspace: Opsbook):
    sandbox = made.sandbox
    with app_conn(sandbox) as conn:
        if conn.execute("SHOW archive_mode").fetchone()[0] != "on" or not list(repository(sandbox).glob("backup/*/*F")):
            ok(workspace.run("pitr.setup", "--env", "local"))  # this test alone
            ok(workspace.run("pitr.base", "--env", "local"))
        conn.execute("""INSERT INTO "Brand" (slug, name, "updatedAt") VALUES ('glass', 'break glass', now())""")
        moment = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        expected = conn.execute('SELECT count(*) FROM "Brand"').fetchone()[0]
        conn.execute("""DELETE FROM "Brand" WHERE slug = 'glass'""")
    switch_and_wait(sandbox)
    recovery = Path(tempfile.mkdtemp(prefix="opsbook-break-glass-"))
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    bin_dir = find_server_bindir()
    try:
        script = recovery / "recover.sh"
        script.write_text(readme_block("<!-- pitr-break-glass-folder:"))
        if user:
            shutil.chown(recovery, "postgres", "postgres")
        environment = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(recovery), "LANG": "C.UTF-8",
                       "REPO": str(repository(sandbox)), "STANZA": "local", "TARGET_TIME": moment.isoformat(sep=" "),
                       "RECOVERY_DIR": str(recovery), "PORT": str(free_port()), "PGUSER": "postgres",
                       "PGPASSWORD": json.loads((sandbox.home / "credentials.json").read_text())["password"],
                       "DATABASE": "app", "PGBACKREST_REPO1_CIPHER_TYPE": "aes-256-cbc",
                       "PGBACKREST_REPO1_CIPHER_PASS": passphrase(workspace)}
        done = subprocess.run([*user, "env", "-i", *(f"{k}={v}" for k, v in environment.items()),
                               "bash", "-euo", "pipefail", str(script)], capture_output=True, text=True, timeout=300,
                              cwd=recovery)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "recovery stopping before commit" in done.stdout
        with app_conn(sandbox) as conn:
            conn.execute("DROP DATABASE IF EXISTS glass")
            conn.execute("CREATE DATABASE glass")
        target = sandbox.info().database_url.reveal().rsplit("/", 1)[0] + "/glass"
        loaded = subprocess.run([str(bin_dir / "pg_restore"), "--no-owner", "-d", target,
                                 str(recovery / "recovered.pgc")], capture_output=True, text=True, check=False)
        assert loaded.returncode == 0, loaded.stderr
        with psycopg.connect(target) as conn:
            assert conn.execute('SELECT count(*) FROM "Brand"').fetchone()[0] == expected
            assert conn.execute("""SELECT count(*) FROM "Brand" WHERE slug = 'glass'""").fetchone()[0] == 1
    finally:
        subprocess.run([*user, str(bin_dir / "pg_ctl"), "stop", "-D", str(recovery / "data"), "-m", "immediate"],
                       capture_output=True, check=False)
        shutil.rmtree(recovery, ignore_errors=True)


# Last in the module: the repository keeps its gap.
@pytest.mark.skipif(shutil.which("pgbackrest") is None, reason="pgBackRest (pgbackrest) is not installed")
def test_a_wal_file_removed_from_the_sandbox_repository_is_refused_naming_it(made: UpResult, workspace: Opsbook):
    sandbox = made.sandbox
    if not list(repository(sandbox).glob("backup/*/*F")):
        ok(workspace.run("pitr.setup", "--env", "local"))  # this test alone
        ok(workspace.run("pitr.base", "--env", "local"))
    segments = [switch_and_wait(sandbox) for _ in range(3)]
    with app_conn(sandbox) as conn:
        moment = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        databases = conn.execute("SELECT datname FROM pg_database ORDER BY 1").fetchall()
    lost = list((repository(sandbox) / "archive" / "local").glob(f"*/*/{segments[1]}-*"))
    assert len(lost) == 1
    lost[0].unlink()
    at = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    refused = workspace.run("restore", "--env", "local", "--to-time", at)
    assert refused.exit_code == 3, str(refused)
    assert f"WAL segment {segments[1]} is missing" in refused.stderr and "nothing was changed" in refused.stderr
    with app_conn(sandbox) as conn:
        assert conn.execute("SELECT datname FROM pg_database ORDER BY 1").fetchall() == databases, "not touched"
    gap = ok(workspace.run("pitr.list", "--env", "local", "--json")).json()["backups"][0]["gap"]
    assert gap["missing"] == segments[1] and gap["resumes"] == segments[2]
