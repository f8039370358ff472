"""The point-in-time recovery engine's interface, which engine a backup storage gets, and what every engine
shares: base backups and WAL continuity (pure), and the runner of the engine's commands.

The engine is chosen by the provider of the environment's backup storage, so the archive lives beside
the dumps: an S3 or R2 bucket gets barman-cloud (ops/pitr_barman.py: it runs against any S3 endpoint,
plain-HTTP test servers included, where pgBackRest's S3 repository insists on TLS); a folder bucket (the
sandbox's, a mounted disk) gets pgBackRest with its POSIX repository (ops/pitr_pgbackrest.py), which
barman-cloud cannot write to. The runbooks (pitr_setup, pitr_base, pitr_catalog, pitr_scratch,
pitr_restore, pitr_status) only use `Engine`, the types below and `run`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ops import processes
from ops.errors import CheckFailed, StepFailed
from ops.lazy_dataclasses import dataclass
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    from ops.pg_url import DatabaseTarget
    from ops.pitr_lsn import Lsn
    from ops.storage import ObjectInfo, StorageConfig

# backup storage provider -> the engine that archives into it
ENGINES = {"s3": "barman-cloud", "r2": "barman-cloud", "local": "pgbackrest"}
PASSPHRASE_KEY = "PITR_CIPHER_PASS"  # the secret store's entry: the passphrase of an engine that encrypts
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENT_NAME_LENGTH = 24
HISTORY_SUFFIX = ".history"  # a timeline history file: its timeline (8 hex digits), then this
OUTPUT_TAIL = 1500


def engine_name(config: StorageConfig) -> str:
    """The engine for the backup storage `config`; CheckFailed for a provider none of them writes to."""
    name = ENGINES.get(config.provider)
    if name is None:
        raise CheckFailed(f"point-in-time recovery cannot archive into {config.provider} storage ({config.bucket})",
                          hint="set backups.provider to s3 or r2 (barman-cloud), or local, a folder (pgBackRest)")
    return name


@dataclass(frozen=True)
class ServerSide:
    """What an engine needs of the database host to write its files and commands (ops/pitr_host.py)."""

    data_dir: Path
    os_user: str
    config_dir: Path  # outside PGDATA: no base backup holds what is in it
    window_days: int


class Engine(ABC):
    """One engine's command lines (pure) and what it stores where. `files` are written by `pitr.setup`."""

    name: ClassVar[str]
    tools: ClassVar[tuple[str, ...]]
    install_hint: ClassVar[str]
    server_owns_archive: ClassVar[bool] = False  # its files are the server's OS user's: run it as that user
    encrypts: ClassVar[bool] = False  # it encrypts what it stores with a passphrase of opsbook's (PASSPHRASE_KEY)
    server: str  # the name the engine files the environment's archive under
    passphrase: Secret | None = None  # from the environment's secret store; None: the archive is not encrypted

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the archive is, for people: a URL or a folder."""

    @property
    @abstractmethod
    def wal_root(self) -> str:
        """The WAL archive's folder relative to the backup storage's prefix (listed to find segments)."""

    def credentials(self) -> dict[str, str]:
        """Secret values the engine's commands need in their environment (none by default)."""
        return {}

    @abstractmethod
    def files(self, host: ServerSide) -> dict[Path, tuple[str, int]]:
        """Each file the server's archive command needs: its content and mode."""

    @abstractmethod
    def archive_command(self, host: ServerSide) -> str:
        """The server's archive_command (with %p)."""

    @abstractmethod
    def recovery_command(self, host: ServerSide | None, data_dir: Path) -> str:
        """restore_command (with %f and %p) for a cluster recovering in `data_dir` on this machine."""

    def wal_fetch_command(self, segment: str, destination: str) -> list[str] | None:
        """The engine's own command that fetches one archived WAL segment to `destination`, run ahead of a
        recovery that would otherwise fetch the segments one by one (None: not offered)."""
        return None

    def wal_batch_fetch_command(self, segments: list[str]) -> list[str] | None:
        """One engine process that fetches `segments`, in order, into its working folder: each to NAME.part,
        renamed to NAME once complete, its name then printed on a line (None: not offered; the segments are
        then fetched one process each with wal_fetch_command)."""
        return None

    def directories(self, host: ServerSide) -> list[Path]:
        """Folders the server's OS user must own and write (the archive's, the engine's spool)."""
        return []

    def prepare_command(self, host: ServerSide, target: DatabaseTarget) -> list[str] | None:
        """What makes the archive ready before the first segment (None: nothing)."""
        return None

    def prepared(self, objects: Iterable[ObjectInfo]) -> bool:
        """Whether the prepare command has run, from a listing of `root`."""
        return True

    def check_command(self, host: ServerSide, target: DatabaseTarget) -> list[str] | None:
        """The engine's own check of archiving, run after opsbook's proof (None: none)."""
        return None

    @abstractmethod
    def backup_command(self, host: ServerSide, target: DatabaseTarget) -> list[str]:
        """A compressed base backup of the server `target` (run as the server's OS user)."""

    @abstractmethod
    def retention_command(self, host: ServerSide) -> list[str]:
        """The engine's own delete of base backups and WAL the recovery window no longer needs."""

    @abstractmethod
    def restore_command(self, backup_id: str, data_dir: Path, target: datetime | Lsn | None) -> list[str]:
        """The base backup's files into `data_dir` (on this machine)."""

    @abstractmethod
    def backups(self, objects: list[ObjectInfo], read: Callable[[str], bytes]) -> list[BaseBackup]:
        """The base backups, from a listing of the engine's folder (`read`: a key's bytes), oldest first."""

    @abstractmethod
    def wal_segments(self, objects: Iterable[ObjectInfo]) -> dict[str, datetime]:
        """Archived WAL segment name -> when it reached the archive, from a listing of the engine's folder."""

    def history_files(self, objects: Iterable[ObjectInfo]) -> set[str]:
        """The timeline history files (00000002.history) in a listing of the engine's folder, whatever suffix
        the engine gives them."""
        names = (item.key.rsplit("/", 1)[-1][:8 + len(HISTORY_SUFFIX)] for item in objects
                 if item.key.startswith(self.wal_root))
        return {name for name in names if is_history_name(name)}

    @property
    @abstractmethod
    def root(self) -> str:
        """The engine's folder relative to the backup storage's prefix: one listing of it is the catalog."""

    def check_installed(self) -> None:
        missing = [tool for tool in self.tools if shutil.which(tool) is None]
        if missing:
            raise CheckFailed(f"{self.name} is not installed here: {', '.join(missing)} not found",
                              hint=self.install_hint)


