"""pgBackRest, the point-in-time recovery engine of folder backup buckets (the sandbox's, a mounted disk):
its POSIX repository in the bucket's folder, its command lines (pure functions), and what opsbook reads
of it (ops/pitr_engine.py has the interface).

The repository is `PATH/BUCKET/PREFIXpitr` (`repo1-type=posix`), so a folder bucket holds it as an S3
bucket holds barman-cloud's `PREFIXpitr/`; the stanza is the environment's name (pitr.server_name):

    PREFIXpitr/archive/STANZA/15-1/<timeline+log>/<segment>-<sha1>.zst   the WAL archive (archive-push)
    PREFIXpitr/backup/STANZA/<label>/backup.manifest, pg_data/…          base backups (backup --type=full)

The server's side (archive-push, stanza-create, check, backup, expire) reads a configuration file
opsbook writes outside PGDATA (0600, the server's OS user's). A repository `pitr.setup` creates is
encrypted (aes-256-cbc, every file: WAL, backups, manifests) with a passphrase generated once into the
environment's secret store (ops/pitr_cipher.py): in the configuration file for the server's side, in
the environment (PGBACKREST_REPO1_CIPHER_*) of every command opsbook runs, never on a command line.
What this machine reads (info, restore, archive-get for a scratch cluster) takes the repository on its
command line (--no-config), as the break-glass commands in the README do. Messages go to stderr only
(--log-level-stderr), never to a log file. The base backups come from `info --output=json`; the WAL
continuity from the repository's listing, since info's min/max says nothing of a segment missing between
them.
"""

from __future__ import annotations

import functools
import json
import shlex
import subprocess
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.errors import CheckFailed, StepFailed
from ops.lazy_dataclasses import dataclass
from ops.pitr_engine import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT_NAME_LENGTH,
    BaseBackup,
    Engine,
    ServerSide,
    as_user,
    default_os_user,
    is_segment_name,
    run,
)
from ops.pitr_lsn import Lsn
from ops.secrets import Secret

if TYPE_CHECKING:
    from ops.pg_url import DatabaseTarget
    from ops.storage import ObjectInfo, StorageConfig

ENGINE = "pgbackrest"
TOOLS = ("pgbackrest",)
INSTALL_HINT = ("install pgBackRest on the database host and on this machine: `apt-get install pgbackrest` "
                "(Debian/Ubuntu; brew install pgbackrest on macOS)")
CONFIG_FILE = "pgbackrest.conf"
CIPHER_TYPE = "aes-256-cbc"
COMPRESS_TYPES = ("zst", "lz4", "gz")  # the first this build of pgBackRest supports; gz always is
OPTION_INVALID_VALUE = 32  # pgBackRest's exit code for a compress-type it was built without
MESSAGES = ["--log-level-console=off", "--log-level-stderr=warn", "--log-level-file=off"]
# a base backup is many small files, each synced to the repository as it is written (and each restored file
# synced too): four at a time, not one, roughly halves the time the sandbox's backup and restore take
PROCESS_MAX = 4


@dataclass(frozen=True)
class Repository:
    path: Path  # repo1-path: the folder bucket's PREFIXpitr
    stanza: str

    @property
    def reading(self) -> list[str]:
        """The options of a command run on this machine without the server's configuration file."""
        return ["--no-config", *MESSAGES, "--repo1-type=posix", f"--repo1-path={self.path}", f"--stanza={self.stanza}"]


def repository_for(config: StorageConfig, server: str) -> Repository:
    if config.provider != "local":
        raise CheckFailed(f"pgBackRest's POSIX repository needs a folder backup bucket; {config.bucket} is "
                          f"{config.provider}", hint="S3 and R2 buckets are archived by barman-cloud")
    return Repository(Path(config.path or ".").absolute() / config.bucket / f"{config.prefix}pitr", server)


def config_path(host: ServerSide) -> Path:
    return host.config_dir / CONFIG_FILE


