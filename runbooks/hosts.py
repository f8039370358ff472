"""inv hosts.forget: accept a host's new SSH host key after a legitimate change (a rebuilt host)."""

from __future__ import annotations

from pathlib import Path

from invoke import Collection, task

from ops import known_hosts
from ops.cli import OpsTask, TaskCall
from ops.errors import UsageError
from ops.rollout import host_named


@task(klass=OpsTask, help=dict(host="the host's name in the inventory (hosts[].name)"))
def forget(call: TaskCall, env=None, host=None, json=False):
    """Forget the host key opsbook recorded for a host; the next connection records the key it offers."""
    environment = call.inventory_environment
    if not host:
        names = ", ".join(h.name for h in environment.host_configs()) or "none"
        raise UsageError("--host is required", hint=f"hosts of {environment.name}: {names}")
    config = host_named(environment, host)
    path = Path(config.known_hosts or "")
    name = known_hosts.host_key_name(config.address, config.port)
    removed = known_hosts.forget(path, name)
    if removed:
        call.output.info(f"forgot the host key of {config.name} ({name}) in {path}: "
                         f"{', '.join(key.describe() for key in removed)}")
        call.output.info("the next connection records the key the host offers: check the fingerprint it prints "
                         f"against the host's own ({known_hosts.key_file_command(removed[0].key_type)} there)")
    else:
        call.output.info(f"{path} has no key for {config.name} ({name}): nothing to forget")
    sharing = [h.name for h in environment.host_configs()
               if h.name != config.name and known_hosts.host_key_name(h.address, h.port) == name]
    if removed and sharing:
        call.output.info(f"{', '.join(sharing)} share{'s' if len(sharing) == 1 else ''} that address and port, "
                         "so their recorded key is gone too")
    if known_hosts.keys_for(known_hosts.user_file(), name):
        call.output.warn(f"{known_hosts.USER_FILE} also has a key for {name}, and it is checked first: "
                         f"remove it with `ssh-keygen -R '{name}'` if it is the old one")
    call.output.result({"host": config.name, "name": name, "file": str(path),
                        "forgotten": [key.describe() for key in removed]})


collection = Collection("hosts", forget)