# --- the runner ----------------------------------------------------------------------------------------------------


def default_os_user() -> str:
    """The server's OS user: `postgres` when we are root, else ourselves."""
    return "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


def as_user(command: list[str], user: str | None) -> list[str]:
    """`command` run as the OS user `user` (the server's) when we are root and it is another user."""
    if not user or os.geteuid() != 0 or user == "root":
        return command
    return ["runuser", "-u", user, "--", *command]


def run(command: list[str], engine: Engine, *, user: str | None = None, extra: Mapping[str, str] | None = None,
        what: str, timeout: float = 3600) -> str:
    """Runs an engine command (as `user`) with the engine's credentials; its stdout. StepFailed, its output
    redacted, when it fails."""
    base = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "PG"))}
    environment = {**base, **engine.credentials(), **(extra or {})}
    try:
        with processes.child_process(as_user(command, user), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=environment, start_new_session=True) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except BaseException:
                stop_group(process)  # runuser's child too: it would go on writing where we clean up
                raise
    except processes.CannotStart as error:
        raise CheckFailed(f"cannot start {command[0]}: {error}", hint=engine.install_hint) from None
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


# --- base backups and WAL (pure) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseBackup:
    """One base backup, as its engine records it."""

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


def _hex(text: str) -> bool:
    return all(c in "0123456789ABCDEF" for c in text)


def is_segment_name(name: str) -> bool:
    return len(name) == SEGMENT_NAME_LENGTH and _hex(name)


def is_history_name(name: str) -> bool:
    """00000002.history: the history file of timeline 2."""
    return len(name) == 8 + len(HISTORY_SUFFIX) and name.endswith(HISTORY_SUFFIX) and _hex(name[:8])


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
