"""`inv pitr.setup`: continuous WAL archiving to the backup bucket through the engine (ops/pitr_engine.py).

Where the server's machine is another host (`pitr.host`), the files, the PG_VERSION check, the restart and the
engine's commands go there over SSH (ops/pitr_ssh.py); the SQL always goes over the database URL.

1. files: the engine's files (barman-cloud: a 0600 credentials file and 0700 archive/restore scripts;
   pgBackRest: a 0600 configuration file) and folders (pgBackRest's repository), owned by the server's
   OS user, outside the data directory;
2. stanza: what the engine needs before the first segment (pgBackRest's stanza-create);
3. settings: wal_level (replica, or logical kept), archive_mode, archive_command, archive_timeout
   through ALTER SYSTEM, then a reload;
4. restart, when wal_level or archive_mode changed (they take effect only then);
5. archive: proved by a WAL switch: the segment appears in the archive and pg_stat_archiver shows no
   failure since; then the engine's own check, when it has one (pgBackRest's check).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops import pg, pg_url, pitr_cipher, pitr_host
from ops.engine import Change, Runbook, RunContext, Step
from ops.errors import CheckFailed, StepFailed
from ops.pitr_seal import archiver, failed_since

if TYPE_CHECKING:
    import psycopg

    from ops.inventory import Environment
    from ops.pitr_engine import Engine
    from ops.pitr_host import DatabaseHost

RESTART_SETTINGS = ("wal_level", "archive_mode")
ARCHIVE_WAIT_SECONDS = 60.0
POLL_SECONDS = 0.25


class Setup:
    """What the steps share: the environment's database host and engine."""

    def __init__(self, env: Environment):
        self.env = env
        self.host: DatabaseHost = pitr_host.database_host(env)
        self.engine: Engine = pitr_host.engine_of(env)
        self.machine = pitr_host.machine_of(self.host)

    @contextlib.contextmanager
    def connection(self, ctx: RunContext) -> Iterator[psycopg.Connection]:
        """A fresh session each time: a restart ends the old ones."""
        url = pg_url.with_database(self.env.admin_url(), "postgres")
        with pg.connect(url, application_name=ctx.label[:63], autocommit=True) as connection:
            yield connection

    def wanted(self, connection: psycopg.Connection) -> dict[str, str]:
        level = setting(connection, "wal_level")
        mode = setting(connection, "archive_mode")
        return {"wal_level": level if level == "logical" else "replica",
                "archive_mode": mode if mode == "always" else "on",
                "archive_command": self.engine.archive_command(self.host),
                "archive_timeout": str(self.host.archive_timeout)}

    def files(self) -> dict[Path, tuple[str, int]]:
        """Each file the archive and restore commands need: (content, mode)."""
        return self.engine.files(self.host)

    def target(self) -> pg_url.DatabaseTarget:
        return pg_url.parse_url(self.env.admin_url())

    def run(self, command: list[str], what: str) -> str:
        """An engine command on the server's machine as its OS user, connected as the admin role (libpq's
        variables)."""
        return pitr_host.run_engine(self.host, self.machine, command, self.engine, what=what,
                                    extra=pg_url.libpq_environment(pg_url.with_database(self.env.admin_url(),
                                                                                        "postgres")))


def setting(connection: psycopg.Connection, name: str) -> str:
    """The value the server runs with."""
    return connection.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()[0]


def configured(connection: psycopg.Connection, name: str) -> str:
    """The value the configuration files give (ALTER SYSTEM's included), else the running one. (A setting that
    waits for a restart shows the error "setting could not be applied": it still is the configured one.)"""
    row = connection.execute("SELECT setting FROM pg_file_settings WHERE name = %s ORDER BY seqno DESC LIMIT 1",
                             (name,)).fetchone()
    return row[0] if row else setting(connection, name)


