"""The point-in-time recovery engine, barman-cloud, behind one module: its command lines (pure
functions), its runner, and what opsbook reads of its layout in the bucket.

barman-cloud was chosen because it runs for real against the test S3 server (moto over plain
HTTP, `--endpoint-url`), as against S3 and R2; pgBackRest's S3 repository insists on TLS. Another
engine would replace this module: the runbooks only use `Archive`, the builders and `run`.

Layout under the environment's backup bucket (`s3://BUCKET/PREFIXpitr`, server name = the env's):

    PREFIXpitr/SERVER/wals/<timeline+log>/<segment>.gz        the WAL archive (barman-cloud-wal-archive -z)
    PREFIXpitr/SERVER/base/<backup id>/backup.info, data.tar.gz  base backups (backup.info: key=value)

The backup times are read from backup.info itself: `barman-cloud-backup-list --format json`
prints them with ctime(), without their time zone.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from ops import processes
from ops.clock import as_utc
from ops.errors import CheckFailed, StepFailed
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    from ops.storage import ObjectInfo, StorageConfig

ENGINE = "barman-cloud"
TOOLS = ("barman-cloud-wal-archive", "barman-cloud-wal-restore", "barman-cloud-backup", "barman-cloud-backup-list",
         "barman-cloud-backup-delete", "barman-cloud-restore")
INSTALL_HINT = ("install barman-cloud on the database host and on this machine: `apt-get install barman-cli-cloud` "
                "(Debian/Ubuntu) or `pip install 'barman[cloud]'`")
DEFAULT_REGION = "us-east-1"
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENT_NAME_LENGTH = 24
OUTPUT_TAIL = 1500


@dataclass(frozen=True)
class Archive:
    """Where one environment's WAL archive and base backups live, and the key that writes them."""

    bucket: str
    prefix: str  # the key prefix of the engine's root ("staging/pitr")
    server: str  # barman's server name: the environment's
    endpoint: str | None
    region: str | None
    access_key_id: Secret | str | None
    secret_access_key: Secret | None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def relative_root(self) -> str:
        """The server's folder relative to the backup bucket's own prefix (`pitr/SERVER/`)."""
        return f"pitr/{self.server}/"

    def credentials(self) -> dict[str, str]:
        """The variables barman-cloud's boto3 reads: secret values, for a child's environment only."""
        values = {"AWS_DEFAULT_REGION": self.region or DEFAULT_REGION}
        if self.access_key_id and self.secret_access_key:
            key_id = self.access_key_id
            values["AWS_ACCESS_KEY_ID"] = key_id.reveal() if isinstance(key_id, Secret) else str(key_id)
            values["AWS_SECRET_ACCESS_KEY"] = self.secret_access_key.reveal()
        return values


def archive_for(config: StorageConfig, server: str) -> Archive:
    """The engine's archive inside the backup bucket `config` (an S3 or R2 bucket)."""
    if config.provider not in ("s3", "r2"):
        raise CheckFailed(f"point-in-time recovery needs an S3 or R2 backup bucket; {config.bucket} is a "
                          f"{config.provider} folder", hint="set backups.provider (s3 or r2), endpoint and keys")
    region = config.region or ("auto" if config.provider == "r2" else None)
    return Archive(bucket=config.bucket, prefix=f"{config.prefix}pitr", server=server, endpoint=config.endpoint,
                   region=region, access_key_id=config.access_key_id, secret_access_key=config.secret_access_key)


# --- command lines (pure) ---------------------------------------------------------------------------------------


def _endpoint(archive: Archive) -> list[str]:
    return ["--endpoint-url", archive.endpoint] if archive.endpoint else []


def wal_archive_command(archive: Archive) -> list[str]:
    """archive_command's engine call; the WAL file's path (%p) follows."""
    return ["barman-cloud-wal-archive", *_endpoint(archive), "-z", archive.url, archive.server]


