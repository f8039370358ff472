"""The database host reached over SSH (`pitr.host`) for point-in-time recovery: the calls of this machine's
`LocalMachine` (ops/pitr_host.py), as shell commands built by the pure functions below and run there by
ops/hosts.py. That runner starts each command in a process group of its own on the host and stops the group
when opsbook is interrupted or the command times out; values passed as `environment` (the bucket's key, the
admin role's password, a credentials file's content) travel on the command's stdin, never on its command line.

opsbook logs in as the server's OS user or as root; as root, the commands that must be the server's (the
engine's, pg_ctl) run through `runuser` and the files it writes are given to that user.
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ops import hosts
from ops.errors import CheckFailed, StepFailed
from ops.hosts import CommandResult, HostConfig, HostConnection

if TYPE_CHECKING:
    from ops.pitr_engine import Engine

CONTENT_VARIABLE = "OPSBOOK_PITR_CONTENT"
QUICK_SECONDS = 60
ENGINE_SECONDS = 3600  # a base backup of a large database


# --- pure command builders ---------------------------------------------------------------------------------------


def _runuser(login_user: str, os_user: str | None) -> list[str]:
    """The prefix that runs a command as `os_user` (runuser, when we log in as root and it is another user)."""
    return ["runuser", "-u", os_user, "--"] if os_user and login_user == "root" and os_user != "root" else []


def as_user(command: list[str], login_user: str, os_user: str | None) -> str:
    """`command` as a shell line run as `os_user`."""
    return shlex.join([*_runuser(login_user, os_user), *command])


def _give(path: str, login_user: str, os_user: str) -> str:
    """chown to the server's user: only root can, and only root needs to (else we are that user)."""
    return f" && chown {shlex.quote(os_user)}: {path}" if login_user == "root" and os_user != "root" else ""


def data_dir_command(data_dir: Path) -> str:
    """Prints the data directory's PG_VERSION, then its real path; nothing when it has no PG_VERSION."""
    quoted = shlex.quote(str(data_dir))
    return f"if [ -f {quoted}/PG_VERSION ]; then cat {quoted}/PG_VERSION && cd {quoted} && pwd -P; fi"


def resolve_command(path: Path) -> str:
    quoted = shlex.quote(str(path))
    return f"cd {quoted} 2>/dev/null && pwd -P || echo {quoted}"


def fingerprint_command(path: Path) -> str:
    """The SHA-256 of the file's content (never the content: it may hold a key); nothing when it is missing."""
    quoted = shlex.quote(str(path))
    return f"if [ -f {quoted} ]; then sha256sum < {quoted}; fi"


def owner_command(path: Path) -> str:
    quoted = shlex.quote(str(path))
    return f"if [ -d {quoted} ]; then stat -c %U {quoted}; fi"


def folder_command(path: Path, login_user: str, os_user: str) -> str:
    quoted = shlex.quote(str(path))
    return f"mkdir -p {quoted} && chmod 0750 {quoted}{_give(quoted, login_user, os_user)}"


def empty_folder_command(path: Path, login_user: str, os_user: str) -> str:
    """Prints what `path` held, then leaves it an empty 0700 folder of the server's user."""
    quoted = shlex.quote(str(path))
    return (f"ls -A {quoted} 2>/dev/null; rm -rf -- {quoted} && mkdir -p {quoted} && chmod 0700 {quoted}"
            f"{_give(quoted, login_user, os_user)}")


def write_command(path: Path, mode: int, login_user: str, os_user: str) -> str:
    """Writes ${CONTENT_VARIABLE} (sent on stdin) under a temporary name, 0600 from the start, then renames it;
    its folder 0700 and the server's."""
    folder, partial, target = (shlex.quote(str(item)) for item in (path.parent, f"{path}.tmp", path))
    return (f"umask 077 && mkdir -p {folder} && chmod 0700 {folder}{_give(folder, login_user, os_user)} && "
            f"printf '%s' \"${CONTENT_VARIABLE}\" > {partial} && chmod {mode:04o} {partial}"
            f"{_give(partial, login_user, os_user)} && mv -f {partial} {target}")


