"""inv inventory.check / inventory.show."""

from __future__ import annotations

from invoke import Collection, task

from ops import yaml_text
from ops.cli import OpsTask, TaskCall, load_inventory
from ops.inventory import mask_tree


@task(klass=OpsTask)
def check(call: TaskCall, json=False):
    """Validate the inventory; list every problem with its dotted path and line; exit 2 on any."""
    inventory = load_inventory()  # raises InventoryError listing every problem
    call.output.info(f"{inventory.file}: valid ({len(inventory.env_names)} environments: "
                     f"{', '.join(inventory.env_names)}; default {inventory.default_env})")
    call.output.result({"ok": True, "file": str(inventory.file), "envs": inventory.env_names,
                        "default_env": inventory.default_env})


@task(klass=OpsTask)
def show(call: TaskCall, env=None, json=False):
    """Print the merged environment (defaults → env → host), secrets masked."""
    environment = call.inventory_environment
    merged = mask_tree(environment.data)
    if json:
        call.output.result({"env": environment.name, "config": merged})
    else:
        call.output.document(f"# envs.{environment.name} merged (defaults → env → host), secrets masked")
        call.output.document(yaml_text.dump(merged, allow_unicode=True).rstrip())


collection = Collection("inventory", check, show)
