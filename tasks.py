"""opsbook's Invoke entry point: builds the task collection. `inv --list` shows it.

Everything else lives in runbooks/ (one module per procedure) and ops/ (the library);
exit codes are mapped in one place, ops/cli.py.
"""

from invoke import Collection

from runbooks import assets, backup, health, inventory, provision, prune, restore, runs, sandbox

backup.collection.add_task(prune.prune)
backup.collection.add_task(assets.assets)

ns = Collection()
ns.add_task(health.health)
ns.add_task(provision.provision)
ns.add_collection(backup.collection)
ns.add_task(restore.restore)
ns.add_collection(inventory.collection)
ns.add_collection(sandbox.collection)
ns.add_collection(runs.runs)
ns.add_collection(runs.runbook_collection)