class FilesStep(Step):
    name = "files"

    def __init__(self, setup: Setup):
        self.setup = setup
        self.title = (f"write {setup.engine.name}'s files (0600 where they hold a key) in {setup.host.config_dir} "
                      f"on {setup.host.where}, owned by {setup.host.os_user}")

    def check(self, ctx: RunContext) -> Change | None:
        with self.setup.machine.session():
            return self._check(ctx)

    def _check(self, ctx: RunContext) -> Change | None:
        setup, machine = self.setup, self.setup.machine
        machine.check_installed(setup.engine)
        pitr_host.check_data_dir(setup.host, machine)
        with setup.connection(ctx) as connection:
            running = Path(setting(connection, "data_directory"))
        if machine.resolve(running) != machine.resolve(setup.host.data_dir):
            raise CheckFailed(f"the server of {ctx.env.name} runs from {running}, not pitr.data_dir "
                              f"{setup.host.data_dir}",
                              hint="set pitr.data_dir to the server's data directory" + (
                                  f" on {setup.host.where}, or pitr.host to the host it runs on" if setup.host.ssh
                                  else ", or pitr.host to the database host it runs on"))
        files = setup.files()
        stale = [path for path, (text, _mode) in files.items() if not machine.matches(path, text)]
        folders = [path for path in setup.engine.directories(setup.host)
                   if not machine.owned_by(path, setup.host.os_user)]
        if not stale and not folders:
            return None
        return Change(f"write {', '.join(path.name for path in [*stale, *folders])}",
                      [*(f"{path} ({files[path][1]:04o})" for path in stale),
                       *(f"{path}/ (a folder of {self.setup.host.os_user})" for path in folders)])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        with self.setup.machine.session():
            for path in self.setup.engine.directories(self.setup.host):
                self.setup.machine.make_folder(path, self.setup.host.os_user)
            for path, (text, mode) in self.setup.files().items():
                self.setup.machine.write_private(path, text, mode, self.setup.host.os_user)
        return {"config_dir": str(self.setup.host.config_dir)}


class SettingsStep(Step):
    name = "settings"

    def __init__(self, setup: Setup):
        self.setup = setup
        self.title = (f"set wal_level, archive_mode, archive_command (to {setup.engine.location}) and archive_timeout "
                      f"({setup.host.archive_timeout} s) with ALTER SYSTEM, then reload")

    def differences(self, ctx: RunContext) -> dict[str, tuple[str, str]]:
        with self.setup.connection(ctx) as connection:
            wanted = self.setup.wanted(connection)
            current = {name: configured(connection, name) for name in wanted}
        return {name: (current[name], value) for name, value in wanted.items() if current[name] != value}

    def check(self, ctx: RunContext) -> Change | None:
        differences = self.differences(ctx)
        if not differences:
            return None
        return Change(f"ALTER SYSTEM SET {', '.join(differences)}",
                      [f"{name}: {old or '(empty)'} -> {new}" for name, (old, new) in differences.items()],
                      {"settings": {name: new for name, (_old, new) in differences.items()}})

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        with self.setup.connection(ctx) as connection:
            for name, value in change.data["settings"].items():
                pg.alter_system(connection, name, value)
            connection.execute("SELECT pg_reload_conf()")
        return {"settings": change.data["settings"]}


class RestartStep(Step):
    name = "restart"

    def __init__(self, setup: Setup):
        self.setup = setup
        how = setup.host.restart or f"pg_ctl restart -D {setup.host.data_dir}"
        how += f" on {setup.host.where}" if setup.host.ssh else ""
        self.title = f"restart PostgreSQL when wal_level or archive_mode changed ({how})"

    def check(self, ctx: RunContext) -> Change | None:
        with self.setup.connection(ctx) as connection:
            wanted = self.setup.wanted(connection)
            stale = [name for name in RESTART_SETTINGS if setting(connection, name) != wanted[name]]
        if not stale:
            return None
        return Change(f"restart the server: {' and '.join(stale)} {'take' if len(stale) > 1 else 'takes'} effect "
                      "only then",
                      ["its sessions are ended; the app reconnects"])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        pitr_host.restart(self.setup.host, self.setup.machine)
        return {"restarted": True}


