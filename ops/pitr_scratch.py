"""A scratch PostgreSQL cluster on this machine, recovered from a base backup and the WAL archive to a
moment or an LSN: what `inv restore --to-time`/`--to-lsn` reads its data from. It is removed on every way
out (failure and interrupt included); one left by a killed run is removed by the next (markers in the
state dir).

It listens only on a Unix socket in its own 0700 directory (trust inside, no TCP), never archives
(the restored settings would point at the source's archive), and takes its configuration from the
command line, which wins over whatever the restored postgresql.conf says (data_directory, hba_file,
ssl certificates of the source's machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from ops import pg, pitr_engine, pitr_lsn, pitr_prefetch
from ops.clock import iso_z_micro
from ops.errors import CheckFailed, ConnectionFailed, OpsError, StepFailed
from ops.lazy_dataclasses import dataclass
from ops.patterns import Pattern
from ops.pitr_engine import Engine
from ops.pitr_lsn import Lsn
from ops.sandbox import find_server_bindir
from ops.secrets import Secret, redact

START_TIMEOUT_SECONDS = 120
RECOVERY_TIMEOUT_SECONDS = 3600
POLL_SECONDS = 0.2
_STOPPED_AT = Pattern(r"recovery stopping (?:before|after) (?:commit|abort) of transaction \d+, time (.+)$")
_LAST_COMMIT = Pattern(r"last completed transaction was at log time (.+)$")


@dataclass
class ScratchCluster:
    directory: Path  # 0700: the data, the socket, the log
    bin_dir: Path
    os_user: str
    port: int = 5432

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        return self.directory / "postgres.log"

    def url(self, user: str, dbname: str) -> Secret:
        return Secret(f"postgresql://{quote(user, safe='')}@/{quote(dbname, safe='')}?host="
                      f"{quote(str(self.directory), safe='')}&port={self.port}")


def server_bin_dir(major: int) -> Path:
    """PostgreSQL `major`'s server programs on this machine; CheckFailed saying how to get them."""
    try:
        bin_dir: Path | None = find_server_bindir(major)
    except OpsError:  # none at all
        bin_dir = None
    if bin_dir is None or _major_of(bin_dir) not in (major, 0):
        raise CheckFailed(f"recovering needs the PostgreSQL {major} server on this machine (the source's version)",
                          hint=f"install it: `apt-get install postgresql-{major}` (Debian/Ubuntu, PGDG repository "
                               f"for other versions) or `brew install postgresql@{major}`")
    return bin_dir


def _major_of(bin_dir: Path) -> int:
    name = bin_dir.parent.name
    return int(name) if name.isdigit() else 0


# The scratch cluster is thrown away after one read: nothing it writes needs to survive a crash (a crash
# fails the run, whose next attempt starts from the bucket again), so replay skips flushing to disk,
# restartpoints are spaced out, and nothing runs beside the replay and the dump (autovacuum).
THROWAWAY_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                      "max_wal_size": "4GB", "checkpoint_timeout": "1h", "autovacuum": "off",
                      "shared_buffers": "256MB", "maintenance_io_concurrency": "32"}


def start_options(cluster: ScratchCluster, recovery: dict[str, str]) -> str:
    """pg_ctl's -o: every setting that keeps the scratch cluster to itself and makes it quick to throw away,
    then the recovery target."""
    settings = {"listen_addresses": "", "unix_socket_directories": str(cluster.directory), "port": str(cluster.port),
                "data_directory": str(cluster.data_dir), "config_file": str(cluster.data_dir / "postgresql.conf"),
                "hba_file": str(cluster.directory / "pg_hba.conf"),
                "ident_file": str(cluster.directory / "pg_ident.conf"),
                "ssl": "off", "archive_mode": "off", "hot_standby": "on", "logging_collector": "off",
                "log_destination": "stderr", "external_pid_file": "", "shared_preload_libraries": "",
                **THROWAWAY_SETTINGS, **recovery}
    return " ".join(f"-c {shlex.quote(f'{name}={value}')}" for name, value in settings.items())


def recovery_settings(restore_command: str, target: datetime | Lsn | None) -> dict[str, str]:
    """The engine-neutral recovery settings: `restore_command` (with %f and %p) is the engine's. Recovery to a
    time, or to an LSN (inclusive, PostgreSQL's default: the record at it is replayed)."""
    settings = {"restore_command": restore_command, "recovery_target_action": "promote",
                "recovery_target_timeline": "current"}
    if isinstance(target, Lsn):
        settings["recovery_target_lsn"] = str(target)
    elif target is not None:
        settings["recovery_target_time"] = target.isoformat(sep=" ")
    return settings


