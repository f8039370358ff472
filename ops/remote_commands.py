"""Commands on app hosts that stop when opsbook stops: each runs in a process group of its own on the host,
and an interrupt (SIGINT or SIGTERM here) or a timeout ends that whole group there.

Nothing simpler works without a terminal: Fabric forwards Ctrl-C as a `\\x03` byte that a command without a
pty never reads, then waits for the command; closing the channel does not stop it (sshd sends SIGHUP only
with a pty); and OpenSSH refuses the SSH "signal" request for root logins. So the command is started under
`setsid` (when the host has util-linux's), reports its process group id on its first line of output, and
is stopped by a `kill` of that group run over a second channel of the same connection: SIGTERM, then
SIGKILL for what is left after a few seconds. The channel work happens on a helper thread, so an interrupt
in the caller never lands inside paramiko.

Secrets passed in `environment` travel on the command's stdin, never on its command line.
"""

from __future__ import annotations

import contextlib
import shlex
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ops.errors import UsageError
from ops.lazy_dataclasses import dataclass
from ops.patterns import Pattern
from ops.secrets import Secret, reveal

if TYPE_CHECKING:
    from paramiko import Channel, Transport

# Exit code of the environment wrapper when the variables could not be loaded.
ENVIRONMENT_LOAD_FAILED = 125
POLL_SECONDS = 0.02
OUTPUT_GRACE_SECONDS = 2  # after the exit status, how long the rest of the output may take
TERM_GRACE_SECONDS = 3  # between SIGTERM and SIGKILL of the command's process group
SIGNAL_TIMEOUT_SECONDS = 3  # for the `kill` on the second channel
STOP_SECONDS = 15  # the most an interrupted caller waits for the stop: the sum of the above, and then some
_MARKER = Pattern(rb"opsbook-pgid (\d+)\n")
_ENVIRONMENT_NAME = Pattern(r"[A-Za-z_][A-Za-z0-9_]*")
_INTERRUPTED = threading.Event()


def interrupt() -> None:
    """Stop every running remote command and start no other (the CLI's SIGINT/SIGTERM handler calls this)."""
    _INTERRUPTED.set()


def interrupted() -> bool:
    return _INTERRUPTED.is_set()


# --- pure command builders -------------------------------------------------


def build_environment_script(environment: Mapping[str, str | Secret]) -> str:
    """`export NAME='value'` lines for the wrapper to evaluate from stdin."""
    lines = []
    for name, value in environment.items():
        if not _ENVIRONMENT_NAME.fullmatch(name):
            raise UsageError(f"invalid environment variable name {name!r}",
                             hint="use letters, digits and underscores, not starting with a digit")
        lines.append(f"export {name}={shlex.quote(reveal(value))}")
    return "\n".join(lines) + "\n"


def build_command(command: str, *, with_environment: bool = False) -> str:
    """The command line sent to sshd: `command` in the login shell, in a new session when `setsid -w` exists,
    after a first line `opsbook-pgid N` (and, `with_environment`, after loading variables from stdin)."""
    load = f'eval "$(cat)" || exit {ENVIRONMENT_LOAD_FAILED}; ' if with_environment else ""
    inner = f'echo "opsbook-pgid $$"; {load}exec "${{SHELL:-/bin/sh}}" -c "$1"'
    outer = ('if setsid -w true 2>/dev/null; then exec setsid -w sh -c "$1" opsbook "$2"; fi; '
             'exec sh -c "$1" opsbook "$2"')
    return f"sh -c {shlex.quote(outer)} opsbook {shlex.quote(inner)} {shlex.quote(command)}"


def build_signal_command(group: int, signal_name: str) -> str:
    """Signal the process group `group` (or the one process, where it leads no group: no setsid on the host)."""
    script = f"kill -{signal_name} -{group} 2>/dev/null || kill -{signal_name} {group} 2>/dev/null; exit 0"
    return f"sh -c {shlex.quote(script)}"


# --- running ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a remote command ended: exit code, output, and whether it was stopped."""

    exit_code: int  # -1 when the host reported none (killed by a signal)
    stdout: str
    stderr: str
    stopped: str | None = None  # "interrupted" or "timed out": opsbook stopped it


