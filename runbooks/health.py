"""inv health: can we reach the database, the buckets, the hosts and the app? (the probes: ops.health_probes)"""

from invoke import task

from ops.checks import checklist
from ops.cli import OpsTask, TaskCall
from ops.health_probes import probes


@task(klass=OpsTask, multi_env=True)
def health(call: TaskCall, env=None, json=False):
    """Check the database, storage, hosts and app health/ready URLs; exit 3 if any fails."""
    checklist(call.environment, call.output, "health", probes(call.environment))