def describe(target: datetime | Lsn | None) -> str:
    if isinstance(target, Lsn):
        return f"LSN {target}"
    return target.isoformat() if target else "the latest point"


def _marker_dir(state_dir: Path) -> Path:
    return state_dir / "pitr" / "scratch"


def remove_leftovers(state_dir: Path, log: Callable[[str], None]) -> None:
    """Scratch clusters of runs killed before they could remove theirs."""
    for marker in sorted(_marker_dir(state_dir).glob("*.json")) if _marker_dir(state_dir).is_dir() else []:
        with contextlib.suppress(OSError, ValueError, KeyError):
            left = json.loads(marker.read_text())
            if _alive(int(left["pid"])):
                continue
            cluster = ScratchCluster(Path(left["directory"]), Path(left["bin_dir"]), left["os_user"])
            log(f"removing the scratch cluster {cluster.directory}, left by run {marker.stem}")
            stop(cluster)
            shutil.rmtree(cluster.directory, ignore_errors=True)
        marker.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def scratch_cluster(state_dir: Path, run_id: str, bin_dir: Path, os_user: str) -> Iterator[ScratchCluster]:
    """A private directory for the cluster, stopped and deleted however the block is left."""
    directory = Path(tempfile.mkdtemp(prefix="opsbook-pitr-"))
    cluster = ScratchCluster(directory, bin_dir, os_user, port=_free_port())
    marker = _marker_dir(state_dir) / f"{run_id}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"directory": str(directory), "bin_dir": str(bin_dir), "os_user": os_user,
                                  "pid": os.getpid()}))
    try:
        _give(directory, os_user)
        yield cluster
    finally:
        stop(cluster)
        shutil.rmtree(directory, ignore_errors=True)
        marker.unlink(missing_ok=True)


def _give(directory: Path, os_user: str) -> None:
    directory.chmod(0o700)
    if os.geteuid() == 0:
        shutil.chown(directory, os_user, os_user)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def restore_base(cluster: ScratchCluster, engine: Engine, backup_id: str, target: datetime | Lsn | None) -> None:
    """The base backup's files into the cluster's data directory, with our own pg_hba.conf beside it."""
    pitr_engine.run(engine.restore_command(backup_id, cluster.data_dir, target), engine,
                    user=cluster.os_user, what=f"restoring base backup {backup_id}")
    _write_as(cluster, cluster.directory / "pg_hba.conf", "local all all trust\n")
    _write_as(cluster, cluster.directory / "pg_ident.conf", "")
    config = cluster.data_dir / "postgresql.conf"
    if not config.exists():  # Debian keeps it in /etc/postgresql: the backup has none
        _write_as(cluster, config, "")
    (cluster.data_dir / "recovery.signal").touch()
    (cluster.data_dir / "postmaster.pid").unlink(missing_ok=True)
    if os.geteuid() == 0:
        shutil.chown(cluster.data_dir / "recovery.signal", cluster.os_user, cluster.os_user)
    cluster.data_dir.chmod(0o700)


def _write_as(cluster: ScratchCluster, path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(path, cluster.os_user, cluster.os_user)


def recover(cluster: ScratchCluster, engine: Engine, target: datetime | Lsn | None,
            spool: Path | None = None) -> dict[str, str | None]:
    """Start the cluster in recovery to `target` (None: the end of the archive) and wait until it is promoted.

    PostgreSQL stops with a FATAL error when the archive ends before the target: that is reported, with the
    log's reason, as a failed check; so is an LSN target the replay did not reach. Returns where recovery
    stopped, from the server's log, the commit time of the newest transaction it replayed (`newest_commit`)
    and the last WAL position replayed (`replay_lsn`). With `spool`, segments fetched ahead there are taken
    from it (ops/pitr_prefetch.py)."""
    command = engine.recovery_command(None, cluster.data_dir)
    if spool is not None:
        command = pitr_prefetch.restore_command(spool, command)
    options = start_options(cluster, recovery_settings(command, target))
    command = pitr_engine.as_user([str(cluster.bin_dir / "pg_ctl"), "start", "-D", str(cluster.data_dir), "-w",
                                   "-t", str(START_TIMEOUT_SECONDS), "-l", str(cluster.log_file), "-o", options],
                                  cluster.os_user)
    base = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "PG"))}
    started = subprocess.run(command, capture_output=True, text=True, check=False, cwd="/", stdin=subprocess.DEVNULL,
                             env={**base, **engine.credentials()}, timeout=START_TIMEOUT_SECONDS * 2)
    if started.returncode != 0 and not _running(cluster):
        raise _recovery_failed(cluster, target)
    _wait_promoted(cluster, target)
    replayed = replay_lsn(cluster)
    if isinstance(target, Lsn) and (replayed is None or replayed < target):
        raise CheckFailed(f"recovery of the scratch cluster ended at LSN {replayed or '(none replayed)'}, before the "
                          f"target LSN {target}", hint="nothing was changed on the target; `inv pitr.list --json` "
                                                       "shows the recoverable LSNs")
    return {**reached(cluster.log_file.read_text(errors="replace")), "newest_commit": newest_commit(cluster),
            "replay_lsn": str(replayed) if replayed else None}


