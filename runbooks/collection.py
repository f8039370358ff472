"""opsbook's task collection, for the `opsbook` console tool (runbooks/program.py) and `inv` (tasks.py)."""

from invoke import Collection

from ops.cli import name_jobs
from runbooks import (
    assets,
    backup,
    backup_check,
    decommission,
    deploy,
    drill,
    health,
    hosts,
    incident,
    inventory,
    keys,
    maintenance,
    migrate,
    pitr,
    preflight,
    provision,
    prune,
    restore,
    runs,
    sandbox,
    schedule,
    secrets_rotate,
    secrets_store,
    status,
    status_page,
)

backup.collection.add_task(prune.prune)
backup.collection.add_task(assets.assets)
backup.collection.add_task(backup_check.check)
secrets_rotate.collection.add_task(secrets_store.status)
secrets_rotate.collection.add_task(secrets_store.move)

ns = Collection()
ns.add_task(health.health)
ns.add_task(provision.provision)
ns.add_collection(backup.collection)
ns.add_collection(restore.collection)
ns.add_collection(inventory.collection)
ns.add_collection(sandbox.collection)
ns.add_collection(runs.runs)
ns.add_collection(runs.runbook_collection)
ns.add_collection(drill.collection)
ns.add_task(decommission.decommission)
ns.add_collection(migrate.collection)
ns.add_collection(deploy.collection)
ns.add_collection(incident.collection)
ns.add_task(preflight.preflight)
ns.add_task(status.status)
ns.add_collection(status_page.collection)
ns.add_collection(maintenance.collection)
ns.add_collection(keys.collection)
ns.add_collection(secrets_rotate.collection)
ns.add_collection(hosts.collection)
ns.add_collection(schedule.collection)
ns.add_collection(pitr.collection)

name_jobs(ns)  # the task names the monitor's pings use (ops/pings.py)
