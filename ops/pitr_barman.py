"""barman-cloud, the point-in-time recovery engine of S3 and R2 backup buckets: its command lines (pure
functions) and what opsbook reads of its layout in the bucket (ops/pitr_engine.py has the interface).

barman-cloud was chosen for buckets because it runs for real against the test S3 server (moto over
plain HTTP, `--endpoint-url`), as against S3 and R2; pgBackRest's S3 repository insists on TLS.

Layout under the environment's backup bucket (`s3://BUCKET/PREFIXpitr`, server name = the env's):

    PREFIXpitr/SERVER/wals/<timeline+log>/<segment>.gz        the WAL archive (barman-cloud-wal-archive -z)
    PREFIXpitr/SERVER/base/<backup id>/backup.info, data.tar.gz  base backups (backup.info: key=value)

The backup times are read from backup.info itself: `barman-cloud-backup-list --format json`
prints them with ctime(), without their time zone.
"""

from __future__ import annotations

import functools
import shlex
import shutil
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ops.clock import as_utc
from ops.errors import CheckFailed
from ops.lazy_dataclasses import dataclass
from ops.pitr_engine import DEFAULT_SEGMENT_SIZE, BaseBackup, Engine, ServerSide, is_segment_name
from ops.secrets import Secret

if TYPE_CHECKING:
    from ops.pg_url import DatabaseTarget
    from ops.pitr_lsn import Lsn
    from ops.storage import ObjectInfo, StorageConfig

ENGINE = "barman-cloud"
TOOLS = ("barman-cloud-wal-archive", "barman-cloud-wal-restore", "barman-cloud-backup", "barman-cloud-backup-list",
         "barman-cloud-backup-delete", "barman-cloud-restore")
INSTALL_HINT = ("install barman-cloud on the database host and on this machine: `apt-get install barman-cli-cloud` "
                "(Debian/Ubuntu) or `pip install 'barman[cloud]'`")
DEFAULT_REGION = "us-east-1"
ENV_FILE, ARCHIVE_SCRIPT, RESTORE_SCRIPT = "credentials.env", "archive-wal", "restore-wal"


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


@functools.cache
def engine_python() -> str | None:
    """The interpreter barman-cloud's scripts run with (their #! line), which imports barman; None when the
    scripts are not plain Python scripts."""
    script = shutil.which("barman-cloud-wal-restore")
    if script is None:
        return None
    try:
        with open(script, "rb") as opened:
            first = opened.readline(256).decode(errors="replace")
    except OSError:
        return None
    words = first.removeprefix("#!").split() if first.startswith("#!") else []
    if len(words) == 2 and words[0].endswith("/env"):  # #!/usr/bin/env python3
        words = [shutil.which(words[1]) or ""]
    return words[0] if len(words) == 1 and "python" in Path(words[0]).name else None


@functools.cache
def batch_fetch_source() -> str:
    """ops/pitr_barman_fetch.py, run with barman's interpreter from its command line: the OS user it runs as
    need not read opsbook's files."""
    return (Path(__file__).parent / "pitr_barman_fetch.py").read_text(encoding="utf-8")


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


# --- what is in the bucket (pure) -----------------------------------------------------------------------------------


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
        if is_segment_name(name) and (
                rest.endswith((name, name + ".gz", name + ".bz2", name + ".snappy"))):
            segments[name] = item.last_modified
    return segments


# --- the engine ------------------------------------------------------------------------------------------------------


class BarmanCloud(Engine):
    """barman-cloud on an S3 or R2 bucket: the server's archive and restore commands are wrapper scripts
    that read the bucket's key from a 0600 file (ops/pitr_engine.py has the interface)."""

    name = ENGINE
    tools = TOOLS
    install_hint = INSTALL_HINT

    def __init__(self, config: StorageConfig, server: str):
        self.archive = archive_for(config, server)
        self.server = server

    @property
    def location(self) -> str:
        return self.archive.url

    @property
    def root(self) -> str:
        return self.archive.relative_root

    @property
    def wal_root(self) -> str:
        return self.archive.relative_root + "wals/"

    def credentials(self) -> dict[str, str]:
        return self.archive.credentials()

    def files(self, host: ServerSide) -> dict[Path, tuple[str, int]]:
        env_file = str(host.config_dir / ENV_FILE)
        return {
            host.config_dir / ENV_FILE: (credentials_file(self.archive), 0o600),
            host.config_dir / ARCHIVE_SCRIPT: (wrapper_script(wal_archive_command(self.archive), env_file, '"$1"'),
                                               0o700),
            host.config_dir / RESTORE_SCRIPT: (wrapper_script(wal_restore_command(self.archive), env_file,
                                                              '"$1" "$2"'), 0o700),
        }

    def archive_command(self, host: ServerSide) -> str:
        return f"{shlex.quote(str(host.config_dir / ARCHIVE_SCRIPT))} %p"

    def recovery_command(self, host: ServerSide | None, data_dir: Path) -> str:
        # the credentials come from the environment the scratch cluster is started with
        return f"{shlex.join(wal_restore_command(self.archive))} %f %p"

    def wal_fetch_command(self, segment: str, destination: str) -> list[str] | None:
        # barman-cloud-wal-restore has no prefetch of its own: each call is a new Python process
        return [*wal_restore_command(self.archive), segment, destination]

    def wal_batch_fetch_command(self, segments: list[str]) -> list[str] | None:
        python = engine_python()
        if python is None:
            return None
        return [python, "-c", batch_fetch_source(), *wal_restore_command(self.archive)[1:], "--", *segments]

    def backup_command(self, host: ServerSide, target: DatabaseTarget) -> list[str]:
        return backup_command(self.archive, host=target.host, port=target.port, user=target.user)

    def retention_command(self, host: ServerSide) -> list[str]:
        return retention_command(self.archive, host.window_days)

    def restore_command(self, backup_id: str, data_dir: Path, target: datetime | Lsn | None) -> list[str]:
        return restore_command(self.archive, backup_id, str(data_dir))

    def backups(self, objects: list[ObjectInfo], read: Callable[[str], bytes]) -> list[BaseBackup]:
        root = self.archive.relative_root
        return [parse_backup_info(backup_id, read(key).decode(errors="replace"))
                for backup_id, key in sorted(backup_info_keys(objects, root).items())]

    def wal_segments(self, objects: Iterable[ObjectInfo]) -> dict[str, datetime]:
        return wal_segments(objects, self.archive.relative_root)
