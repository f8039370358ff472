"""Drive the real CLI (`python -m invoke …`) in a subprocess and keep every byte it prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    args: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"inv {' '.join(self.args)} -> {self.exit_code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@dataclass
class Opsbook:
    """A workspace: an inventory file, a state dir, the environment variables its references need."""

    root: Path
    environ: dict[str, str] = field(default_factory=dict)
    transcript: list[str] = field(default_factory=list)

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.yaml"

    @property
    def state_dir(self) -> Path:
        return self.root / ".ops"

    def write_inventory(self, data: dict[str, Any] | str) -> Path:
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        self.inventory.write_text(text)
        return self.inventory

    def process_environment(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("OPS_", "PG"))}
        return {**base, "OPS_INVENTORY": str(self.inventory), "OPS_HOME": str(self.state_dir),
                "OPS_OPERATOR": "tester", **self.environ}

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "invoke", "--search-root", str(REPOSITORY), *args]

    def run(self, *args: str, timeout: float = 180, stdin: str | None = None) -> CliResult:
        completed = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout,
                                   env=self.process_environment(), cwd=self.root, input=stdin)
        result = CliResult(args, completed.returncode, completed.stdout, completed.stderr)
        self.transcript.append(result.output)
        return result

    def run_on_terminal(self, *args: str, timeout: float = 180) -> CliResult:
        """Like run, with stderr on a pseudo-terminal (as when a person watches): its bytes as the terminal got them."""
        controller, terminal = os.openpty()
        environ = {**self.process_environment(), "TERM": "xterm-256color", "COLUMNS": "120"}
        environ.pop("NO_COLOR", None)
        received: list[bytes] = []
        try:
            process = subprocess.Popen(self.command(*args), stdout=subprocess.PIPE, stderr=terminal,
                                       stdin=subprocess.DEVNULL, env=environ, cwd=self.root)
        finally:
            os.close(terminal)  # the child holds its own copy: reading ends when the child exits
        reader = threading.Thread(target=_drain, args=(controller, received), daemon=True)
        reader.start()  # a terminal left unread would block the child once its buffer is full
        try:
            stdout, _ = process.communicate(timeout=timeout)
            reader.join(timeout)
        finally:
            os.close(controller)
        result = CliResult(args, process.returncode, stdout.decode(), b"".join(received).decode(errors="replace"))
        self.transcript.append(result.output)
        return result

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.process_environment(), cwd=self.root, stdin=subprocess.DEVNULL)

    def collect(self, process: subprocess.Popen[str], timeout: float = 60) -> CliResult:
        stdout, stderr = process.communicate(timeout=timeout)
        result = CliResult(tuple(process.args[4:]), process.returncode, stdout, stderr)
        self.transcript.append(result.output)
        return result

    def journals(self) -> list[Path]:
        return sorted((self.state_dir / "runs").glob("*.jsonl"))

    def journal(self, run_id: str) -> list[dict[str, Any]]:
        path = self.state_dir / "runs" / f"{run_id}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def latest_run_id(self) -> str:
        """The run started last: ids sort by their start second only (two runs of one second tie), so by the
        first entry's time, to the microsecond."""
        def started(path: Path) -> str:
            with path.open(encoding="utf-8") as journal:
                first = journal.readline()
            return json.loads(first)["time"] if first.strip() else ""

        return max(self.journals(), key=lambda path: (started(path), path.stem)).stem

    def everything_produced(self) -> str:
        """Every output and every file written under the state dir, except the secret store itself."""
        parts = list(self.transcript)
        for path in sorted(self.state_dir.rglob("*")):
            if path.is_file() and "secrets" not in path.relative_to(self.state_dir).parts:
                parts.append(path.read_bytes().decode(errors="replace"))
        return "\n".join(parts)


def terminal_lines(text: str) -> list[str]:
    """What a terminal shows, as plain text lines: colours and cursor moves left out, each redraw its own line."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return [line.strip() for line in re.split(r"[\r\n]+", plain) if line.strip()]


def _drain(controller: int, into: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every copy of the terminal's other end is closed
            return
        if not chunk:
            return
        into.append(chunk)


def task_arguments(task: Any) -> list[Any]:
    """An Invoke task's flags, leaving the task as it was: get_arguments pops each flag's help off the task
    as it builds the flag, so a second call (another test, the CLI contract test) would find none."""
    kept = dict(task.help)
    try:
        return task.get_arguments()
    finally:
        task.help.update(kept)


def wait_for(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def http_status(url: str) -> int:
    """The HTTP status `url` answers with; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError as error:
        return getattr(error, "code", 0)
