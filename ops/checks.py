"""Read-only checks (health, preflight): one line each, pass/warn/fail, journaled as a run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ops.engine import RunContext
from ops.errors import CheckFailed, OpsError
from ops.journal import host_name
from ops.lazy_dataclasses import dataclass
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.engine import RunContext
    from ops.inventory import Environment
    from ops.output import Output


@dataclass
class CheckResult:
    """The outcome of one check: its status, what it found and how to fix it."""

    name: str
    status: str  # pass | warn | fail
    detail: str = ""
    fix: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix,
                "seconds": self.seconds}


class Warn(Exception):
    """Raised by a check to report a warning rather than a failure."""


Probe = Callable[[], str]


def run_checks(ctx: RunContext, title: str, probes: list[tuple[str, Probe]]) -> list[CheckResult]:
    """Runs every probe (a failure does not stop the others), prints and journals each result."""
    ctx.journal.write("run", run_id=ctx.run_id, runbook=title, env=ctx.env.name, operator=ctx.operator,
                      host=host_name(), inventory_hash=ctx.env.inventory.digest, dry_run=False, arguments={})
    results = []
    for name, probe in probes:
        began = time.monotonic()
        try:
            result = CheckResult(name, "pass", probe())
        except Warn as warning:
            result = CheckResult(name, "warn", redact(str(warning)))
        except OpsError as error:
            if error.exit_code == 2:  # the inventory itself is wrong: say so, not "a check failed"
                ctx.journal.write("finished", status="failed", exit_code=2, stopped_at=name, reason=redact(str(error)))
                raise
            result = CheckResult(name, "fail", redact(error.message), fix=error.hint)
        except Exception as error:  # a probe must never take the report down with it
            result = CheckResult(name, "fail", redact(f"{type(error).__name__}: {error}"))
        result.seconds = round(time.monotonic() - began, 3)
        ctx.output.check(result.status, name, result.detail)
        if result.fix and result.status != "pass":
            ctx.output.info(f"       fix: {result.fix}")
        ctx.journal.write("check", **result.to_json())
        results.append(result)
    failed = [r for r in results if r.status == "fail"]
    ctx.journal.write("finished", status="failed" if failed else "succeeded", exit_code=3 if failed else 0)
    return results


def raise_on_failure(results: list[CheckResult], what: str) -> None:
    failed = [r.name for r in results if r.status == "fail"]
    if failed:
        raise CheckFailed(f"{what}: {len(failed)} of {len(results)} checks failed ({', '.join(failed)})")


def checklist(env: Environment, output: Output, title: str, probes: list[tuple[str, Probe]]) -> None:
    """A whole read-only checklist as a task runs it: header, one line per check, counts, the --json
    result; CheckFailed (exit 3) when any check fails."""
    ctx = RunContext(env, output=output)
    output.info(f"{title} of {env.name} (run {ctx.run_id}):")
    results = run_checks(ctx, title, probes)
    counts = {status: sum(r.status == status for r in results) for status in ("pass", "warn", "fail")}
    output.info(f"{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed")
    output.result({"env": env.name, "run_id": ctx.run_id, "ok": counts["fail"] == 0, **counts,
                   "checks": [r.to_json() for r in results]})
    raise_on_failure(results, f"{title} of {env.name}")
