"""One module per procedure of the runbook: its steps, its builder, its tasks.

RUNBOOKS maps a runbook's name to the function that builds it for an environment
(`build(env, **arguments) -> Runbook`). `inv runbook.show` and `inv runs.resume`
rebuild runbooks through it, so the checklist that is read is the one that runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ops.errors import OpsError, UsageError
from ops.secrets import redact

if TYPE_CHECKING:
    from ops.engine import Runbook
    from ops.inventory import Environment

RUNBOOKS = {
    "provision": "runbooks.provision",
    "backup": "runbooks.backup",
    "backup.verify": "runbooks.backup:build_verify",
    "backup.copy": "runbooks.backup:build_copy",
    "backup.prune": "runbooks.prune",
    "backup.assets": "runbooks.assets",
    "restore": "runbooks.restore",
    "restore.diff": "runbooks.restore:build_diff",
    "drill": "runbooks.drill",
    "decommission": "runbooks.decommission",
    "migrate": "runbooks.migrate",
    "migrate.resolve": "runbooks.migrate:build_resolve",
    "deploy.push-env": "runbooks.deploy:build_push_env",
    "deploy.restart": "runbooks.deploy:build_restart",
    "deploy.rollback": "runbooks.deploy:build_rollback",
    "incident.open": "runbooks.incident:build_open",
    "incident.update": "runbooks.incident:build_update",
    "incident.resolve": "runbooks.incident:build_resolve",
    "incident.rollback": "runbooks.incident",
    "keys.rotate": "runbooks.keys",
    "secrets.rotate": "runbooks.secrets_rotate",
    "secrets.move": "runbooks.secrets_store",
    "pitr.setup": "runbooks.pitr:build_setup",
    "pitr.base": "runbooks.pitr:build_base",
    "status-page.publish": "runbooks.status_page",
}


def build(name: str, env: Environment, **arguments: Any) -> Runbook:
    if name not in RUNBOOKS:
        raise UsageError(f"no runbook named {name!r}", hint=f"known runbooks: {', '.join(sorted(RUNBOOKS))}")
    module_name, _, builder = RUNBOOKS[name].partition(":")  # "module" (its build) or "module:builder"
    module = importlib.import_module(module_name)
    return getattr(module, builder or "build")(env, **arguments)


def checklists(env: Environment) -> dict[str, str]:
    """Every runbook's numbered checklist for `env`; one that cannot be built for it says why instead."""
    texts = {}
    for name in sorted(RUNBOOKS):
        try:
            texts[name] = build(name, env).checklist(env.name)
        except OpsError as error:
            texts[name] = f"# {name} — {env.name}\n\nnot rendered for this environment: {redact(error)}\n"
    return texts