def config_text(repository: Repository, host: ServerSide, compress_type: str, passphrase: Secret | None = None) -> str:
    """The server's configuration: the repository (and its cipher), compression, retention by recovery window
    (also applied by the expire each backup ends with), lock and spool folders of the server's user, no log
    file."""
    cipher = f"repo1-cipher-type={CIPHER_TYPE}\nrepo1-cipher-pass={passphrase.reveal()}\n" if passphrase else ""
    return (f"# Written by opsbook (point-in-time recovery through pgBackRest); rewritten by `inv pitr.setup`.\n"
            f"[global]\nrepo1-type=posix\nrepo1-path={repository.path}\n{cipher}"
            f"repo1-retention-full-type=time\nrepo1-retention-full={host.window_days}\n"
            f"compress-type={compress_type}\nprocess-max={PROCESS_MAX}\nstart-fast=y\n"
            "log-level-console=off\nlog-level-stderr=warn\nlog-level-file=off\n"
            f"lock-path={host.config_dir / 'lock'}\nspool-path={host.config_dir / 'spool'}\n\n"
            f"[{repository.stanza}]\npg1-path={host.data_dir}\n")


def configured(repository: Repository, host: ServerSide) -> list[str]:
    return ["pgbackrest", f"--config={config_path(host)}", f"--stanza={repository.stanza}"]


def connected(repository: Repository, host: ServerSide, target: DatabaseTarget) -> list[str]:
    """A configured command that connects to the server: its port here (libpq's PG* variables give the rest:
    the sandbox may move to another port)."""
    return [*configured(repository, host), f"--pg1-port={target.port}"]


