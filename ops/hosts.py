"""SSH connections to app hosts (Fabric), with output redaction and honest errors.

Host keys (ops/known_hosts.py): as OpenSSH's `StrictHostKeyChecking accept-new`, a host's key
is recorded on first contact in opsbook's known-hosts file (`known_hosts` under the state
directory), and a key that differs from the one recorded there or in ~/.ssh/known_hosts is
refused with both fingerprints and how to accept a legitimate change (`inv hosts.forget`).
`strict_host_keys: true` refuses a key found in neither file instead of recording it.

Commands (ops/remote_commands.py) run in a process group of their own on the host: an interrupt
here (SIGINT, or SIGTERM through the CLI), from any thread, or a timeout stops that group there.
Secrets passed in `environment` travel on the command's stdin, never on its command line, so
they do not show in `ps` on the host and need no `AcceptEnv`.

With ops/remote_commands.py, the modules that import fabric and paramiko (inside functions).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shlex
import socket
import urllib.error
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

from ops import known_hosts, remote_commands, web
from ops.errors import ConnectionFailed, Interrupted, OpsError, StepFailed, UsageError
from ops.lazy_dataclasses import dataclass
from ops.remote_commands import ENVIRONMENT_LOAD_FAILED, RemoteCommand, build_command, build_environment_script
from ops.secrets import Secret, redact

if TYPE_CHECKING:
    from fabric import Connection
    from paramiko import SFTPClient, Transport

T = TypeVar("T")

FETCH_BODY_LIMIT = 2048
STDERR_TAIL_LINES = 10


@dataclass(frozen=True)
class HostConfig:
    """How to reach one app host over SSH."""

    name: str
    address: str
    user: str = "deploy"
    port: int = 22
    key_filename: str | None = None  # else the ssh agent and the default keys
    connect_timeout: int = 10
    strict_host_keys: bool = False  # True: refuse a key found in neither known-hosts file; never record one
    known_hosts: str | None = None  # opsbook's known-hosts file; None: unknown keys are refused
    env: str = ""  # the environment's name, for messages

    @property
    def target(self) -> str:
        """user@address:port, for messages."""
        return f"{self.user}@{self.address}:{self.port}"


@dataclass(frozen=True)
class CommandResult:
    """A command run on a host: its exit code and its redacted output."""

    command: str  # as given by the caller, redacted
    exit_code: int
    stdout: str  # redacted
    stderr: str  # redacted

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# --- pure command builders -------------------------------------------------


_PYTHON_FETCH = """\
import sys, urllib.error, urllib.request
url, timeout, limit = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        status, body = response.status, response.read(limit)
except urllib.error.HTTPError as error:
    status, body = error.code, error.read(limit)
except Exception:
    status, body = 0, b""
sys.stdout.write(f"{status}\\n")
sys.stdout.flush()
sys.stdout.buffer.write(body)
"""


def build_fetch_command(url: str, timeout: float, *, prefer_curl: bool = True) -> str:
    """A POSIX sh command printing the HTTP status on line one, then the start of the body."""
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"not an http(s) URL: {redact(url)}", hint="health URLs look like http://127.0.0.1:3000/api/health")
    quoted_url = shlex.quote(url)
    seconds = f"{timeout:g}"
    curl = (
        'body=$(mktemp) || exit 1; '
        f"code=$(curl -s -o \"$body\" -w '%{{http_code}}' --max-time {seconds} {quoted_url}); "
        f'echo "${{code:-0}}"; head -c {FETCH_BODY_LIMIT} "$body"; rm -f "$body"'
    )
    python = f"python3 -c {shlex.quote(_PYTHON_FETCH)} {quoted_url} {seconds} {FETCH_BODY_LIMIT}"
    missing = "echo 'neither curl nor python3 is installed on this host' >&2; exit 127"
    if not prefer_curl:
        return f"if command -v python3 >/dev/null 2>&1; then {python}; else {missing}; fi"
    return (
        f"if command -v curl >/dev/null 2>&1; then {curl}; "
        f"elif command -v python3 >/dev/null 2>&1; then {python}; else {missing}; fi"
    )


def parse_fetch_output(stdout: str) -> tuple[int, str] | None:
    """(status, body) from a fetch command's output; None when it is not that shape."""
    first_line, _, body = stdout.partition("\n")
    if not first_line.strip().isdigit():
        return None
    return int(first_line.strip()), body[:FETCH_BODY_LIMIT]