class RemoteCommand:
    """One command on one SSH connection, run to its end or stopped."""

    def __init__(self, transport: Transport, command: str, *, stdin: str = "", timeout: float | None = None,
                 open_timeout: float = 10):
        self._transport = transport
        self._command = command
        self._stdin = stdin
        self._timeout = timeout
        self._open_timeout = open_timeout
        self._cancel = threading.Event()
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._group: int | None = None
        self._exited_at: float | None = None
        self._result: Outcome | BaseException | None = None

    def run(self) -> Outcome:
        """The command's outcome; an interrupt of the caller stops it on the host, then propagates."""
        done = threading.Event()  # not Thread.join: on 3.11 an interrupted join marks the thread as ended
        worker = threading.Thread(target=self._work, args=(done,), name="opsbook-remote-command", daemon=True)
        worker.start()
        try:
            done.wait()
        except BaseException:  # KeyboardInterrupt (SIGINT, or SIGTERM through the CLI's handler)
            self._cancel.set()
            done.wait(STOP_SECONDS)
            raise
        if isinstance(self._result, BaseException):
            raise self._result
        assert self._result is not None
        return self._result

    def _work(self, done: threading.Event) -> None:
        try:
            self._result = self._execute()
        except BaseException as error:  # handed to the caller's thread
            self._result = error
        finally:
            done.set()

    def _execute(self) -> Outcome:
        channel = self._transport.open_session(timeout=self._open_timeout)
        try:
            channel.exec_command(self._command)
            if self._stdin:
                channel.sendall(self._stdin.encode("utf-8"))
            channel.shutdown_write()
            stopped = self._wait(channel)
            if stopped:
                self._stop(channel)
            exit_code = channel.exit_status if channel.exit_status_ready() else -1
        finally:
            channel.close()
        if not stopped and exit_code == -1 and not self._transport.is_active():
            raise EOFError("the connection closed before the command ended")
        return Outcome(exit_code, self._stdout.decode("utf-8", errors="replace"),
                       self._stderr.decode("utf-8", errors="replace"), stopped)

    def _wait(self, channel: Channel) -> str | None:
        """None once the command ended; why it must be stopped otherwise."""
        deadline = time.monotonic() + self._timeout if self._timeout is not None else None
        while not self._ended(channel):
            if self._cancel.is_set() or _INTERRUPTED.is_set():
                return "interrupted"
            if deadline is not None and time.monotonic() > deadline:
                return "timed out"
            channel.status_event.wait(POLL_SECONDS)
            if channel.status_event.is_set():
                time.sleep(POLL_SECONDS)  # exited: the rest of the output is on its way
        return None

    def _ended(self, channel: Channel) -> bool:
        self._drain(channel)
        if not channel.exit_status_ready():
            return False
        if channel.eof_received or channel.closed:
            self._drain(channel)
            return True
        self._exited_at = self._exited_at or time.monotonic()
        # A background process of the command may keep its output open: do not wait for it forever.
        return time.monotonic() - self._exited_at > OUTPUT_GRACE_SECONDS

    def _drain(self, channel: Channel) -> None:
        while channel.recv_ready():
            self._stdout += channel.recv(65536)
        while channel.recv_stderr_ready():
            self._stderr += channel.recv_stderr(65536)
        if self._group is None:
            match = _MARKER.match(self._stdout)
            if match:
                self._group = int(match.group(1))
                del self._stdout[:match.end()]
            elif b"\n" in self._stdout or len(self._stdout) > 64:
                self._group = 0  # no marker (not a POSIX sh?): nothing to signal

    def _stop(self, channel: Channel) -> None:
        """SIGTERM to the command's process group, SIGKILL if it is still there; best effort."""
        self._until(channel, lambda: self._group is not None, 1)
        if not self._group:
            return
        for signal_name, grace in (("TERM", TERM_GRACE_SECONDS), ("KILL", OUTPUT_GRACE_SECONDS)):
            self._signal(signal_name)
            if self._until(channel, lambda: self._ended(channel), grace):
                return

    def _until(self, channel: Channel, condition: Any, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._drain(channel)
            if condition():
                return True
            time.sleep(POLL_SECONDS)
        return bool(condition())

    def _signal(self, signal_name: str) -> None:
        from paramiko import SSHException

        with contextlib.suppress(SSHException, OSError, EOFError):
            killer = self._transport.open_session(timeout=SIGNAL_TIMEOUT_SECONDS)
            try:
                killer.exec_command(build_signal_command(self._group or 0, signal_name))
                killer.shutdown_write()
                killer.status_event.wait(SIGNAL_TIMEOUT_SECONDS)
            finally:
                killer.close()
