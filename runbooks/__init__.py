"""One module per procedure of the runbook: its steps, its builder, its tasks.

RUNBOOKS maps a runbook's name to the function that builds it for an environment
(`build(env, **arguments) -> Runbook`). `inv runbook.show` and `inv runs.resume`
rebuild runbooks through it, so the checklist that is read is the one that runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ops.errors import UsageError

if TYPE_CHECKING:
    from ops.engine import Runbook
    from ops.inventory import Environment

RUNBOOKS = {
    "provision": "runbooks.provision",
    "backup": "runbooks.backup",
    "backup.verify": "runbooks.backup_verify",
    "backup.prune": "runbooks.prune",
    "backup.assets": "runbooks.assets",
    "restore": "runbooks.restore",
}


def build(name: str, env: Environment, **arguments: Any) -> Runbook:
    if name not in RUNBOOKS:
        raise UsageError(f"no runbook named {name!r}", hint=f"known runbooks: {', '.join(sorted(RUNBOOKS))}")
    module = importlib.import_module(RUNBOOKS[name])
    return module.build(env, **arguments)
