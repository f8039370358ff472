"""inv inventory.check / inventory.show."""

from __future__ import annotations

from invoke import Collection, task

from ops import yaml_text
from ops.cli import OpsTask, load_inventory, make_output
from ops.inventory import mask_tree


@task(klass=OpsTask)
def check(c, json=False):
    """Validate the inventory; list every problem with its dotted path and line; exit 2 on any."""
    output = make_output(json)
    inventory = load_inventory()  # raises InventoryError listing every problem
    output.info(f"{inventory.file}: valid ({len(inventory.env_names)} environments: "
                f"{', '.join(inventory.env_names)}; default {inventory.default_env})")
    output.result({"ok": True, "file": str(inventory.file), "envs": inventory.env_names,
                   "default_env": inventory.default_env})


@task(klass=OpsTask)
def show(c, env=None, json=False):
    """Print the merged environment (defaults → env → host), secrets masked."""
    output = make_output(json)
    environment = load_inventory().environment(env)
    merged = mask_tree(environment.data)
    if json:
        output.result({"env": environment.name, "config": merged})
    else:
        output.document(f"# envs.{environment.name} merged (defaults → env → host), secrets masked")
        output.document(yaml_text.dump(merged, allow_unicode=True).rstrip())


collection = Collection("inventory", check, show)