@functools.cache
def compress_type() -> str:
    """zst when this pgBackRest was built with it, else lz4, else gz: asked of pgBackRest itself (an option
    value it lacks fails before anything is read)."""
    for candidate in COMPRESS_TYPES[:-1]:
        probe = as_user(["pgbackrest", "--no-config", "--log-level-console=off", "--log-level-stderr=off",
                         f"--compress-type={candidate}", "--stanza=opsbook-probe", "--repo1-path=/nonexistent",
                         "--pg1-path=/nonexistent", "archive-push", "/nonexistent/000000010000000000000001"],
                        default_os_user())
        try:
            result = subprocess.run(probe, capture_output=True, check=False, cwd="/", timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            break
        if result.returncode != OPTION_INVALID_VALUE:
            return candidate
    return COMPRESS_TYPES[-1]


def time_option(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(sep=" ")


def parse_info(text: str) -> list[BaseBackup]:
    """The base backups of `info --output=json`, oldest first. Its times are whole seconds: a backup's end
    is rounded up, so that its earliest recoverable point is never before the backup's consistent point."""
    found = []
    for stanza in json.loads(text or "[]"):
        versions = {db.get("id"): str(db.get("version", "0")) for db in stanza.get("db", [])}
        for item in stanza.get("backup", []):
            version = versions.get((item.get("database") or {}).get("id"), "0")
            archive, stamp = item.get("archive") or {}, item.get("timestamp") or {}
            start = archive.get("start")
            found.append(BaseBackup(
                backup_id=item["label"], status="DONE", begin_time=_epoch(stamp.get("start")),
                end_time=_epoch(stamp.get("stop"), timedelta(seconds=1)), begin_wal=start, end_wal=archive.get("stop"),
                timeline=int(start[:8], 16) if start else 1, segment_size=DEFAULT_SEGMENT_SIZE,
                server_version=int(version.split(".")[0]) * 10000, end_lsn=(item.get("lsn") or {}).get("stop")))
    return sorted(found, key=lambda backup: (backup.begin_time or datetime.min.replace(tzinfo=UTC), backup.backup_id))


def _epoch(value: Any, later: timedelta = timedelta(0)) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) + later if value is not None else None


def wal_segments(objects: Iterable[ObjectInfo], root: str) -> dict[str, datetime]:
    """Archived WAL segment name -> when it reached the repository, from `ARCHIVE_ID/TLLOG/NAME-SHA1[.EXT]`
    under `root` (history, backup-label and .partial files left out)."""
    segments = {}
    for item in objects:
        parts = item.key.removeprefix(root).split("/")
        if len(parts) != 3:
            continue
        name = parts[2][:SEGMENT_NAME_LENGTH]
        if is_segment_name(name) and parts[2][SEGMENT_NAME_LENGTH:SEGMENT_NAME_LENGTH + 1] == "-":
            segments[name] = item.last_modified
    return segments


class PgBackRest(Engine):
    """pgBackRest with its repository in a folder bucket (ops/pitr_engine.py has the interface)."""

    name = ENGINE
    tools = TOOLS
    install_hint = INSTALL_HINT
    server_owns_archive = True
    encrypts = True

    def __init__(self, config: StorageConfig, server: str):
        self.repository = repository_for(config, server)
        self.server = server
        self.prefix = config.prefix

    @property
    def location(self) -> str:
        return str(self.repository.path)

    @property
    def root(self) -> str:
        return f"pitr/archive/{self.repository.stanza}/"

    @property
    def wal_root(self) -> str:
        return self.root

    def credentials(self) -> dict[str, str]:
        if self.passphrase is None:
            return {}
        return {"PGBACKREST_REPO1_CIPHER_TYPE": CIPHER_TYPE, "PGBACKREST_REPO1_CIPHER_PASS": self.passphrase.reveal()}

    def directories(self, host: ServerSide) -> list[Path]:
        return [self.repository.path, host.config_dir / "lock", host.config_dir / "spool"]

    def files(self, host: ServerSide) -> dict[Path, tuple[str, int]]:
        return {config_path(host): (config_text(self.repository, host, compress_type(), self.passphrase), 0o600)}

    def archive_command(self, host: ServerSide) -> str:
        return f"{shlex.join([*configured(self.repository, host), 'archive-push'])} %p"

    def recovery_command(self, host: ServerSide | None, data_dir: Path) -> str:
        command = ["pgbackrest", *self.repository.reading, f"--pg1-path={data_dir}", "archive-get"]
        return f'{shlex.join(command)} %f "%p"'

    def prepare_command(self, host: ServerSide, target: DatabaseTarget) -> list[str] | None:
        return [*connected(self.repository, host, target), "stanza-create"]

    def prepared(self, objects: Iterable[ObjectInfo]) -> bool:
        return any(item.key == self.root + "archive.info" for item in objects)

    def check_command(self, host: ServerSide, target: DatabaseTarget) -> list[str] | None:
        return [*connected(self.repository, host, target), "check"]

    def backup_command(self, host: ServerSide, target: DatabaseTarget) -> list[str]:
        return [*connected(self.repository, host, target), "backup", "--type=full"]

    def retention_command(self, host: ServerSide) -> list[str]:
        return [*configured(self.repository, host), "--repo1-retention-full-type=time",
                f"--repo1-retention-full={host.window_days}", "expire"]

    def restore_command(self, backup_id: str, data_dir: Path, target: datetime | Lsn | None) -> list[str]:
        if isinstance(target, Lsn):
            recovery = ["--type=lsn", f"--target={target}", "--target-action=promote"]
        elif target is not None:
            recovery = ["--type=time", f"--target={time_option(target)}", "--target-action=promote"]
        else:
            recovery = ["--type=default"]
        return ["pgbackrest", *self.repository.reading, f"--pg1-path={data_dir}", f"--set={backup_id}",
                f"--process-max={PROCESS_MAX}", "restore", *recovery]

    def backups(self, objects: list[ObjectInfo], read: Callable[[str], bytes]) -> list[BaseBackup]:
        if not self.prepared(objects):
            return []  # no stanza yet: pitr.setup has not run
        command = ["pgbackrest", *self.repository.reading, "info", "--output=json"]
        try:
            text = run(command, self, user=default_os_user(), what=f"reading {self.location}", timeout=120)
        except StepFailed as error:
            raise CheckFailed(error.message, hint=f"the repository is {self.location}") from None
        return parse_info(text)

    def wal_segments(self, objects: Iterable[ObjectInfo]) -> dict[str, datetime]:
        return wal_segments(objects, self.root)