def wal_restore_command(archive: Archive) -> list[str]:
    """restore_command's engine call; the WAL file's name (%f) and destination (%p) follow."""
    return ["barman-cloud-wal-restore", *_endpoint(archive), archive.url, archive.server]


def backup_command(archive: Archive, *, host: str, port: int, user: str) -> list[str]:
    """A compressed base backup over the server's connection (the OS user must read PGDATA)."""
    return ["barman-cloud-backup", *_endpoint(archive), "-z", "--immediate-checkpoint", "-h", host, "-p", str(port),
            "-U", user, "-d", "postgres", archive.url, archive.server]


def retention_command(archive: Archive, window_days: int) -> list[str]:
    """Base backups and WAL no longer needed for a recovery window of `window_days`, deleted by the engine."""
    return ["barman-cloud-backup-delete", *_endpoint(archive), "--retention-policy",
            f"RECOVERY WINDOW OF {window_days} DAYS", archive.url, archive.server]


def restore_command(archive: Archive, backup_id: str, directory: str) -> list[str]:
    return ["barman-cloud-restore", *_endpoint(archive), archive.url, archive.server, backup_id, directory]


def wrapper_script(command: list[str], env_file: str, arguments: str) -> str:
    """archive_command / restore_command as a script: the credentials come from `env_file` (0600), never
    from the server's settings, where any superuser (and the base backups) would see them."""
    return ("#!/bin/sh\n# Written by opsbook (point-in-time recovery through barman-cloud); rewritten by "
            "`inv pitr.setup`.\nset -e\n"
            f". {shlex.quote(env_file)}\nexport AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION\n"
            f"exec {shlex.join(command)} {arguments}\n")


def credentials_file(archive: Archive) -> str:
    """The env file the wrapper scripts source: secret values (write it 0600, owned by the server's user)."""
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in sorted(archive.credentials().items()))


# --- the runner ----------------------------------------------------------------------------------------------------


def check_installed() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise CheckFailed(f"{ENGINE} is not installed here: {', '.join(missing)} not found", hint=INSTALL_HINT)


def as_user(command: list[str], user: str | None) -> list[str]:
    """`command` run as the OS user `user` (the server's) when we are root and it is another user."""
    if not user or os.geteuid() != 0 or user == "root":
        return command
    return ["runuser", "-u", user, "--", *command]


def run(command: list[str], archive: Archive, *, user: str | None = None, extra: Mapping[str, str] | None = None,
        what: str, timeout: float = 3600) -> str:
    """Runs an engine command (as `user`) with the archive's credentials; its stdout. StepFailed, its output
    redacted, when it fails."""
    base = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "PG"))}
    environment = {**base, **archive.credentials(), **(extra or {})}
    try:
        with processes.child_process(as_user(command, user), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=environment, start_new_session=True) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except BaseException:
                stop_group(process)  # runuser's child too: it would go on writing where we clean up
                raise
    except processes.CannotStart as error:
        raise CheckFailed(f"cannot start {command[0]}: {error}", hint=INSTALL_HINT) from None
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{what}: {command[0]} did not finish within {timeout:.0f} s") from None
    if process.returncode != 0:
        text = redact(" ".join((stderr or b"").decode(errors="replace").split()))[-OUTPUT_TAIL:]
        raise StepFailed(f"{what}: {command[0]} failed (exit {process.returncode}): {text or 'no output'}",
                         hint=f"the engine's own message is above; `{command[0]} --help` documents it")
    return stdout.decode(errors="replace")


def stop_group(process: subprocess.Popen[bytes], seconds: float = 10) -> None:
    """SIGKILL to the process group of `process` (started in its own session), then wait until it is gone."""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
        while time.monotonic() < deadline:
            process.poll()  # reaped: a zombie leader would keep the group alive
            os.killpg(process.pid, 0)  # ProcessLookupError once every member has exited
            time.sleep(0.05)  # bounded by the deadline


