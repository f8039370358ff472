"""The run journal: one append-only JSONL file per run under <state>/runs/.

Line 1 is the run header (who, where, what, with which arguments); then one line
per step transition; the last line says how the run ended. Everything written
passes through `masked()` so no secret value reaches the file.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets as random_tokens
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ops.clock import compact_z, iso_z_micro, utc_now
from ops.errors import UsageError
from ops.lazy_dataclasses import dataclass
from ops.secrets import masked

STEP_STATES = ("planned", "unchanged", "started", "applied", "verified", "failed", "undone", "undo_failed",
               "kept", "skipped")


def new_run_id(moment: datetime | None = None) -> str:
    """UTC start time plus a short random suffix: sorts by time, unique enough."""
    moment = moment or utc_now()
    return f"{compact_z(moment)}-{random_tokens.token_hex(2)}"


def operator_name() -> str:
    return os.environ.get("OPS_OPERATOR") or getpass.getuser()


def git_revision(directory: Path) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(directory), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


class Journal:
    """Appends masked JSON lines; flushes each so a killed run leaves a readable trail."""

    def __init__(self, runs_dir: Path, run_id: str):
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.path = runs_dir / f"{run_id}.jsonl"
        self._started = time.monotonic()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"time": iso_z_micro(utc_now()), "event": event, **masked(fields)}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=False, default=str) + "\n")
        return entry

    def step(self, index: int | str, name: str, state: str, **fields: Any) -> dict[str, Any]:
        return self.write("step", index=index, step=name, state=state, **fields)


@dataclass(frozen=True)
class RunRecord:
    """The journal of one run: its id, its file and its entries."""

    run_id: str
    path: Path
    entries: list[dict[str, Any]]

    @property
    def header(self) -> dict[str, Any]:
        return self.entries[0] if self.entries and self.entries[0]["event"] == "run" else {}

    @property
    def outcome(self) -> dict[str, Any] | None:
        last = self.entries[-1] if self.entries else None
        return last if last and last["event"] == "finished" else None

    @property
    def status(self) -> str:
        # A run with no "finished" line was killed (or is still running).
        return self.outcome["status"] if self.outcome else "unfinished"

    def step_states(self) -> dict[str, str]:
        """Each step's last state in this run."""
        states: dict[str, str] = {}
        for entry in self.entries:
            if entry["event"] == "step":
                states[entry["step"]] = entry["state"]
        return states

    def step_outputs(self) -> dict[str, dict[str, Any]]:
        return {entry["step"]: entry.get("outputs") or {} for entry in self.entries
                if entry["event"] == "step" and entry["state"] == "applied"}

    def stopped_at(self) -> str | None:
        for entry in reversed(self.entries):
            if entry["event"] == "step" and entry["state"] in {"started", "applied", "failed"}:
                return entry["step"]
        return None


def read_run(runs_dir: Path, run_id: str) -> RunRecord:
    path = runs_dir / f"{run_id}.jsonl"
    if not path.exists():
        known = sorted(p.stem for p in runs_dir.glob("*.jsonl"))[-5:]
        raise UsageError(f"no run {run_id!r} in {runs_dir}",
                         hint="`inv runs.list` shows the runs" + (f"; latest: {', '.join(known)}" if known else ""))
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a run killed mid-write leaves a partial last line; what came before stands
    return RunRecord(run_id, path, entries)


def list_runs(runs_dir: Path, *, limit: int | None = None) -> list[RunRecord]:
    paths = sorted(runs_dir.glob("*.jsonl"), reverse=True) if runs_dir.exists() else []
    return [read_run(runs_dir, path.stem) for path in paths[:limit]]


def host_name() -> str:
    return socket.gethostname()