def missing_tools_command(tools: Iterable[str]) -> str:
    """Prints each of `tools` that is not on the PATH of the host's shell."""
    names = " ".join(shlex.quote(tool) for tool in tools)
    return f'for tool in {names}; do command -v "$tool" >/dev/null 2>&1 || echo "$tool"; done'


def pg_ctl_restart_command(data_dir: Path, major: int, log_file: Path, timeout: int, bin_dir: Path | None,
                           login_user: str, os_user: str) -> str:
    """pg_ctl restart of the major version's server programs (pitr.bin_dir, else Debian's, else pg_config's)."""
    find = (f"bin={shlex.quote(str(bin_dir))}" if bin_dir else
            f"bin=/usr/lib/postgresql/{major}/bin; [ -x \"$bin/pg_ctl\" ] || bin=$(pg_config --bindir)")
    # -l: without a log file the server would keep the command's output open
    arguments = ["restart", "-D", str(data_dir), "-m", "fast", "-w", "-t", str(timeout), "-l", str(log_file)]
    prefix = shlex.join(_runuser(login_user, os_user))
    return f'{find}; {prefix}{" " if prefix else ""}"$bin/pg_ctl" {shlex.join(arguments)}'


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- the host ----------------------------------------------------------------------------------------------------


class SshMachine:
    """The database host over SSH: a connection per call, or one for the calls inside `session()` (a step's
    several quick checks); none is left open between steps, which a restart or a long backup may outlast."""

    def __init__(self, config: HostConfig):
        self.config = config
        self.where = f"host {config.name} ({config.target})"
        self._connection: HostConnection | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with hosts.connect(self.config) as connection:
            self._connection = connection
            try:
                yield
            finally:
                self._connection = None

    def _run(self, command: str, *, environment: Mapping[str, str] | None = None,
             timeout: float = QUICK_SECONDS) -> CommandResult:
        if self._connection is not None:
            return self._connection.run(command, environment=environment, timeout=timeout)
        with hosts.connect(self.config) as connection:
            return connection.run(command, environment=environment, timeout=timeout)

    def data_directory(self, data_dir: Path) -> int | None:
        """The major version of the data directory there; None when it has no PG_VERSION."""
        lines = self._run(data_dir_command(data_dir)).stdout.split()
        return int(lines[0].split(".")[0]) if lines else None

    def resolve(self, path: Path) -> str:
        return self._run(resolve_command(path)).stdout.strip()

    def matches(self, path: Path, text: str) -> bool:
        return self._run(fingerprint_command(path)).stdout.split()[:1] == [digest(text)]

    def owned_by(self, path: Path, user: str) -> bool:
        owner = self._run(owner_command(path)).stdout.strip()
        return bool(owner) and (self.config.user != "root" or owner == user)

    def make_folder(self, path: Path, user: str) -> None:
        self._run(folder_command(path, self.config.user, user))

    def empty_folder(self, path: Path, user: str) -> list[str]:
        return self._run(empty_folder_command(path, self.config.user, user)).stdout.split()

    def write_private(self, path: Path, text: str, mode: int, user: str) -> None:
        self._run(write_command(path, mode, self.config.user, user), environment={CONTENT_VARIABLE: text})

    def check_installed(self, engine: Engine) -> None:
        missing = self._run(missing_tools_command(engine.tools)).stdout.split()
        if missing:
            raise CheckFailed(f"{engine.name} is not installed on {self.where}: {', '.join(missing)} not found",
                              hint=engine.install_hint)

    def restart(self, data_dir: Path, major: int, log_file: Path, timeout: int, bin_dir: Path | None,
                os_user: str, command: str | None) -> None:
        line = command or pg_ctl_restart_command(data_dir, major, log_file, timeout, bin_dir, self.config.user,
                                                 os_user)
        self._run(line, timeout=timeout * 2)

    def run(self, command: list[str], engine: Engine, *, user: str | None, extra: Mapping[str, str] | None,
            what: str) -> str:
        """An engine command there (as `user`), its credentials and `extra` on its stdin; its stdout."""
        environment = {**engine.credentials(), **(extra or {})}
        try:
            return self._run(as_user(command, self.config.user, user), environment=environment,
                             timeout=ENGINE_SECONDS).stdout
        except StepFailed as error:
            raise StepFailed(f"{what}: {error.message}", hint=error.hint, where=error.where) from None
