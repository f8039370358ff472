"""Several environments in one run of a read-only task: `--env prod,staging` or `--env all`.

A task declares itself multi-environment once (`@task(klass=OpsTask, multi_env=True)`, ops/cli.py). Its
body then runs once per environment, under a header naming it, with that environment's own pings and
exit code; a summary follows, one line per environment, and the run exits with the worst code
(WORST_FIRST). With --json the one object printed holds each environment's own result. `all` is every
environment of the inventory but the decommissioned ones and the embedded sandbox, each skipped with a
note. Every other task refuses a list (ops/cli.py): what changes things runs on one environment at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any

from ops import inventory
from ops.archive import decommission_marker
from ops.errors import UsageError
from ops.lazy_dataclasses import dataclass
from ops.output import Output, captured_results

ALL = "all"

# The worst first, by how little the run leaves the operator knowing. Interrupted: the run is incomplete.
# Refused (usage, inventory): that environment was not looked at at all. Failed: the check broke partway.
# Check failed: the finding the task exists to report. Lock held: another run is at it, try again later; it
# must never hide a finding. An unknown code counts as a failure.
WORST_FIRST = (130, 2, 1, 3, 75)
OUTCOMES = {0: "ok", 1: "failed", 2: "refused", 3: "check failed", 75: "lock held", 130: "interrupted"}
SUMMARY_ERROR_LIMIT = 160


def requested(env: Any) -> bool:
    """Whether an --env value names several environments (a list, or `all`)."""
    return isinstance(env, str) and ("," in env or env.strip() == ALL)


def worst(codes: Iterable[int]) -> int:
    failed = [code for code in codes if code]
    rank = {code: index for index, code in enumerate(WORST_FIRST)}
    return min(failed, key=lambda code: rank.get(code, rank[1])) if failed else 0


def outcome(code: int | None) -> str:
    return "not run" if code is None else OUTCOMES.get(code, "failed")


@dataclass
class Selection:
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (environment, why `all` leaves it out)


def selected(spec: str) -> Selection:
    """The environments an --env list names, before anything runs: exit 2 for a malformed list or an unknown
    name (with its did-you-mean), as for one environment."""
    found = inventory.load()
    if spec.strip() == ALL:
        selection = Selection([])
        for name in found.env_names:
            reason = skip_reason(found, name)
            if reason:
                selection.skipped.append((name, reason))
            else:
                selection.names.append(name)
        if not selection.names:
            raise UsageError(f"--env all: no environment to run on in {found.file.name} "
                             f"({', '.join(f'{name}: {why}' for name, why in selection.skipped)})",
                             hint="name an environment with --env NAME")
        return selection
    names = [part.strip() for part in spec.split(",")]
    if "" in names:
        raise UsageError(f"--env {spec!r}: an empty name in the list", hint="separate names with commas: "
                                                                          "--env prod,staging")
    if ALL in names:
        raise UsageError(f"--env {spec!r}: `all` cannot be combined with names", hint="--env all, or the names")
    for name in names:
        found.environment(name)
    return Selection(list(dict.fromkeys(names)))


def skip_reason(found: inventory.Inventory, name: str) -> str | None:
    """Why `all` leaves an environment out: decommissioned (flag or marker), or the embedded sandbox, which
    `all` would otherwise start."""
    env = found.environment(name)
    if env.decommissioned:
        return "decommissioned"
    marker = decommission_marker(found.state_dir, name)
    if marker is not None:
        return f"decommissioned on {marker.get('at', '?')}"
    if env.sandbox:
        return "the embedded sandbox (name it to include it)"
    return None


@dataclass
class EnvRun:
    env: str
    code: int | None = None  # None: not run (the run was interrupted before it)
    error: str = ""
    result: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"env": self.env, "exit_code": self.code, "ok": self.code == 0, "outcome": outcome(self.code),
                "error": self.error or None, "result": self.result}


def run_each(task: str, selection: Selection, json_mode: bool, run: Callable[[str], tuple[int, str]]) -> int:
    """Runs `run(env)` → (exit code, error line) for each environment in turn, then the summary; the worst code.
    An interrupt stops the run: the environments after it are not run."""
    output = Output(json_mode=json_mode)
    for name, why in selection.skipped:
        output.info(f"{task}: skipping {name}: {why}")
    runs = [EnvRun(name) for name in selection.names]
    for entry in runs:
        output.info(f"== {entry.env} ==")
        with captured_results() as results:
            entry.code, entry.error = run(entry.env)
        entry.result = results[-1] if results else None
        if entry.code == 130:
            break
    code = worst(entry.code for entry in runs if entry.code is not None)
    summarize(task, runs, selection.skipped, code, output)
    output.result({"task": task, "ok": code == 0, "exit_code": code,
                   "environments": [entry.to_json() for entry in runs],
                   "skipped": [{"env": name, "reason": why} for name, why in selection.skipped]})
    return code


def summarize(task: str, runs: list[EnvRun], skipped: list[tuple[str, str]], code: int, output: Output) -> None:
    output.info("")
    note = f" ({len(skipped)} skipped: {', '.join(name for name, _why in skipped)})" if skipped else ""
    output.info(f"{task} on {len(runs)} environments{note}:")
    width = max(len(entry.env) for entry in runs)
    for entry in runs:
        said = outcome(entry.code)
        line = f"  {entry.env:<{width}}  {said:<12}"
        if entry.code is not None:
            line += f"  exit {entry.code}"
        if entry.error:
            first = entry.error.splitlines()[0]
            line += "  " + (first[:SUMMARY_ERROR_LIMIT] + "…" if len(first) > SUMMARY_ERROR_LIMIT else first)
        output.info(line.rstrip())
    counts: dict[str, int] = {}
    for entry in runs:
        counts[outcome(entry.code)] = counts.get(outcome(entry.code), 0) + 1
    tally = ", ".join(f"{count} {said}" for said, count in counts.items())
    output.info(f"{task}: exit {code} ({outcome(code)}), the worst of {len(runs)} environments: {tally}")
