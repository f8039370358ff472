"""Task plumbing shared by every Invoke task: errors → exit codes (the one place), environments, runs."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ops import remote_commands
from ops.errors import Interrupted, OpsError, UsageError
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.engine import Runbook, RunContext, RunResult
    from ops.inventory import Environment, Inventory
    from ops.output import Output

F = TypeVar("F", bound=Callable[..., Any])

COMMON_HELP = {
    "env": "environment name from the inventory (default: the inventory's default_env)",
    "dry_run": "run the read-only probes and print the plan; change nothing",
    "confirm": "type the environment's name to confirm changes to a protected environment",
    "json": "print one JSON object with the result on stdout",
}


def helps(*common: str, **extra: str) -> dict[str, str]:
    """Help for a task's flags: the shared ones named in `common`, plus its own."""
    return {**{name: COMMON_HELP[name] for name in common}, **extra}


def opstask(body: F) -> F:
    """Runs a task body and turns every outcome into the documented exit code."""
    from invoke.exceptions import Exit

    @functools.wraps(body)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ops.output import results_printed

        previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
        printed_before = results_printed()
        try:
            return body(*args, **kwargs)
        except OpsError as error:
            _report(error, error.exit_code, kwargs.get("json", False) and results_printed() == printed_before)
            raise Exit(code=error.exit_code) from None
        except KeyboardInterrupt:
            _report(Interrupted("interrupted"), 130, kwargs.get("json", False))
            raise Exit(code=130) from None
        except Exception as error:  # a traceback is a bug: say so plainly, show it only on request
            if os.environ.get("OPS_DEBUG"):
                print(redact(traceback.format_exc()), file=sys.stderr)
            message = f"internal error: {type(error).__name__}: {error}"
            _report(OpsError(message, hint="this is a bug in opsbook; re-run with OPS_DEBUG=1 for the traceback"),
                    1, kwargs.get("json", False))
            raise Exit(code=1) from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    return wrapper  # type: ignore[return-value]


def _interrupt(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM: commands running on hosts (in any thread) are stopped there, then the run unwinds."""
    remote_commands.interrupt()
    raise KeyboardInterrupt


def _report(error: OpsError, code: int, json_mode: bool) -> None:
    print(redact(f"error: {error}"), file=sys.stderr, flush=True)
    if json_mode:
        payload = {"ok": False, "exit_code": code, "error": redact(error.message), "hint": error.hint}
        print(json.dumps(payload, indent=2), flush=True)


def load_inventory() -> Inventory:
    from ops import inventory

    return inventory.load()


def environment(name: str | None, *, output: Output | None = None,
                allow_decommissioned: bool = False) -> Environment:
    """The named environment, merged; a sandbox environment is started when it is not running.

    A decommissioned environment (inventory flag, or the marker `inv decommission` leaves in the state
    dir) is refused, exit 2, unless the task is a read-only listing (`allow_decommissioned`)."""
    from ops.archive import decommission_marker

    inventory = load_inventory()
    env = inventory.environment(name)
    if env.decommissioned and not allow_decommissioned:
        raise UsageError(f"environment {env.name} is decommissioned", where=env.inventory.location(f"envs.{env.name}"),
                         hint="it keeps its archive and final backup; remove `decommissioned: true` only if it is "
                              "really coming back")
    marker = decommission_marker(inventory.state_dir, env.name)
    if marker is not None and not allow_decommissioned:
        raise UsageError(f"environment {env.name} was decommissioned on {marker.get('at', '?')} by "
                         f"{marker.get('operator', '?')} (run {marker.get('run_id', '?')})",
                         where=str(inventory.state_dir / "decommissioned"),
                         hint=f"its final backup is {marker.get('final_backup', '?')} and its archive "
                              f"{marker.get('archive', '?')}; set `decommissioned: true` on envs.{env.name} in the "
                              "inventory; if `inv decommission` did not finish, run it again to finish it")
    if env.sandbox:
        from ops.sandbox import Sandbox

        sandbox = Sandbox(inventory.state_dir / "sandbox")
        info = sandbox.ensure_running(log=(output or make_output(False)).info)
        env = env.with_overrides(sandbox.overrides(env, info))
    return env


def make_output(json_mode: bool) -> Output:
    from ops.output import Output

    return Output(json_mode=json_mode)


def execute(runbook: Runbook, env: Environment, output: Output, *, dry_run: bool = False,
            confirm: str | None = None, resume: Any = None, run_id: str | None = None,
            result: Callable[[RunContext], dict[str, Any]] | None = None,
            on_failure: Callable[[RunContext, OpsError], None] | None = None) -> RunResult:
    """Runs a runbook and reports it; `result(ctx)` adds to the JSON result of a real run."""
    from ops.engine import RunContext, Runner

    ctx = RunContext(env, output=output, run_id=run_id)
    runner = Runner(runbook, ctx, confirm=confirm, prompt=input, resume=resume)
    try:
        outcome = runner.run(dry_run=dry_run)
    except OpsError as error:
        if on_failure:
            on_failure(ctx, error)
        raise
    output.info(f"{outcome.status} (run {outcome.run_id}; `inv runs.show {outcome.run_id}` for the journal)")
    output.result({**outcome.to_json(), **(result(ctx) if result and not dry_run else {})})
    return outcome
