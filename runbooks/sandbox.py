"""inv sandbox.up / .down / .status: the embedded local environment."""

from __future__ import annotations

from invoke import Collection, task

from ops.cli import OpsTask, load_inventory, make_output
from ops.sandbox import Sandbox


def _sandbox():
    return Sandbox(load_inventory().state_dir / "sandbox")


@task(klass=OpsTask)
def up(c, json=False):
    """Start the sandbox (PostgreSQL + folder buckets under .ops/sandbox) with its demo app; idempotent."""
    output = make_output(json)
    info = _sandbox().up(log=output.info)
    output.info(f"sandbox running on 127.0.0.1:{info.port} (data in {info.home})")
    output.result({"running": info.running, "port": info.port, "home": str(info.home)})


@task(klass=OpsTask)
def down(c, json=False):
    """Stop the sandbox; its data stays for the next `inv sandbox.up`."""
    output = make_output(json)
    _sandbox().down()
    output.info("sandbox stopped")
    output.result({"running": False})


@task(klass=OpsTask)
def status(c, json=False):
    """Where the sandbox is, whether it runs, and what it holds."""
    output = make_output(json)
    report = _sandbox().status()
    for key, value in report.items():
        output.info(f"{key}: {value}")
    output.result(report)


collection = Collection("sandbox", up, down, status)
