"""inv health: can we reach the database, the buckets, the hosts and the app? (the probes: ops.health_probes)"""

from invoke import task

from ops.checks import checklist
from ops.cli import OpsTask, environment, make_output
from ops.health_probes import probes


@task(klass=OpsTask, multi_env=True)
def health(c, env=None, json=False):
    """Check the database, storage, hosts and app health/ready URLs; exit 3 if any fails."""
    output = make_output(json)
    environment_ = environment(env, output=output)
    checklist(environment_, output, "health", probes(environment_))
