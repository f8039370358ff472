"""One `inv backup` against bench/pipeline.py's servers, its phases timed from the process's start.

    .venv/bin/python bench/pipeline.py serve --size 200 --state /tmp/pipeline.json &
    .venv/bin/python bench/phases.py --state /tmp/pipeline.json

Runs the backup in this process, as `inv` runs it (its own command line, so it also ends as `inv` does),
and prints a timeline on stderr, each line marked `phase`: every S3 request (operation, part number,
seconds), every child process started, each step's start and end, the end of the run and the exit. The
seconds count from the process's start, so the interpreter's start-up is in them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the project importable
    sys.path.insert(0, str(ROOT))

BUCKET = "pipeline"  # bench/pipeline.py's


def process_started() -> float:
    """The process's start as a wall-clock time (Linux: /proc); elsewhere, now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


STARTED = process_started()


def log(what: str) -> None:
    sys.stderr.write(f"phase {time.time() - STARTED:8.3f}s [{threading.current_thread().name[:16]:16}] {what}\n")


def trace_requests() -> None:
    import botocore.client

    send = botocore.client.BaseClient._make_api_call

    def timed(client: Any, operation: str, parameters: dict[str, Any]) -> Any:
        began = time.time()
        try:
            return send(client, operation, parameters)
        finally:
            part = f" part {parameters['PartNumber']}" if "PartNumber" in parameters else ""
            log(f"S3 {operation}{part} {parameters.get('Key', '')} ({time.time() - began:.3f}s)")

    botocore.client.BaseClient._make_api_call = timed


def trace_processes() -> None:
    import subprocess

    start = subprocess.Popen.__init__

    def started(process: Any, args: Any, *rest: Any, **options: Any) -> None:
        program = args[0] if isinstance(args, list | tuple) else args
        log(f"start {Path(str(program)).name}")
        start(process, args, *rest, **options)

    subprocess.Popen.__init__ = started


def trace_steps() -> None:
    from ops import engine, step_apply

    def around(owner: Any, name: str, label: Any) -> None:
        original = getattr(owner, name)

        def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
            log(f"{label(args)} …")
            try:
                return original(self, *args, **kwargs)
            finally:
                log(f"{label(args)} done")

        setattr(owner, name, traced)

    around(engine.Runner, "plan", lambda args: "plan")
    around(step_apply.Applier, "apply_one", lambda args: f"step {args[0].step.name}")
    around(engine.Runner, "_finish", lambda args: "finish (journal copied to the bucket)")


def workspace(state: dict[str, Any], folder: Path) -> None:
    backups = {"provider": "s3", "endpoint": state["endpoint"], "region": "us-east-1", "bucket": BUCKET,
               "prefix": "phases/", "access_key_id": "${env:BENCH_S3_KEY}",
               "secret_access_key": "${env:BENCH_S3_SECRET}", "compression_level": 1}
    inventory = {"project": "bench", "default_env": "bench",
                 "envs": {"bench": {"database": {"url": "${env:BENCH_DATABASE_URL}"}, "backups": backups}}}
    (folder / "inventory.yaml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    os.environ.update(OPS_INVENTORY=str(folder / "inventory.yaml"), OPS_HOME=str(folder / ".ops"),
                      OPS_OPERATOR="bench", BENCH_S3_KEY="bench", BENCH_S3_SECRET="bench-secret",
                      BENCH_DATABASE_URL=state["url"],
                      PATH=f"{state['bin_dir']}{os.pathsep}{os.environ.get('PATH', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", required=True, help="the state file of `bench/pipeline.py serve`")
    arguments = parser.parse_args()
    state = json.loads(Path(arguments.state).read_text())
    folder = Path(tempfile.mkdtemp(prefix="opsbook-phases-"))
    workspace(state, folder)
    atexit.register(lambda: log("exit"))  # registered first, so it runs after every other handler
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    log("main")
    trace_requests()
    trace_processes()
    trace_steps()
    from invoke.main import program

    sys.argv = ["inv", "--search-root", str(ROOT), "backup", "--env", "bench", "--no-prune"]
    program.run()


if __name__ == "__main__":
    main()