def replay_lsn(cluster: ScratchCluster) -> Lsn | None:
    """The end of the last WAL record recovery replayed (kept by pg_last_wal_replay_lsn() after the promotion)."""
    with pg.connect(cluster.url("postgres", "postgres"), application_name="opsbook pitr", autocommit=True,
                    connect_timeout=5) as connection:
        replayed = connection.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()[0]
    return pitr_lsn.parse_or_none(replayed)


def newest_commit(cluster: ScratchCluster) -> str | None:
    """The commit time of the last transaction recovery replayed (UTC, to the microsecond): the newest data
    present. pg_last_xact_replay_timestamp() keeps it after the promotion; unlike a row's commit time it
    needs no track_commit_timestamp on the source."""
    with pg.connect(cluster.url("postgres", "postgres"), application_name="opsbook pitr", autocommit=True,
                    connect_timeout=5) as connection:
        replayed = connection.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()[0]
    return iso_z_micro(replayed) if replayed is not None else None


def _wait_promoted(cluster: ScratchCluster, target: datetime | Lsn | None) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_SECONDS
    url = cluster.url("postgres", "postgres")
    while time.monotonic() < deadline:
        if not _running(cluster):
            raise _recovery_failed(cluster, target)
        with contextlib.suppress(ConnectionFailed), pg.connect(  # ConnectionFailed: not accepting connections yet
                url, application_name="opsbook pitr", autocommit=True, connect_timeout=5) as connection:
            if not connection.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return
        time.sleep(POLL_SECONDS)  # replaying WAL; bounded by the deadline
    raise StepFailed(f"recovery of the scratch cluster did not end within {RECOVERY_TIMEOUT_SECONDS} s")


def reached(log: str) -> dict[str, str | None]:
    """Where recovery stopped (the first commit after the target) and the last transaction it replayed."""
    stopped = last = None
    for line in log.splitlines():
        if match := _STOPPED_AT.search(line):
            stopped = match[1].strip()
        if match := _LAST_COMMIT.search(line):
            last = match[1].strip()
    return {"stopped_before": stopped, "last_transaction": last}


def _recovery_failed(cluster: ScratchCluster, target: datetime | Lsn | None) -> CheckFailed:
    tail = [line for line in cluster.log_file.read_text(errors="replace").splitlines()
            if "FATAL" in line or "PANIC" in line] if cluster.log_file.exists() else []
    reason = redact(tail[-1].split("FATAL:", 1)[-1].strip()) if tail else "see the scratch cluster's log"
    return CheckFailed(f"recovering the scratch cluster to {describe(target)} failed: {reason}",
                       hint="nothing was changed on the target; `inv pitr.list` shows what is recoverable")


def _running(cluster: ScratchCluster) -> bool:
    status = subprocess.run(pitr_engine.as_user([str(cluster.bin_dir / "pg_ctl"), "status", "-D",
                                                 str(cluster.data_dir)], cluster.os_user),
                            capture_output=True, check=False, cwd="/")
    return status.returncode == 0


def stop(cluster: ScratchCluster) -> None:
    """Stopped at once (nothing it holds is needed again); a stopped cluster is left as it is."""
    if not (cluster.data_dir / "postmaster.pid").exists():
        return
    subprocess.run(pitr_engine.as_user([str(cluster.bin_dir / "pg_ctl"), "stop", "-D", str(cluster.data_dir), "-m",
                                        "immediate", "-w", "-t", "60"], cluster.os_user),
                   capture_output=True, check=False, cwd="/", timeout=120)