# --- what is in the bucket (pure) -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseBackup:
    """One base backup, from its backup.info."""

    backup_id: str
    status: str  # DONE when complete; STARTED, FAILED… otherwise
    begin_time: datetime | None
    end_time: datetime | None
    begin_wal: str | None
    end_wal: str | None
    timeline: int
    segment_size: int
    server_version: int = 0  # PostgreSQL's version number: 150014
    end_lsn: str | None = None  # where the backup became consistent (`0/5000100`): the earliest LSN target

    @property
    def major(self) -> int:
        return self.server_version // 10000

    @property
    def complete(self) -> bool:
        return self.status == "DONE" and self.end_wal is not None and self.end_time is not None


def parse_backup_info(backup_id: str, text: str) -> BaseBackup:
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def moment(name: str) -> datetime | None:
        value = fields.get(name, "None")
        return None if value in ("", "None") else as_utc(datetime.fromisoformat(value))

    def optional(name: str) -> str | None:
        value = fields.get(name, "None")
        return None if value in ("", "None") else value

    segment_size = optional("xlog_segment_size")
    return BaseBackup(backup_id=backup_id, status=fields.get("status", "UNKNOWN"), begin_time=moment("begin_time"),
                      end_time=moment("end_time"), begin_wal=optional("begin_wal"), end_wal=optional("end_wal"),
                      timeline=int(optional("timeline") or 1),
                      segment_size=int(segment_size) if segment_size else DEFAULT_SEGMENT_SIZE,
                      server_version=int(optional("version") or 0), end_lsn=optional("end_xlog"))


def backup_info_keys(objects: Iterable[ObjectInfo], root: str) -> dict[str, str]:
    """backup id -> the key of its backup.info, from a listing of the server's folder `root`."""
    found = {}
    for item in objects:
        parts = item.key.removeprefix(root).split("/")
        if len(parts) == 3 and parts[0] == "base" and parts[2] == "backup.info":
            found[parts[1]] = item.key
    return found


def wal_segments(objects: Iterable[ObjectInfo], root: str) -> dict[str, datetime]:
    """Archived WAL segment name -> when it reached the bucket (history and .partial files left out)."""
    segments = {}
    for item in objects:
        rest = item.key.removeprefix(root)
        if not rest.startswith("wals/"):
            continue
        name = rest.rsplit("/", 1)[-1].split(".", 1)[0]
        if len(name) == SEGMENT_NAME_LENGTH and all(c in "0123456789ABCDEF" for c in name) and (
                rest.endswith((name, name + ".gz", name + ".bz2", name + ".snappy"))):
            segments[name] = item.last_modified
    return segments


def next_segment(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """The WAL segment after `name` on the same timeline."""
    timeline, log, segment = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    per_log = 0x100000000 // segment_size
    segment += 1
    if segment >= per_log:
        log, segment = log + 1, 0
    return f"{timeline:08X}{log:08X}{segment:08X}"


@dataclass(frozen=True)
class Continuity:
    """The WAL from a base backup's first segment on: the last one with no gap before it, and the first gap."""

    last: str | None  # None: not even the first segment is there
    last_archived_at: datetime | None
    missing: str | None  # the first segment missing while later ones exist
    resumes: str | None  # the first segment present after the gap
    resumes_at: datetime | None


def continuity(segments: Mapping[str, datetime], first: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Continuity:
    timeline = first[:8]
    later = sorted(name for name in segments if name[:8] == timeline and name >= first)
    if not later:
        return Continuity(None, None, first, None, None)
    current, last = first, None
    while current in segments:
        last, current = current, next_segment(current, segment_size)
    after = [name for name in later if name > current]
    if last is None:
        return Continuity(None, None, first, after[0] if after else None, segments[after[0]] if after else None)
    return Continuity(last, segments[last], current if after else None, after[0] if after else None,
                      segments[after[0]] if after else None)
