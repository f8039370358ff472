"""inv sandbox.up / .down / .status: the embedded local environment."""

from __future__ import annotations

from invoke import Collection, task

from ops.cli import OpsTask, TaskCall, load_inventory
from ops.sandbox import Sandbox


def _sandbox():
    return Sandbox(load_inventory().state_dir / "sandbox")


@task(klass=OpsTask)
def up(call: TaskCall, json=False):
    """Start the sandbox (PostgreSQL + folder buckets under .ops/sandbox) with its demo app; idempotent."""
    info = _sandbox().up(log=call.output.info)
    call.output.info(f"sandbox running on 127.0.0.1:{info.port} (data in {info.home})")
    call.output.result({"running": info.running, "port": info.port, "home": str(info.home)})


@task(klass=OpsTask)
def down(call: TaskCall, json=False):
    """Stop the sandbox; its data stays for the next `inv sandbox.up`."""
    _sandbox().down()
    call.output.info("sandbox stopped")
    call.output.result({"running": False})


@task(klass=OpsTask)
def status(call: TaskCall, json=False):
    """Where the sandbox is, whether it runs, and what it holds."""
    report = _sandbox().status()
    for key, value in report.items():
        call.output.info(f"{key}: {value}")
    call.output.result(report)


collection = Collection("sandbox", up, down, status)