class PrepareStep(Step):
    name = "stanza"

    def __init__(self, setup: Setup):
        self.setup = setup
        self.title = f"prepare {setup.engine.name}'s archive in {setup.engine.location}"

    def check(self, ctx: RunContext) -> Change | None:
        command = self.setup.engine.prepare_command(self.setup.host, self.setup.target())
        if command is None or self.setup.engine.prepared(ctx.storage("backups").list(self.setup.engine.root)):
            return None
        return Change(f"create the archive of {self.setup.engine.server}", [" ".join(command)])

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        command = self.setup.engine.prepare_command(self.setup.host, self.setup.target())
        self.setup.run(command, f"preparing the archive of {ctx.env.name}")
        return {"archive": self.setup.engine.location}

    def verify(self, ctx: RunContext) -> None:
        if not self.setup.engine.prepared(ctx.storage("backups").list(self.setup.engine.root)):
            raise StepFailed(f"{self.setup.engine.name} did not create its archive in {self.setup.engine.location}")


class ArchiveStep(Step):
    name = "archive"

    def __init__(self, setup: Setup):
        self.setup = setup
        self.title = "prove archiving: switch WAL, see the segment in the archive and no failure in pg_stat_archiver"

    def check(self, ctx: RunContext) -> Change | None:
        if not ctx.pending("settings") and not ctx.pending("restart") and self.proven(ctx):
            return None
        return Change("switch to a new WAL segment and wait for it in the archive",
                      [f"{self.setup.engine.location} ({self.setup.engine.name})"])

    def proven(self, ctx: RunContext) -> bool:
        with self.setup.connection(ctx) as connection:
            if setting(connection, "archive_command") != self.setup.engine.archive_command(self.setup.host):
                return False
            stats = archiver(connection)
        if stats["last_archived_wal"] is None or failed_since(stats):
            return False
        return stats["last_archived_wal"] in segments(ctx, self.setup.engine)

    def apply(self, ctx: RunContext, change: Change) -> dict[str, Any]:
        started = time.monotonic()
        with self.setup.connection(ctx) as connection:
            connection.execute("SELECT pg_logical_emit_message(false, 'opsbook', 'pitr.setup')")  # WAL to switch
            segment = connection.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            deadline = started + ARCHIVE_WAIT_SECONDS
            while segment not in segments(ctx, self.setup.engine):
                stats = archiver(connection)
                if stats["last_failed_wal"] == segment or time.monotonic() > deadline:
                    raise StepFailed(archive_failure(segment, stats, time.monotonic() > deadline),
                                     hint="read the server's log: the archive command is "
                                          f"{self.setup.engine.archive_command(self.setup.host)}")
                time.sleep(POLL_SECONDS)  # polling the bucket, bounded by the deadline
            stats = archiver(connection)
        seconds = round(time.monotonic() - started, 2)
        ctx.log(f"{segment} reached the archive {seconds} s after the switch")
        checked = self.setup.engine.check_command(self.setup.host, self.setup.target())
        if checked is not None:
            self.setup.run(checked, f"{self.setup.engine.name}'s check of {ctx.env.name}'s archiving")
            ctx.log(f"{self.setup.engine.name} check: archiving works")
        return {"segment": segment, "seconds": seconds, "failed_count": stats["failed_count"],
                "engine": self.setup.engine.name}

    def verify(self, ctx: RunContext) -> None:
        with self.setup.connection(ctx) as connection:
            stats = archiver(connection)
        if failed_since(stats):
            raise StepFailed(f"pg_stat_archiver shows a failed attempt ({stats['last_failed_wal']}) after the last "
                             "archived segment", hint="read the server's log")


def archive_failure(segment: str, stats: dict[str, Any], timed_out: bool) -> str:
    if stats["last_failed_wal"] == segment:
        return f"the archive command failed for {segment} ({stats['failed_count']} failed attempts so far)"
    return f"{segment} did not reach the bucket within {ARCHIVE_WAIT_SECONDS:.0f} s"


def segments(ctx: RunContext, engine: Engine) -> dict[str, Any]:
    return engine.wal_segments(ctx.storage("backups").list(engine.wal_root))


def build(env: Environment, **arguments: Any) -> Runbook:
    setup = Setup(env)
    return Runbook("pitr.setup", f"Point-in-time recovery for {env.name}: WAL archiving to {setup.engine.location} "
                   f"({setup.engine.name})",
                   [pitr_cipher.PassphraseStep(setup), FilesStep(setup), PrepareStep(setup), SettingsStep(setup),
                    RestartStep(setup), ArchiveStep(setup)],
                   arguments=arguments, locks=("environment",))