def _stderr_tail(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return "\n".join(f"    {line}" for line in lines[-STDERR_TAIL_LINES:])


def _short(command: str, limit: int = 200) -> str:
    command = " ".join(command.split())
    return command if len(command) <= limit else command[: limit - 1] + "…"


def _sftp_path(path: str) -> str:
    """SFTP paths are relative to the home directory and know nothing of '~'."""
    if path == "~":
        return "."
    return path[2:] if path.startswith("~/") else path


# --- connections -------------------------------------------------------------


class HostConnection:
    """An open, authenticated SSH connection to one host."""

    def __init__(self, host: HostConfig, connection: Connection):
        self.host = host
        self._connection = connection
        self._sftp_client: SFTPClient | None = None

    def __enter__(self) -> HostConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HostConnection({self.host.name}, {self.host.target})"

    def close(self) -> None:
        if self._sftp_client is not None:
            self._sftp_client.close()
            self._sftp_client = None
        self._connection.close()

    # --- commands ---

    def run(self, command: str, *, check: bool = True, timeout: float | None = None,
            environment: Mapping[str, str | Secret] | None = None) -> CommandResult:
        """Run `command` on the host, output captured and redacted; StepFailed on non-zero if `check`.

        It runs in a process group of its own there, stopped with it when this process is interrupted
        (then Interrupted, or the caller's KeyboardInterrupt) or when `timeout` passes (StepFailed)."""
        from paramiko import SSHException

        shown = redact(_short(command))
        if remote_commands.interrupted():
            raise self._interrupted(shown)
        stdin = build_environment_script(environment) if environment else ""
        remote = RemoteCommand(self._transport(), build_command(command, with_environment=bool(environment)),
                               stdin=stdin, timeout=timeout, open_timeout=self.host.connect_timeout)
        try:
            result = remote.run()
        except (SSHException, OSError, EOFError) as error:
            raise self._lost(f"running `{shown}`", error) from None
        if result.stopped == "interrupted":
            raise self._interrupted(shown)
        if result.stopped:
            raise StepFailed(f"`{shown}` did not finish within {timeout:g} s on {self._where()}; "
                             "it was stopped there", where=self.host.name,
                             hint="find out why it hangs (run it by hand on the host), or raise the timeout")
        outcome = CommandResult(shown, result.exit_code, redact(result.stdout), redact(result.stderr))
        if check and not outcome.ok:
            raise self._command_failed(outcome)
        return outcome

    def _transport(self) -> Transport:
        transport = self._connection.transport
        if transport is None or not transport.is_active():
            raise self._lost("starting a command", EOFError("the connection is closed"))
        return transport

    def _interrupted(self, shown: str) -> Interrupted:
        return Interrupted(f"`{shown}` on {self._where()} was interrupted (and stopped there)", where=self.host.name,
                           hint="`inv runs.resume ID` continues the run")

    def _command_failed(self, result: CommandResult) -> StepFailed:
        message = f"`{result.command}` exited with code {result.exit_code} on {self._where()}"
        tail = _stderr_tail(result.stderr) or _stderr_tail(result.stdout)
        if tail:
            message += f"\n  last output:\n{tail}"
        hint = "read the output above; run the command by hand on the host to investigate"
        if result.exit_code == ENVIRONMENT_LOAD_FAILED:
            hint = "the environment variables could not be loaded by sh on the host"
        return StepFailed(message, hint=hint, where=self.host.name)

    # --- files ---

    def read_text(self, path: str) -> str | None:
        """The file's text, or None when it does not exist."""
        from paramiko import SSHException

        try:
            with self._sftp().open(_sftp_path(path), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        except (OSError, EOFError, SSHException) as error:
            raise self._file_error("read", path, error) from None
        return data.decode("utf-8", errors="replace")

    def write_text_atomic(self, path: str, text: str, *, mode: int = 0o600,
                          keep_previous: str | None = None) -> None:
        """Write a temporary file beside `path`, then rename it over `path` in one step."""
        from paramiko import SSHException

        sftp = self._sftp()
        target = _sftp_path(path)
        temporary = f"{target}.tmp-{secrets.token_hex(4)}"
        try:
            self._write_new_file(temporary, text.encode("utf-8"), mode)
            if keep_previous:
                self._keep_copy(target, _sftp_path(keep_previous))
            sftp.posix_rename(temporary, target)
        except (OSError, EOFError, SSHException) as error:
            self._remove_quietly(temporary)
            raise self._file_error("write", path, error) from None
        except BaseException:
            self._remove_quietly(temporary)
            raise

    def file_mode(self, path: str) -> int | None:
        """Permission bits of `path` (e.g. 0o600), or None when it does not exist."""
        from paramiko import SSHException

        try:
            attributes = self._sftp().stat(_sftp_path(path))
        except FileNotFoundError:
            return None
        except (OSError, EOFError, SSHException) as error:
            raise self._file_error("stat", path, error) from None
        return (attributes.st_mode or 0) & 0o7777

    def chmod(self, path: str, mode: int) -> None:
        from paramiko import SSHException

        try:
            self._sftp().chmod(_sftp_path(path), mode)
        except (OSError, EOFError, SSHException) as error:
            raise self._file_error("chmod", path, error) from None

    def readlink(self, path: str) -> str | None:
        """Where the symlink `path` points (as written in the link), or None when it is missing or not a link."""
        from paramiko import SSHException

        try:
            return self._sftp().readlink(_sftp_path(path))
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno in (errno.EINVAL, None):  # exists but is not a symlink (SFTP gives no errno)
                return None
            raise self._file_error("read the link", path, error) from None
        except (EOFError, SSHException) as error:
            raise self._file_error("read the link", path, error) from None

    def _write_new_file(self, path: str, data: bytes, mode: int) -> None:
        # Exclusive create, and chmod before any byte is written: secrets never sit world-readable.
        with self._sftp().open(path, "wx") as handle:
            handle.chmod(mode)
            handle.set_pipelined(True)
            handle.write(data)

    def _keep_copy(self, source: str, destination: str) -> None:
        sftp = self._sftp()
        try:
            current_mode = sftp.stat(source).st_mode or 0o600
        except FileNotFoundError:
            return  # nothing to keep yet
        with sftp.open(source, "rb") as handle:
            data = handle.read()
        temporary = f"{destination}.tmp-{secrets.token_hex(4)}"
        try:
            self._write_new_file(temporary, data, current_mode & 0o7777)
            sftp.posix_rename(temporary, destination)
        except BaseException:
            self._remove_quietly(temporary)
            raise

    def _remove_quietly(self, path: str) -> None:
        with contextlib.suppress(OSError, EOFError, ConnectionFailed):
            self._sftp().remove(path)

    def _sftp(self) -> SFTPClient:
        if self._sftp_client is None:
            from paramiko import SSHException

            try:
                self._sftp_client = self._connection.sftp()
            except (SSHException, OSError, EOFError) as error:
                raise ConnectionFailed(
                    f"cannot open SFTP on {self._where()}: {redact(error)}",
                    hint="the host's sshd needs an sftp Subsystem (e.g. 'Subsystem sftp internal-sftp')",
                    where=self.host.name) from None
        return self._sftp_client

    def _file_error(self, verb: str, path: str, error: Exception) -> OpsError:
        if not isinstance(error, OSError) or isinstance(error, (ConnectionError, TimeoutError)):
            return self._lost(f"trying to {verb} {path}", error)  # SSHException, EOFError, socket trouble
        reason = os.strerror(error.errno) if error.errno else redact(error)
        hint = "check the path and that its directory exists"
        if error.errno in (errno.EACCES, errno.EPERM):
            hint = f"check that {self.host.user} may {verb} {path} and write its directory"
        return StepFailed(f"cannot {verb} {path} on {self._where()}: {reason}", hint=hint,
                          where=self.host.name)

    # --- HTTP from the host ---

    def fetch_url(self, url: str, *, timeout: float = 10) -> tuple[int, str]:
        """GET `url` from the host itself: (status, first 2 KB of the body); status 0 when unreachable."""
        result = self.run(build_fetch_command(url, timeout), check=False, timeout=timeout + 15)
        parsed = parse_fetch_output(result.stdout)
        if parsed is None:
            tail = _stderr_tail(result.stderr)
            raise StepFailed(f"could not fetch {redact(url)} from {self._where()}"
                             + (f"\n  last output:\n{tail}" if tail else ""),
                             hint="install curl or python3 on the host", where=self.host.name)
        return parsed

    # --- helpers ---

    def _where(self) -> str:
        return f"host {self.host.name} ({self.host.target})"

    def _lost(self, doing: str, error: BaseException) -> ConnectionFailed:
        return ConnectionFailed(f"lost the SSH connection to {self._where()} while {doing}: "
                                f"{redact(error) or type(error).__name__}",
                                hint="check that the host is up and reachable, then run again",
                                where=self.host.name)


def connect(host: HostConfig) -> HostConnection:
    """Open and authenticate an SSH connection now, so that problems surface here."""
    from fabric import Connection

    key_filename = os.path.expanduser(host.key_filename) if host.key_filename else None
    if key_filename and not os.path.isfile(key_filename):
        raise ConnectionFailed(f"SSH key file {key_filename} for host {host.name} does not exist",
                               hint="fix key_filename in the inventory", where=host.name)
    connect_kwargs: dict[str, object] = {"banner_timeout": host.connect_timeout,
                                         "auth_timeout": host.connect_timeout * 2}
    if key_filename:
        # An explicit key is the only key: errors then name what was really tried.
        connect_kwargs.update(key_filename=key_filename, look_for_keys=False, allow_agent=False)
    connection = Connection(host.address, user=host.user, port=host.port,
                            connect_timeout=host.connect_timeout, connect_kwargs=connect_kwargs)
    known_hosts.prepare(connection.client, host)
    try:
        connection.open()
    except Exception as error:
        connection.close()
        failure = _connect_error(host, key_filename, error)
        if failure is None:
            raise
        raise failure from None
    if connection.transport is not None:
        connection.transport.set_keepalive(30)  # long transfers through NAT and firewalls
    return HostConnection(host, connection)


def _connect_error(host: HostConfig, key_filename: str | None, error: Exception) -> ConnectionFailed | None:
    """The operator-facing error for a failed connect, or None for an unexpected one (a bug)."""
    from paramiko import AuthenticationException, BadHostKeyException, PasswordRequiredException, SSHException
    from paramiko.ssh_exception import NoValidConnectionsError

    if isinstance(error, ConnectionFailed):  # the host key policy's own verdict
        return error
    where = f"host {host.name} ({host.target})"
    network_hint = f"check the address and port of {host.name} and that a firewall lets SSH through"
    keys = f"key file {key_filename}" if key_filename else "the ssh agent and default keys (~/.ssh/id_*)"
    if isinstance(error, socket.gaierror):
        return ConnectionFailed(f"cannot resolve the address of {where}: {error.strerror}",
                                hint=network_hint, where=host.name)
    if isinstance(error, NoValidConnectionsError):
        refused = all(e.errno == errno.ECONNREFUSED for e in error.errors.values())
        reason = "connection refused by" if refused else "no route to"
        return ConnectionFailed(f"{reason} {where}", where=host.name,
                                hint=f"{network_hint}, and that sshd runs there")
    if isinstance(error, TimeoutError):
        return ConnectionFailed(f"connection to {where} timed out after {host.connect_timeout} s",
                                hint=network_hint, where=host.name)
    if isinstance(error, PasswordRequiredException):
        return ConnectionFailed(f"the {keys} for {where} is encrypted", where=host.name,
                                hint="load the key into ssh-agent, or use a key without a passphrase")
    if isinstance(error, AuthenticationException):
        return ConnectionFailed(f"authentication failed for {host.user}@{host.address} (host {host.name}) "
                                f"using {keys}", where=host.name,
                                hint=f"add the public key to ~{host.user}/.ssh/authorized_keys on the host, "
                                     "or fix user/key_filename in the inventory")
    if isinstance(error, BadHostKeyException):
        return known_hosts.bad_key_error(host, error)
    if isinstance(error, (SSHException, EOFError)):
        return ConnectionFailed(f"SSH handshake with {where} failed: {redact(error) or type(error).__name__}",
                                hint=f"check that port {host.port} on {host.address} is an SSH server",
                                where=host.name)
    if isinstance(error, OSError):
        return ConnectionFailed(f"cannot connect to {where}: {redact(error.strerror or error)}",
                                hint=network_hint, where=host.name)
    return None


def run_on_hosts(hosts: list[HostConfig],
                 action: Callable[[HostConnection], T]) -> list[tuple[HostConfig, T | OpsError]]:
    """Run `action` on each host in turn; each host's result or OpsError, connections closed after."""
    results: list[tuple[HostConfig, T | OpsError]] = []
    for host in hosts:
        try:
            with connect(host) as connection:
                results.append((host, action(connection)))
        except OpsError as error:
            results.append((host, error))
    return results


def is_loopback(hostname: str | None) -> bool:
    """A loopback name or address (or a Unix socket directory, or none: libpq's local socket)."""
    name = (hostname or "").lower().strip("[]")
    return not name or name in ("localhost", "::1") or name.startswith(("127.", "/"))


def is_on_host(url: str) -> bool:
    """A URL on the host's loopback is only reachable from the host itself."""
    hostname = urlparse(url).hostname
    return bool(hostname) and is_loopback(hostname)


def fetch_from_here(url: str, timeout: float = 10) -> tuple[int, str]:
    """(HTTP status, the start of the body) from this machine; status 0 and the reason when nothing answers."""
    try:
        with web.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(2048).decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read(2048).decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return 0, str(getattr(error, "reason", error))
