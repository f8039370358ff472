"""inv status-page.publish — the public status page, rendered from the incident records and published.

The page (index.html), its machine-readable state (index.json) and its Atom feed (feed.atom) go to the
app bucket under `status_page.prefix`, or to `status_page.folder` (ops.status_page_publish). incident.open,
.update and .resolve publish it themselves when the environment has a `status_page` section; this task
publishes it by hand (after changing the section, or when an incident's publish warned).
"""

from __future__ import annotations

from invoke import Collection, task

from ops.cli import OpsTask, TaskCall, execute
from ops.status_page_publish import publish_runbook as build

__all__ = ["build", "collection"]  # build: RUNBOOKS "status-page.publish"


@task(klass=OpsTask)
def publish(call: TaskCall, env=None, dry_run=False, json=False):
    """Render the status page from the incident records and write the files that changed (--dry-run: the plan)."""
    execute(build(call.environment), call.environment, call.output, dry_run=dry_run,
            result=lambda ctx: {"status_page": ctx.state.get("status-page")})


collection = Collection("status_page")
collection.add_task(publish)
