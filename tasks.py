"""opsbook's Invoke entry point: builds the task collection. `inv --list` shows it.

Everything else lives in runbooks/ (one module per procedure) and ops/ (the library);
exit codes are mapped in one place, ops/cli.py.
"""

from invoke import Collection

from ops.cli import install_usage_errors
from runbooks import assets, backup, health, inventory, provision, prune, restore, runs, sandbox

backup.collection.add_task(prune.prune)
backup.collection.add_task(assets.assets)

install_usage_errors()  # command-line errors: exit 2 and one line, before invoke parses the task flags

ns = Collection()
ns.add_task(health.health)
ns.add_task(provision.provision)
ns.add_collection(backup.collection)
ns.add_task(restore.restore)
ns.add_collection(inventory.collection)
ns.add_collection(sandbox.collection)
ns.add_collection(runs.runs)
ns.add_collection(runs.runbook_collection)

from runbooks import decommission, drill  # noqa: E402

ns.add_collection(drill.collection)
ns.add_task(decommission.decommission)

from runbooks import migrate  # noqa: E402

ns.add_collection(migrate.collection)

from runbooks import deploy  # noqa: E402

ns.add_collection(deploy.collection)

from runbooks import incident  # noqa: E402

ns.add_collection(incident.collection)

from runbooks import preflight, status  # noqa: E402

ns.add_task(preflight.preflight)
ns.add_task(status.status)

from runbooks import keys, secrets_rotate  # noqa: E402

ns.add_collection(keys.collection)
ns.add_collection(secrets_rotate.collection)

from runbooks import hosts  # noqa: E402

ns.add_collection(hosts.collection)
