"""inv health: can we reach the database, the buckets, the hosts and the app? (the probes: ops.health_probes)"""

from invoke import task

from ops.checks import checklist
from ops.cli import OpsTask, TaskCall
from ops.health_probes import probes
from ops.platform_steps import app_probes
from ops.platforms import platform_name


@task(klass=OpsTask, multi_env=True)
def health(call: TaskCall, env=None, json=False):
    """Check the database, storage, hosts and app health/ready URLs; exit 3 if any fails."""
    env = call.environment
    managed = app_probes(env) if platform_name(env) != "ssh" else []  # on hosts, probes() has the app URLs
    checklist(env, call.output, "health", probes(env) + managed)
